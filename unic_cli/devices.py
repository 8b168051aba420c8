"""`--device` values: checked as text before anything heavy loads, then resolved against this machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def device_problem(name: str) -> str | None:
    """What is wrong with a `--device` value as written (no torch import), or None."""
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return None
    return f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; a CUDA device on a machine without CUDA is a ConfigError."""
    import torch

    from unic_cli.errors import ConfigError

    if problem := device_problem(name):
        raise ConfigError(problem)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if (index := torch.device(name).index) is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)
