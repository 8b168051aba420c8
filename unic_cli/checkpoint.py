"""save/load unic checkpoints: atomic, plain types only (`torch.load(weights_only=True)`), with RNG states.

Layout of a run folder: `checkpoints/step_XXXXXXX.pt` plus `checkpoints/last.pt` (a hard link to, or copy of,
the newest). The payload's keys are the contract that `unic export` reads (`unic_cli.export.read_checkpoint`
checks them).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from unic_cli.errors import CheckpointError
from unic_cli.files import atomic_write

log = logging.getLogger("unic_cli")

FORMAT = "unic-checkpoint"
FORMAT_VERSION = 1
LAST = "last.pt"


def checkpoint_dir(run_dir: Path) -> Path:
    """The folder of a run's checkpoints: `RUN/checkpoints`."""
    return Path(run_dir) / "checkpoints"


def _atomic_torch_save(obj: dict, path: Path) -> None:
    with atomic_write(path, durable=True) as f:  # the rename must never expose a half-written file after a crash
        torch.save(obj, f)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the half-written `.*.tmp*` files a killed save left in `checkpoints/` (call with the run folder
    locked, so that no live save is among them); returns what was removed."""
    folder = checkpoint_dir(run_dir)
    stale = sorted(folder.glob(".*.tmp*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(payload: dict, run_dir: Path, *, keep: int = 0) -> Path:
    """Write `checkpoints/step_XXXXXXX.pt` atomically, point `last.pt` at it, keep the newest `keep` (0: all)."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{payload['step']:07d}.pt"
    _atomic_torch_save(payload, path)
    tmp_last = folder / f".{LAST}.tmp{os.getpid()}"
    tmp_last.unlink(missing_ok=True)
    try:
        os.link(path, tmp_last)  # no second copy on disk when the filesystem allows hard links
    except OSError:
        shutil.copyfile(path, tmp_last)
    os.replace(tmp_last, folder / LAST)
    _fsync_dir(folder)
    if keep > 0:
        for old in sorted(folder.glob("step_*.pt"))[:-keep]:
            old.unlink()
    return path


def find_checkpoint(path: Path) -> Path | None:
    """A checkpoint file, or a run folder / its checkpoints folder -> the newest checkpoint (None if none)."""
    path = Path(path)
    if path.is_file():
        return path
    for folder in (checkpoint_dir(path), path):
        if (folder / LAST).is_file():
            return folder / LAST
        steps = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
        if steps:
            return steps[-1]
    return None


def load_checkpoint(path: Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a unic checkpoint (file or run folder) with `weights_only=True`, checking its format."""
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no unic checkpoint at {str(path)!r} (looked for checkpoints/{LAST} and step_*.pt)")
    try:
        ckpt = torch.load(found, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a corrupt or foreign file; all mean "unreadable"
        from unic_cli.teachers.weights import unsafe_pickle_reason

        # torch's own text for a refused pickle is long and suggests weights_only=False: never for a foreign file
        reason = unsafe_pickle_reason(err) or err
        raise CheckpointError(f"{str(found)!r} is not a readable checkpoint: {reason}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{str(found)!r} is not a `unic distill` checkpoint (no format={FORMAT!r})")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{str(found)!r} has format version {ckpt['format_version']}; this unic reads "
                              f"up to {FORMAT_VERSION}; upgrade unic-cli")
    ckpt["path"] = str(found)
    return ckpt


def rng_states(generator: torch.Generator | None) -> dict:
    """Every random state the loop consumes: torch CPU, CUDA devices, and the teacher-drop generator."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["teacher_drop"] = generator.get_state()
    return state


def restore_rng_states(state: dict, generator: torch.Generator | None) -> None:
    """Put back what `rng_states` saved; CUDA states only where CUDA is available."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "teacher_drop" in state:
        generator.set_state(state["teacher_drop"])
