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
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from unic_cli.errors import RegistryError, UnicError, UnknownTeacherError
from unic_cli.registry import TeacherCard, TeacherSpec, card_problems, convert_overrides
from unic_cli.teachers.weights import load_into, read_state_dict, resolve_weights_ref

log = logging.getLogger("unic_cli")

_REQUIRED = ("image_size", "patch_size", "mean", "std")


def _load_callable(target: str, text: str):
    module_name, sep, attr = target.rpartition(":")
    if not sep or not module_name or not attr:
        raise UnknownTeacherError(f"teacher spec {text!r}: expected py:MODULE:CALLABLE, e.g. py:my_pkg.models:build")
    name = module_name
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
    except UnknownTeacherError:
        raise
    except ModuleNotFoundError as err:
        sys.modules.pop(name, None)
        raise UnknownTeacherError(
            f"teacher spec {text!r}: cannot import {module_name!r} ({err}); is it installed or on PYTHONPATH?"
        ) from None
    except Exception as err:  # user code: a syntax error, or anything raised at import time
        sys.modules.pop(name, None)
        log.debug("importing %s failed", module_name, exc_info=err)
        raise UnknownTeacherError(
            f"teacher spec {text!r}: importing {module_name!r} failed: {_describe(err)}"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UnknownTeacherError(f"teacher spec {text!r}: {module_name!r} has no callable {attr!r}")
    return fn


def _describe(err: BaseException) -> str:
    """`Type: message`, with the file and line of a syntax error (`unic -v` logs the traceback)."""
    if isinstance(err, SyntaxError):
        return f"SyntaxError: {err.msg} ({Path(err.filename or '?').name}, line {err.lineno})"
    return f"{type(err).__name__}: {err}"


def _takes_pretrained(fn) -> bool:
    try:
        return "pretrained" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


def _needs_arguments(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name != "pretrained" for p in params)


def _call(fn, *, pretrained: bool):
    """Run the user's callable as it is (its errors propagate: the meta-device attempt relies on that)."""
    return fn(pretrained=pretrained) if _takes_pretrained(fn) else fn()


def _build(fn, *, pretrained: bool, text: str, module=None) -> nn.Module:
    """Call the user's callable (unless `module` is already built) and check that it returned an nn.Module."""
    if module is None:
        try:
            module = _call(fn, pretrained=pretrained)
        except UnicError:
            raise
        except Exception as err:  # user code; -v shows the traceback
            log.debug("calling the teacher callable failed", exc_info=err)
            name = getattr(fn, "__name__", "the callable")
            hint = " (the callable must take no arguments, or only `pretrained=`)" if _needs_arguments(fn) else ""
            raise UnknownTeacherError(
                f"teacher spec {text!r}: calling {name}() failed: {_describe(err)}{hint}"
            ) from err
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


def _shape(x) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def contract_problem(summary, patch, batch_size: int) -> str | None:
    """Why (summary, patch) breaks the contract (summary [B, Ds]; patch [B, N, Dp] or [B, Dp, h, w]), or None."""
    ok_patch = isinstance(patch, torch.Tensor) and patch.ndim in (3, 4) and patch.shape[0] == batch_size
    ok_summary = summary is None or (isinstance(summary, torch.Tensor) and summary.ndim == 2
                                     and summary.shape[0] == batch_size)
    if ok_patch and ok_summary:
        return None
    return (f"forward returned summary {_shape(summary) if summary is not None else None}, patch {_shape(patch)} "
            f"for a batch of {batch_size}; the contract is summary [B, Ds] (or none) and patch [B, N, Dp] or "
            "[B, Dp, h, w], with B the batch size")


def _patch_tokens(patch: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int] | None]:
    if patch.ndim == 4:
        return patch.flatten(2).transpose(1, 2), (patch.shape[-2], patch.shape[-1])
    return patch, None


class PyTeacher(nn.Module):
    """A user module as a Backbone; shapes are checked against the contract and the card on every call (no host
    sync)."""

    def __init__(self, card: TeacherCard, module: nn.Module) -> None:
        super().__init__()
        self.card = card
        self.module = module

    def forward_tokens(self, images_BCHW: torch.Tensor):
        summary_BD, patch = split_output(self.module(images_BCHW), self.card.alias)
        problem = contract_problem(summary_BD, patch, images_BCHW.shape[0])
        if problem:
            raise RegistryError(f"teacher {self.card.alias!r}: {problem}")
        patch_BND, grid = _patch_tokens(patch)
        if grid is None:
            H, W = images_BCHW.shape[-2:]
            grid = self.card.grid_for((H, W))
            floor_grid = (H // self.card.patch_size, W // self.card.patch_size)  # a ConvNet whose stem floors
            if patch_BND.shape[1] != grid[0] * grid[1] and patch_BND.shape[1] == floor_grid[0] * floor_grid[1]:
                grid = floor_grid
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
    problem = contract_problem(summary, patch, 1)
    if problem:
        raise RegistryError(f"teacher spec {text!r}: {problem}")
    return (None if summary is None else int(summary.shape[-1])), int(patch.shape[1 if patch.ndim == 4 else -1])


def card_from_spec(spec: TeacherSpec) -> TeacherCard:
    """A card for `py:MODULE:CALLABLE` from the module's `unic_card` and the spec's overrides."""
    fn = _load_callable(spec.target, spec.text)
    try:  # the meta device builds and runs the module without memory or compute; user code may not allow it
        with torch.device("meta"):
            module = _call(fn, pretrained=False)
    except Exception:  # anything user code raises on meta: build it for real, where errors are reported
        module = None
    on_meta = module is not None
    module = _build(fn, pretrained=False, text=spec.text, module=module)
    declared = getattr(module, "unic_card", None) or {}
    if not isinstance(declared, Mapping):
        raise RegistryError(f"teacher spec {spec.text!r}: unic_card must be a dict, got {type(declared).__name__}")
    origin = f"teacher spec {spec.text!r}"
    problems = card_problems(dict(declared))
    if problems:
        raise RegistryError(f"{origin}: unic_card: " + "; ".join(problems))
    raw = {"license": "unknown", **declared, **convert_overrides(spec.overrides, origin=origin),
           "alias": spec.name, "source": "py", "model_id": spec.target}
    missing = [f for f in _REQUIRED if f not in raw]
    if missing:
        example = "&".join(f"{f}=..." for f in missing)
        raise RegistryError(
            f"teacher spec {spec.text!r} needs {', '.join(missing)}: add them to the spec "
            f"('{spec.name}?{example}', lists comma-separated) or set `unic_card = {{...}}` on the module"
        )
    problems = card_problems(raw)  # before the test forward pass, which needs a valid image_size
    if problems:
        raise RegistryError(f"{origin}: " + "; ".join(problems))
    wants_summary = "summary" in raw.get("tokens", ("summary",))
    if "patch_dim" not in raw or (wants_summary and "summary_dim" not in raw):
        try:
            summary_dim, patch_dim = _measure(module, raw["image_size"], spec.text)
        except UnicError:
            raise
        except Exception as err:
            if not on_meta:
                raise _measure_error(spec.text, err) from err
            try:  # a module the meta device cannot run: measure on the CPU
                summary_dim, patch_dim = _measure(_build(fn, pretrained=False, text=spec.text), raw["image_size"],
                                                  spec.text)
            except UnicError:
                raise
            except Exception as err:
                raise _measure_error(spec.text, err) from err
        raw.setdefault("patch_dim", patch_dim)
        raw.setdefault("summary_dim", summary_dim)
        raw.setdefault("tokens", ["summary", "patch"] if raw["summary_dim"] else ["patch"])
    return TeacherCard.from_dict(raw, origin=origin)


def _measure_error(text: str, err: BaseException) -> RegistryError:
    log.debug("test forward pass of %s failed", text, exc_info=err)
    return RegistryError(
        f"teacher spec {text!r}: measuring the token widths with a test forward pass failed ({_describe(err)}); "
        "fix the module, or give patch_dim (and summary_dim) in the spec or in unic_card"
    )
