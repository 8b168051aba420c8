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


def out_of_memory(err: BaseException) -> str | None:
    """The first sentence of an allocation failure (CUDA's `torch.OutOfMemoryError`, or the CPU allocator's
    RuntimeError), or None for any other error."""
    import torch

    text = str(err).strip()
    if isinstance(err, torch.OutOfMemoryError) or (isinstance(err, RuntimeError)
                                                   and "can't allocate memory" in text):
        text = text.split("DefaultCPUAllocator: ", 1)[-1]  # the CPU's message starts with an enforce location
        first = text.split(". ", 1)[0].splitlines()[0] if text else "out of memory"
        return first.rstrip(".")
    return None


def memory_advice(batch_size: int, grad_accum_steps: int, *, fp32_student: bool, bench_hint: bool = True) -> str:
    """What to change when a training step does not fit: the same global batch in smaller pieces, first."""
    tips = []
    if batch_size >= 2:
        tips.append(f"--batch-size {batch_size // 2} --grad-accum-steps {grad_accum_steps * 2}"
                    + (" (the same global batch)" if batch_size % 2 == 0 else ""))
    if fp32_student:
        tips.append("--student-dtype bf16")
    tips.append("--fsdp under torchrun")
    advice = "try " + ", or ".join(tips)
    if bench_hint:
        advice += "; `unic bench` with the same flags and --try-batch-sizes finds the largest batch that fits"
    return advice
