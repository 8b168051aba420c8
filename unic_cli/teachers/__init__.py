"""load_teacher(spec): resolve a spec to a card, then dispatch on card.source to an adapter, lazily.

Adapters import their library inside the function, so a command that uses only timm teachers never imports
transformers or open_clip.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from unic_cli.errors import RegistryError, WeightsError
from unic_cli.registry import TeacherCard, TeacherSpec, apply_overrides, card_path, get_card, parse_teacher_spec
from unic_cli.teachers.base import Teacher, TeacherTokens

if TYPE_CHECKING:
    import torch

log = logging.getLogger("unic_cli")
_warned: set[str] = set()  # specs whose no-effect override was already reported (distill, bench: once each)

__all__ = ["Teacher", "TeacherTokens", "check_teacher", "load_teacher", "resolve_card", "token_shape_problem"]

# source -> adapter module; each has build_backbone(card, spec, *, pretrained) -> nn.Module implementing Backbone,
# and card_from_spec(spec) -> TeacherCard for explicit specs without a card.
_ADAPTERS = {
    "timm": "unic_cli.teachers.timm",
    "hf": "unic_cli.teachers.hf",
    "open_clip": "unic_cli.teachers.open_clip",
    "py": "unic_cli.teachers.py_module",
}


def _adapter(source: str):
    return importlib.import_module(_ADAPTERS[source])


def resolve_card(spec: str | TeacherSpec) -> TeacherCard:
    """The card for a spec: a registry card, or one read from the library's own config (no weights loaded)."""
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    if spec.source == "alias":
        card = get_card(spec.target)
    else:
        card = _adapter(spec.source).card_from_spec(spec)
    return apply_overrides(card, spec.overrides, origin=f"teacher spec {spec.text!r}")


def load_teacher(
    spec: str | TeacherSpec,
    *,
    grid: tuple[int, int] | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    card: TeacherCard | None = None,
) -> Teacher:
    """Build a frozen teacher behind the token contract.

    Args:
        spec: an alias or explicit spec (see `unic_cli.registry`), optionally with local weights.
        grid: the student's patch grid; None keeps the teacher's native grid.
        pretrained: load weights (hub, package or local file); False gives a random init, for tests and bench.
        device: where the teacher lives: "cpu", "cuda", "cuda:N", "auto" (cuda when available), or any
            torch device.
        card: build from this card instead of the one the spec resolves to today (a resumed run keeps the
            card it started with, whatever the registry says now); the differences are logged.

    Returns:
        A `Teacher` (an `nn.Module` in eval mode, frozen): `teacher(images_BCHW)` takes uint8 [0, 255] or float
        [0, 1] pixels of any size and returns `TeacherTokens(summary_BD, patch_BND)`.

    Raises:
        ConfigError: `device` names a CUDA device this machine lacks (checked before any weights load).
        UnknownTeacherError, RegistryError, WeightsError: the spec, its card or its weights.
    """
    from unic_cli.devices import resolve_device

    if str(device) == "auto" or str(device).startswith("cuda"):  # "cpu", "meta", "mps" pass as they are
        device = resolve_device(str(device))
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    current = resolve_card(spec)
    if card is None:
        card = current
    else:
        now = current.to_dict()
        changed = {k: (v, now[k]) for k, v in card.to_dict().items() if k not in ("notes", "paper") and v != now[k]}
        if changed:
            log.warning("teacher %s: its card has changed since this run started (%s); the run keeps the card it "
                        "started with", spec.text, ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    try:
        backbone = _adapter(card.source).build_backbone(card, spec, pretrained=pretrained)
    except WeightsError as err:
        where = card_path(card.alias) if spec.source == "alias" and spec.weights is None and card.weights else None
        if where is None:
            raise
        raise WeightsError(f"{err} (the `weights` of card {where}; a relative path is read from the card's "
                           "folder)") from None
    teacher = Teacher(card, backbone, grid=grid).to(device).eval()  # eval: `teacher.training` says False too
    if (grid is not None and card.family == "vit" and card.resolution == "student" and "image_size" in spec.overrides
            and spec.text not in _warned):
        _warned.add(spec.text)
        log.warning(
            "teacher %s: ?image_size=%s has no effect here: a ViT teacher sees the student's grid times its patch "
            "size (%dx%d px); add &resolution=native to feed it image_size (its feature map is then resized to "
            "the student's grid)", spec.text, spec.overrides["image_size"], *teacher.input_size,
        )
    return teacher


def token_shape_problem(card: TeacherCard, grid: tuple[int, int], shapes: dict, batch_size: int) -> str | None:
    """Why token `shapes` ({"summary": [B, Ds] or None, "patch": [B, N, Dp]}) break `card` on `grid`, or None."""
    expected = {"summary": [batch_size, card.summary_dim] if card.has_summary else None,
                "patch": [batch_size, grid[0] * grid[1], card.patch_dim]}
    if shapes == expected:
        return None
    return (f"teacher {card.alias!r} returned summary {shapes['summary']}, patch {shapes['patch']} for a batch of "
            f"{batch_size} on a {grid[0]}x{grid[1]} grid; its card promises summary {expected['summary']}, patch "
            f"{expected['patch']} (fix {card_path(card.alias) or 'the spec or the model'})")


def check_teacher(
    spec: str | TeacherSpec,
    *,
    grid: tuple[int, int] | None = None,
    pretrained: bool = True,
    device: str = "cpu",
    batch_size: int = 2,
) -> dict:
    """Load a teacher and run one batch of blank images through it: what `unic teachers check` reports.

    Returns the card, the input size and grid, the token shapes and dtype, the parameter count, and the
    seconds spent loading and running. Raises RegistryError when the token shapes differ from the card's.
    """
    import time

    import torch

    from unic_cli.devices import out_of_memory

    start = time.perf_counter()
    teacher = load_teacher(spec, grid=grid, pretrained=pretrained, device=device)
    loaded = time.perf_counter()
    tokens = what = None
    try:
        images_BCHW = torch.zeros(batch_size, 3, *teacher.input_size, dtype=torch.uint8, device=teacher.mean_C.device)
        tokens = teacher(images_BCHW)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if (what := out_of_memory(err)) is None:
            raise
    if tokens is None:  # raised here, not in the except: the error's frames (and their tensors) are released
        height, width = teacher.input_size
        raise RegistryError(f"teacher {teacher.card.alias!r}: {batch_size} blank images at {height}x{width} px do not "
                            f"fit on {device} ({what}); lower --image-size")
    shapes = {"summary": None if tokens.summary_BD is None else list(tokens.summary_BD.shape),
              "patch": list(tokens.patch_BND.shape)}
    problem = token_shape_problem(teacher.card, teacher.grid, shapes, batch_size)
    if problem:
        raise RegistryError(problem)
    return {
        "card": teacher.card.to_dict(),
        "input_size": list(teacher.input_size),
        "grid": list(teacher.grid),
        "tokens": shapes,
        "dtype": str(tokens.patch_BND.dtype).removeprefix("torch."),
        "num_parameters": sum(p.numel() for p in teacher.parameters()),
        "load_seconds": round(loaded - start, 3),
        "forward_seconds": round(time.perf_counter() - loaded, 3),
    }
