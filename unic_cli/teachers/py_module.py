"""PyTeacher: a user's own nn.Module (`py:MODULE:CALLABLE`) behind the token contract.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D token width, h/w grid.

The contract (also in docs/teachers.md):

- `MODULE` is an importable module (`my_pkg.teachers`) or a file (`./my_teacher.py`); `CALLABLE` returns an
  `nn.Module`. It is called with `pretrained=` when it accepts that keyword (False while unic only reads the
  card, and for `load_teacher(..., pretrained=False)`).
- The module's `forward(images_BCHW)` receives images already resized to the teacher's input size and
  normalised with the card's mean/std, and returns one of:
  a dict `{"summary": [B, Ds] (optional), "patch": [B, N, Dp] or [B, Dp, h, w]}`; a tuple `(summary, patch)`;
  or a tensor `patch` alone. Patch tokens must not include class or register tokens; as a sequence they are
  row-major on the `input // patch_size` grid.
- Card fields come from a `unic_card` dict on the module (attribute of the instance or its class) and from the
  spec's `?key=value` overrides, which win. `image_size`, `patch_size`, `mean` and `std` are required;
  `patch_dim`, `summary_dim` and `tokens` are measured from one forward pass when not given; `license`
  defaults to "unknown".
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path

import torch
from torch import nn

from unic_cli.errors import RegistryError, UnknownTeacherError
from unic_cli.registry import CARD_FIELDS, TeacherCard, TeacherSpec, convert_overrides
from unic_cli.teachers.weights import load_into, read_state_dict, resolve_weights_ref

log = logging.getLogger("unic_cli")

_REQUIRED = ("image_size", "patch_size", "mean", "std")


def _load_callable(target: str, text: str):
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UnknownTeacherError(f"teacher spec {text!r}: expected py:MODULE:CALLABLE, e.g. py:my_pkg.models:build")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise UnknownTeacherError(f"teacher spec {text!r}: file {str(path)!r} does not exist")
            name = f"unic_user_teacher_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise UnknownTeacherError(
            f"teacher spec {text!r}: cannot import {module_name!r} ({err}); is it installed or on PYTHONPATH?"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UnknownTeacherError(f"teacher spec {text!r}: {module_name!r} has no callable {attr!r}")
    return fn


def _build(fn, *, pretrained: bool, text: str) -> nn.Module:
    takes_pretrained = "pretrained" in inspect.signature(fn).parameters
    module = fn(pretrained=pretrained) if takes_pretrained else fn()
    if not isinstance(module, nn.Module):
        raise UnknownTeacherError(
            f"teacher spec {text!r}: the callable returned {type(module).__name__}, not an nn.Module"
        )
    return module


def split_output(out, text: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(summary or None, patch) from whatever the module returned (see the module docstring)."""
    if isinstance(out, dict):
        if "patch" not in out:
            raise RegistryError(f"teacher {text!r}: forward returned a dict without a 'patch' entry ({list(out)})")
        return out.get("summary"), out["patch"]
    if isinstance(out, (tuple, list)) and len(out) == 2:
        return out[0], out[1]
    if isinstance(out, torch.Tensor):
        return None, out
    raise RegistryError(
        f"teacher {text!r}: forward must return {{'summary', 'patch'}}, (summary, patch) or patch, "
        f"got {type(out).__name__}"
    )


def _patch_tokens(patch: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    if patch.ndim == 4:
        return patch.flatten(2).transpose(1, 2), (patch.shape[-2], patch.shape[-1])
    return patch, None


class PyTeacher(nn.Module):
    """A user module as a Backbone; shapes are checked against the card on every call (no host sync)."""

    def __init__(self, card: TeacherCard, module: nn.Module) -> None:
        super().__init__()
        self.card = card
        self.module = module

    def forward_tokens(self, images_BCHW: torch.Tensor):
        summary_BD, patch = split_output(self.module(images_BCHW), self.card.alias)
        patch_BND, grid = _patch_tokens(patch)
        if grid is None:
            grid = self.card.grid_for((images_BCHW.shape[-2], images_BCHW.shape[-1]))
            if patch_BND.shape[1] != grid[0] * grid[1]:
                raise RegistryError(
                    f"teacher {self.card.alias!r}: {patch_BND.shape[1]} patch tokens for a {grid[0]}x{grid[1]} grid "
                    f"(input {tuple(images_BCHW.shape[-2:])}, patch_size {self.card.patch_size}); return patch "
                    "tokens without class/register tokens, or a [B, D, h, w] feature map"
                )
        if patch_BND.shape[-1] != self.card.patch_dim:
            raise RegistryError(f"teacher {self.card.alias!r}: patch tokens are {patch_BND.shape[-1]}-d, "
                                f"the card says patch_dim = {self.card.patch_dim}")
        if self.card.has_summary:
            if summary_BD is None:
                raise RegistryError(
                    f"teacher {self.card.alias!r}: the card lists a summary token, forward returned none"
                )
            if summary_BD.shape[-1] != self.card.summary_dim:
                raise RegistryError(f"teacher {self.card.alias!r}: the summary token is {summary_BD.shape[-1]}-d, "
                                    f"the card says summary_dim = {self.card.summary_dim}")
        return summary_BD, patch_BND, grid


def build_backbone(card: TeacherCard, spec: TeacherSpec, *, pretrained: bool) -> nn.Module:
    """The Backbone for a `py:` spec, with local weights loaded strictly when given."""
    module = _build(_load_callable(card.model_id, spec.text), pretrained=pretrained, text=spec.text)
    local = spec.weights if spec.weights is not None else card.weights
    if pretrained and local is not None:
        path = resolve_weights_ref(local)
        load_into(module, read_state_dict(path), origin=str(path))
    return PyTeacher(card, module)


def _measure(module: nn.Module, image_size: int, text: str) -> tuple[int | None, int]:
    """(summary width or None, patch width) from one forward pass on a blank image."""
    with torch.no_grad():
        x = torch.zeros(1, 3, image_size, image_size, device=next(module.parameters(), torch.empty(0)).device)
        summary, patch = split_output(module.eval()(x), text)
    return (None if summary is None else int(summary.shape[-1])), int(patch.shape[1 if patch.ndim == 4 else -1])


def card_from_spec(spec: TeacherSpec) -> TeacherCard:
    """A card for `py:MODULE:CALLABLE` from the module's `unic_card` and the spec's overrides."""
    fn = _load_callable(spec.target, spec.text)
    try:  # the meta device builds and runs the module without memory or compute; user code may not allow it
        with torch.device("meta"):
            module = _build(fn, pretrained=False, text=spec.text)
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        module = _build(fn, pretrained=False, text=spec.text)
    declared = dict(getattr(module, "unic_card", None) or {})
    unknown = sorted(set(declared) - set(CARD_FIELDS))
    if unknown:
        raise RegistryError(f"teacher spec {spec.text!r}: unic_card has unknown field(s) {unknown}")
    raw = {"license": "unknown", **declared, **convert_overrides(spec.overrides, origin=f"teacher spec {spec.text!r}"),
           "alias": spec.name, "source": "py", "model_id": spec.target}
    missing = [f for f in _REQUIRED if f not in raw]
    if missing:
        example = "&".join(f"{f}=..." for f in missing)
        raise RegistryError(
            f"teacher spec {spec.text!r} needs {', '.join(missing)}: add them to the spec "
            f"('{spec.name}?{example}', lists comma-separated) or set `unic_card = {{...}}` on the module"
        )
    wants_summary = "summary" in raw.get("tokens", ("summary",))
    if "patch_dim" not in raw or (wants_summary and "summary_dim" not in raw):
        try:
            summary_dim, patch_dim = _measure(module, raw["image_size"], spec.text)
        except (RuntimeError, NotImplementedError) as err:  # a module the meta device cannot run: measure on CPU
            try:
                summary_dim, patch_dim = _measure(_build(fn, pretrained=False, text=spec.text), raw["image_size"],
                                                  spec.text)
            except Exception:
                raise RegistryError(
                    f"teacher spec {spec.text!r}: measuring the token widths with a test forward pass failed ({err}); "
                    "give patch_dim (and summary_dim) in the spec or in unic_card"
                ) from None
        raw.setdefault("patch_dim", patch_dim)
        raw.setdefault("summary_dim", summary_dim)
        raw.setdefault("tokens", ["summary", "patch"] if raw["summary_dim"] else ["patch"])
    return TeacherCard.from_dict(raw, origin=f"teacher spec {spec.text!r}")
