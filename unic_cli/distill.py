"""run(config): the whole distillation loop, top to bottom.

Shape legend: B batch, C channels, H/W pixels, T teachers, M metric columns (losses.METRIC_COLUMNS).

One optimiser step: for each micro-batch, uint8 images go to the device, every frozen teacher produces its tokens
(no_grad), the student and ladder predict them, the standardised targets give per-(teacher, image) losses,
teacher dropping (Eq. 4) weights them, and the loss is back-propagated; then one non-finite check, optional
clipping, and the AdamW step. Metrics stay on the device and reach the host only every `log_every` steps.

Under torchrun every process runs this same loop on its shard of each global batch (`--batch-size` is per
process): the trainable model is wrapped in DDP (or FSDP2 with `fsdp`), standardisation moments, the loss and
the logged metrics are averaged over processes, teacher dropping draws for the global batch, and only rank 0
writes the run folder. The step itself (`build_trainer`, `forward_backward`, `optimizer_step`) lives in
`unic_cli.train_step`, shared with `unic bench`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from unic_cli import __version__
from unic_cli.checkpoint import (find_checkpoint, load_checkpoint, remove_stale_temporaries, restore_rng_states,
                                 rng_states, save_checkpoint)
from unic_cli.config import DistillConfig, tomllib
from unic_cli.devices import memory_advice, out_of_memory, resolve_device
from unic_cli import distributed
from unic_cli.distributed import all_reduce_mean_, dist_info
from unic_cli.errors import ConfigError, TrainingError
from unic_cli.files import atomic_write
from unic_cli.losses import METRIC_COLUMNS
from unic_cli.schedule import default_warmup_steps, ema_momentum, learning_rate
from unic_cli.train_step import build_trainer, forward_backward, global_batch_size, optimizer_step

log = logging.getLogger("unic_cli")

# Fields that change shapes or the meaning of saved state: a resumed run must keep them.
# The batch may be split differently (processes x batch size x accumulation); the global batch must stay.
_FIXED_ON_RESUME = ("teachers", "student", "image_size", "shared_heads", "ladder_blocks", "ladder_hidden",
                    "ladder_last_hidden", "standardize", "seed")
# --skip-nonfinite gives up after this many non-finite steps in a row: the run has diverged, not hiccuped.
MAX_CONSECUTIVE_SKIPS = 20
# A repeat of SIGINT/SIGTERM this soon after the first is the launcher forwarding it, not a user insisting.
REPEAT_SIGNAL_GRACE_S = 3.0
_RUN_FILES = ("config.toml", "metrics.jsonl", "run.json", "losses.png", "teacher_coefficients.png")


class DistillHooks:
    """Callbacks for progress display (the CLI attaches a rich progress bar); the library never prints."""

    def on_start(self, *, start_step: int, total_steps: int, info: dict) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_log(self, metrics: dict) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...


@dataclass
class RunResult:
    """What `run` returns.

    Attributes:
        run_dir: the run folder (config.toml, metrics.jsonl, run.json, plots, checkpoints/).
        step: optimiser steps done; `total_steps` when the run finished.
        total_steps: the run's length in optimiser steps.
        status: "done", or "interrupted" (SIGINT/SIGTERM: the run stopped at a step boundary and saved a
            checkpoint; `run(config, resume=True)` continues it).
        checkpoint: the last checkpoint written (None if none was).
        last_metrics: the last metrics.jsonl line: step, loss, lr, images_per_sec, and per teacher
            (`teachers["t0"]`, ...) its losses and teacher-dropping coefficient.
        signal_name: the signal that stopped the run ("SIGINT", "SIGTERM"), else None.
    """

    run_dir: Path
    step: int
    total_steps: int
    status: str  # "done" or "interrupted"
    checkpoint: Path | None
    last_metrics: dict = field(default_factory=dict)
    signal_name: str | None = None


def total_steps(config: DistillConfig, loader_steps_per_epoch: int) -> tuple[int, int]:
    """(optimiser steps in the run, optimiser steps per epoch)."""
    per_epoch = max(1, loader_steps_per_epoch // config.grad_accum_steps)
    if config.steps is not None:
        return config.steps, per_epoch
    return (config.epochs or DistillConfig.DEFAULT_EPOCHS) * per_epoch, per_epoch


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary. A second signal kills, unless
    it comes within `repeat_grace_s` of the first: under torchrun a Ctrl-C (the terminal signals the whole
    process group) or a SLURM signal (sent to every process of the job step) reaches each worker twice, directly
    and forwarded by torchrun a moment later, and that echo must not kill the final checkpoint."""

    def __init__(self, repeat_grace_s: float = REPEAT_SIGNAL_GRACE_S) -> None:
        self.signal_name: str | None = None
        self.repeat_grace_s = repeat_grace_s
        self._first_at = 0.0
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signal_name is None:
            self.signal_name, self._first_at = signal.Signals(signum).name, now
            return
        if now - self._first_at < self.repeat_grace_s:  # the launcher's echo of the first signal
            return
        old = self._old.get(signum, signal.SIG_DFL)  # a deliberate second signal acts as if we were not here
        signal.signal(signum, old)
        if callable(old):
            old(signum, frame)  # Python's SIGINT handler: KeyboardInterrupt
        elif old == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _RunLock:
    """An exclusive lock on a run folder (`RUN/.unic.lock`, flock: released by the kernel if the process dies), so a
    second `unic distill` on the same --out (a `--resume` while the run still trains) is refused."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".unic.lock"
        self.fd: int | None = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # no flock on this platform: run unlocked
            return self
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise ConfigError(f"run folder {str(self.path.parent)!r} is in use by {holder}; wait for it to "
                                  "end, or choose another --out") from None
            except OSError as err:  # a filesystem without locks (some network mounts): run unlocked
                log.debug("cannot lock %s (%s): running without a lock", self.path, err)
                break
            # The holder unlinks .unic.lock when it ends: if that happened between our open and our flock, we hold a
            # lock on a file no longer at RUN/.unic.lock, which a third process would not see; open the new one.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def _open(self) -> int:
        try:  # O_NOFOLLOW: a symlink planted at RUN/.unic.lock must not make us truncate the file it points to
            return os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            link = " (a symbolic link: unic does not follow it; remove it)" if self.path.is_symlink() else ""
            raise ConfigError(f"cannot open the lock file {str(self.path)!r}: {err.strerror or err}{link}") from None

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None


def _run_started(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run that reached a step: a checkpoint or a logged step. A lone config.toml or
    run.json is what a start that failed (bad teacher, bad data) leaves behind, and is simply replaced."""
    folder = run_dir / "checkpoints"
    has_ckpt = folder.is_dir() and any(folder.glob("*.pt"))
    metrics = run_dir / "metrics.jsonl"
    return has_ckpt or (metrics.is_file() and metrics.stat().st_size > 0)


def _prepare_run_dir(config: DistillConfig, *, resume: bool, overwrite: bool,
                     world_size: int = 1) -> tuple[dict | None, list[Path]]:
    """Check the run folder: (the checkpoint to resume from, or None; the earlier run's files to delete).

    Nothing is deleted here: `_clear_run_files` runs once the new run's data, teachers and student are built,
    so a mistake in the new command (a teacher typo, an empty folder) never costs the earlier run.
    """
    run_dir = config.out_dir
    if resume:
        ckpt = _load_resume_checkpoint(run_dir)
        saved = DistillConfig.from_dict(ckpt["config"])
        problems = [f"--resume: {k} was {getattr(saved, k)!r}, now {getattr(config, k)!r}; a resumed run must keep "
                    f"it" for k in _FIXED_ON_RESUME if getattr(saved, k) != getattr(config, k)]
        saved_global = ckpt["scheduler"].get("global_batch", global_batch_size(saved, 1))
        if saved_global != global_batch_size(config, world_size):
            per_process = saved_global // (world_size * config.grad_accum_steps)
            problems.append(f"--resume: the global batch was {saved_global} images, now {config.batch_size} x "
                            f"{config.grad_accum_steps} accumulation x {world_size} process(es) = "
                            f"{global_batch_size(config, world_size)}; keep it, e.g. --batch-size {per_process}")
        if config.steps is not None and config.steps < ckpt["step"]:
            problems.append(f"--resume: --steps {config.steps} is below the checkpoint's step {ckpt['step']}; "
                            f"give --steps {ckpt['step']} or more")
        if problems:
            raise ConfigError(problems)
        return ckpt, []
    earlier = [*(run_dir / p for p in (*_RUN_FILES, "checkpoints") if (run_dir / p).exists()),
               *run_dir.glob("config.until_step_*.toml")]
    at_risk = [p for p in earlier if not p.is_dir() or any(p.glob("*.pt"))]  # _clear_run_files deletes these
    if at_risk and not _is_run_folder(run_dir):
        # --overwrite replaces an earlier run, never files of an unrelated folder (`--out ~` holding a
        # config.toml, or a checkpoints/ folder of another project's .pt files)
        names = [p.name + ("/*.pt" if p.is_dir() else "") for p in at_risk]
        raise ConfigError(f"--out {str(run_dir)!r} is not a unic run folder (its config.toml is missing or not "
                          f"a `unic distill` config), yet holds {', '.join(names)}, which a run would replace; "
                          "unic refuses to, even with --overwrite; choose a new or empty --out")
    if _run_started(run_dir) and not overwrite:
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a run (checkpoints or metrics.jsonl); pass "
                          "--resume to continue it, --overwrite to replace it, or choose another --out")
    return None, earlier


class _AllocationFailure:
    """`with failure:` swallows an allocation failure (CUDA's OutOfMemoryError, the CPU allocator's RuntimeError)
    and keeps its first sentence in `failure.what`; anything else passes. The caller raises its TrainingError
    after the block, outside any exception handling, so that it carries no context: the allocation error's
    traceback holds the failed step's tensors, which a Python caller that catches the TrainingError (and retries
    with a smaller batch) must get back."""

    def __init__(self) -> None:
        self.what: str | None = None

    def __enter__(self) -> _AllocationFailure:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and (what := out_of_memory(exc)) is not None:
            self.what = what
            return True
        return False


def _out_of_memory_message(tr, step: int, last_ckpt: Path | None, what: str) -> str:
    """An allocation failure in the training loop: the step, the last checkpoint and what to change."""
    config = tr.config
    saved = (f"continue from {last_ckpt} with --resume and the new flags" if last_ckpt else
             "no checkpoint was written yet")
    return (f"out of memory at step {step + 1} on {tr.device} with {config.batch_size} images per process "
            f"({what}); {saved}; " + memory_advice(config.batch_size, config.grad_accum_steps,
                                                   fp32_student=not tr.core.student_bf16))


def _auto_resume(run_dir: Path, overwrite: bool) -> tuple[bool, bool]:
    """`resume="auto"` -> (resume, overwrite): resume when the folder holds a checkpoint; otherwise start, and
    replace what an earlier run that never checkpointed left (its config and logs: nothing to resume from).
    `_prepare_run_dir` still refuses a folder that is not a unic run folder."""
    if overwrite:
        raise ConfigError("--auto-resume and --overwrite contradict each other: --auto-resume continues the run in "
                          "--out when it has a checkpoint; drop one of them")
    if find_checkpoint(run_dir) is not None:
        return True, False
    if _run_started(run_dir):
        log.warning("auto-resume: %s has no checkpoint to resume from; starting the run again (replacing its "
                    "metrics.jsonl)", run_dir)
    return False, True


def _is_run_folder(run_dir: Path) -> bool:
    """Whether `run_dir/config.toml` is a `unic distill` config (what every run writes before its first step):
    only then may a new run replace the folder's run files."""
    try:
        raw = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    if "command" in raw:  # what every run writes (fields of other unic versions may differ)
        return raw["command"] == DistillConfig.command
    return raw.keys() <= {f.name for f in dataclasses.fields(DistillConfig)} | {"unic_version"}


def _load_resume_checkpoint(run_dir: Path) -> dict:
    """The newest readable checkpoint of `run_dir`: a damaged `last.pt` (a disk that filled up, a copy cut short)
    falls back to the newest readable `step_*.pt`, with a warning naming both."""
    from unic_cli.errors import CheckpointError

    if find_checkpoint(run_dir) is None:
        raise ConfigError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}; drop --resume to start")
    try:
        return load_checkpoint(run_dir)
    except CheckpointError as err:
        damaged = err
    for path in sorted((run_dir / "checkpoints").glob("step_*.pt"), reverse=True):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError:
            continue
        log.warning("%s; resuming from %s (step %d), the newest readable checkpoint", damaged, path, ckpt["step"])
        return ckpt
    raise damaged


def _clear_run_files(paths: list[Path]) -> None:
    """--overwrite: delete the earlier run (its checkpoints and its logs)."""
    for path in paths:
        if path.is_dir():
            for f in path.glob("*.pt"):  # half-written temporaries: remove_stale_temporaries, right after
                f.unlink(missing_ok=True)
        else:
            path.unlink(missing_ok=True)


def _config_changes(saved: DistillConfig, config: DistillConfig) -> dict[str, tuple]:
    """Fields a resumed run changed (out_dir aside): they apply from the checkpoint's step on."""
    old, new = saved.to_dict(), config.to_dict()
    return {k: (old.get(k), v) for k, v in new.items() if k != "out_dir" and old.get(k) != v}


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metrics.jsonl lines logged after the checkpoint (about to be redone), and lines that do
    not parse (a write cut short by a crash or a full disk), with a warning."""
    kept, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            bad += 1
    if bad:
        log.warning("%s: dropped %d unreadable line(s)", path, bad)
    _write_text_atomic(path, "".join(f"{ln}\n" for ln in kept))


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def _metrics_line(step, loss, metrics_TM, coeff_T, config, lr, momentum, window) -> dict:
    """Host-side metrics for one logging step (this is the loop's only regular host sync besides the check)."""
    def finite(v: float) -> float | None:  # JSON has no NaN: a missing token type or a skipped step is null
        return v if math.isfinite(v) else None

    rows, coeffs = metrics_TM.tolist(), coeff_T.tolist()
    teachers = {f"t{i}": {"name": spec, **{k: finite(v) for k, v in zip(METRIC_COLUMNS, rows[i])}, "coeff": coeffs[i]}
                for i, spec in enumerate(config.teachers)}
    return {"step": step, "loss": finite(float(loss)), "lr": lr, "ema_momentum": momentum, **window,
            "teachers": teachers}


def run(config: DistillConfig, *, resume: bool | Literal["auto"] = False, overwrite: bool = False,
        hooks: DistillHooks | None = None, timer=None) -> RunResult:
    """Distill `config.teachers` into `config.student` on `config.data_dir`, writing the run to `config.out_dir`.

    Under torchrun, every process calls this; it joins (and leaves) the process group itself.

    Args:
        resume: continue exactly from `out_dir/checkpoints/last.pt` (onto any number of processes that keeps
            the global batch). "auto": continue if `out_dir` holds a checkpoint, else start the run (replacing
            the logs of an earlier run that never reached its first checkpoint): one command that both starts
            and restarts a run, for `torchrun --max-restarts` and requeued jobs.
        overwrite: replace an earlier run in `out_dir`.
        hooks: progress callbacks (see DistillHooks); called on rank 0 only.
        timer: optional `timer(name)` context manager wrapped around each part of a step (teachers, student,
            loss, backward, optimizer): a hook for benchmarks; the default does nothing.
    """
    config.validate()  # a config built directly (not by from_sources) is checked here, before anything loads
    if resume not in (True, False, "auto"):
        raise ConfigError(f"resume={resume!r}: give True, False or 'auto'")
    dist = dist_info()
    device, created = distributed.setup(dist, resolve_device(config.device), fsdp=config.fsdp)
    # the run seeds torch's global generators (student init, drop path): the caller's streams come back after
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            return _run(config, dist, device, resume=resume, overwrite=overwrite, hooks=hooks, timer=timer)
    finally:
        distributed.teardown(created)


def _run(config, dist, device, *, resume, overwrite, hooks, timer) -> RunResult:
    # config.toml and checkpoints keep an absolute data path: `--resume` or `--config RUN/config.toml` then work
    # from any working directory (a requeued job, a new shell)
    config = dataclasses.replace(config, data_dir=Path(os.path.abspath(config.data_dir)))
    run_dir = config.out_dir
    created = dist.is_main and not run_dir.exists()
    try:
        with contextlib.ExitStack() as stack:
            problems = None
            if dist.is_main:  # one process decides about the run folder; the others follow its verdict
                try:
                    try:
                        run_dir.mkdir(parents=True, exist_ok=True)
                    except OSError as err:
                        raise ConfigError(f"cannot create --out {str(run_dir)!r}: {err.strerror or err}") from None
                    stack.enter_context(_RunLock(run_dir))
                    if resume == "auto":  # decided under the lock: no second process can checkpoint meanwhile
                        resume, overwrite = _auto_resume(run_dir, overwrite)
                    ckpt, earlier_run = _prepare_run_dir(config, resume=resume, overwrite=overwrite,
                                                         world_size=dist.world_size)
                except ConfigError as err:
                    problems = err.problems
                    raise
                finally:
                    distributed.broadcast_object((problems, resume))
            else:
                problems, resume = distributed.broadcast_object(None)
                if problems is not None:
                    raise ConfigError(problems)
                ckpt, earlier_run = (_load_resume_checkpoint(run_dir) if resume else None), []
            return _train(config, dist, device, ckpt, earlier_run, hooks=hooks, timer=timer)
    except BaseException:
        if created:  # a start that failed (a teacher typo, bad data) leaves no empty folder behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()
        raise


def _restore(ckpt: dict, tr, loader, config: DistillConfig, dist) -> tuple[int, Path, dict, dict]:
    """Resume the random streams and the data position from `ckpt` (the weights were loaded when the trainer was
    built); rank 0 also keeps the earlier settings a resume changed and trims metrics.jsonl to the checkpoint.
    Returns (step, checkpoint path, its last metrics line, the run's counters on this rank)."""
    restore_rng_states(ckpt["rng"], tr.generator)
    if dist.rank > 0:  # rank 0's saved stream, re-seeded per rank: stochastic depth must differ by rank
        torch.manual_seed(config.seed + dist.rank + 7919 * ckpt["step"])
    loader.load_state_dict(ckpt["data"])
    step = ckpt["step"]
    saved_counters = ckpt.get("counters") or {}
    counters = {"skipped_images": 0, "skipped_steps": 0}
    # skipped images are counted per rank and summed when logged: rank 0 carries the saved total
    counters.update(saved_counters if dist.is_main else {"skipped_steps": saved_counters.get("skipped_steps", 0)})
    if dist.is_main:
        run_dir = config.out_dir
        saved = DistillConfig.from_dict(ckpt["config"])
        if changes := _config_changes(saved, config):
            kept = run_dir / f"config.until_step_{step:07d}.toml"
            _write_text_atomic(kept, saved.to_toml())
            log.warning("changed on resume, from step %d on: %s (the earlier settings: %s)", step,
                        ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()), kept)
        if (run_dir / "metrics.jsonl").exists():
            _trim_metrics(run_dir / "metrics.jsonl", step)
    return step, Path(ckpt["path"]), ckpt.get("last_metrics") or {}, counters


def _train(config, dist, device, ckpt, earlier_run, *, hooks, timer) -> RunResult:
    from unic_cli.data import open_train_source
    from unic_cli.data.loader import steps_per_epoch as loader_steps_per_epoch
    from unic_cli.errors import DataError
    from unic_cli.plan import describe, ladder_meta, train_loader
    from unic_cli.plots import plot_run

    hooks = hooks if hooks is not None and dist.is_main else DistillHooks()
    timer = timer or (lambda name: contextlib.nullcontext())
    run_dir = config.out_dir
    # the data first: an empty or too small folder is reported before any teacher is downloaded or built
    source = open_train_source(config.data_dir, batch_size=config.batch_size, world_size=dist.world_size,
                               accum_steps=config.grad_accum_steps)
    if ckpt is not None:  # a finished run: say so before building (or downloading) any teacher
        planned, _ = total_steps(config, loader_steps_per_epoch(len(source), config.batch_size * dist.world_size,
                                                                config.grad_accum_steps))
        if ckpt["step"] >= planned:
            last_metrics = ckpt.get("last_metrics") or {}
            log.info("%s already finished at step %d/%d (loss %s); nothing to do", run_dir, ckpt["step"], planned,
                     last_metrics.get("loss"))
            return RunResult(run_dir, ckpt["step"], planned, "done", Path(ckpt["path"]), last_metrics)
    with (failure := _AllocationFailure()):
        tr = build_trainer(config, device, dist, ckpt)
    if failure.what is not None:
        raise TrainingError(f"out of memory building the student, its ladder and the teachers on {device} "
                            f"({failure.what}); `unic distill --dry-run` with the same flags lists their sizes: "
                            "check --student, --ladder-hidden, --ladder-last-hidden and the teachers")
    loader = train_loader(config, tr.teachers, rank=dist.rank, world_size=dist.world_size, source=source)
    num_steps, steps_per_epoch = total_steps(config, loader.steps_per_epoch)
    info = describe(config, tr.core, tr.teachers)
    global_batch = global_batch_size(config, dist.world_size)
    peak_lr, fsdp = tr.peak_lr, config.fsdp
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(num_steps)

    metrics_path = run_dir / "metrics.jsonl"
    if ckpt is None:
        start_step, last_ckpt, last_metrics = 0, None, {}
        counters = {"skipped_images": 0, "skipped_steps": 0}
    else:
        start_step, last_ckpt, last_metrics, counters = _restore(ckpt, tr, loader, config, dist)
        log.info("resuming %s at step %d/%d on %d process(es)", run_dir, start_step, num_steps, dist.world_size)
        del ckpt  # free the host copy of the weights
    if dist.is_main:  # everything is built: only now may an earlier run (--overwrite) go
        _clear_run_files(earlier_run)
        if stale := remove_stale_temporaries(run_dir):  # a save killed mid-write (kill -9, out of memory)
            log.warning("removed %d half-written checkpoint file(s) of an interrupted save: %s", len(stale),
                        ", ".join(p.name for p in stale))
        _write_text_atomic(run_dir / "config.toml", config.to_toml())
        _write_text_atomic(run_dir / "run.json", json.dumps({**info, "total_steps": num_steps}, indent=2) + "\n")

    def run_counters() -> dict:
        """The counters of the whole run (every rank calls this: skipped images are summed over ranks)."""
        [skipped_images] = distributed.all_reduce_sum([counters["skipped_images"]])
        return {**counters, "skipped_images": skipped_images}

    def checkpoint(step: int, last_metrics: dict, data_state: dict | None = None) -> Path | None:
        # With FSDP every rank takes part in gathering the full tensors; rank 0 writes.
        core = tr.core
        total_counters = run_counters()
        student_state = distributed.full_state_dict(core.student.model, fsdp)
        ladder_state = distributed.full_state_dict(core.ladder, fsdp)
        optimizer_state = distributed.full_optimizer_state(tr.optimizer, fsdp)
        if not dist.is_main:
            return None
        payload = {
            "format": "unic-checkpoint", "format_version": 1, "unic_version": __version__, "step": step,
            "config": config.to_dict(), "teachers": [t.card.to_dict() for t in tr.teachers],
            "teacher_specs": list(config.teachers),
            "student": {"name": core.student.name, "model_args": core.student.model_args,
                        "state_dict": student_state, "image_size": core.student.image_size,
                        "patch_size": core.student.patch_size, "mean": list(core.student.mean),
                        "std": list(core.student.std), "interpolation": core.student.interpolation},
            "ladder": ladder_state, "ladder_meta": ladder_meta(config, core),
            "standardizers": core.standardizers.state_dict() if core.standardizers is not None else {},
            "optimizer": optimizer_state,
            "scheduler": {"step": step, "total_steps": num_steps, "peak_lr": peak_lr, "warmup_steps": warmup,
                          "global_batch": global_batch, "world_size": dist.world_size},
            "rng": rng_states(tr.generator), "data": data_state or loader.state_dict(), "last_metrics": last_metrics,
            "counters": total_counters,
        }
        path = save_checkpoint(payload, run_dir, keep=config.keep_checkpoints)
        hooks.on_checkpoint(path)
        return path

    batches = iter(loader)
    hooks.on_start(start_step=start_step, total_steps=num_steps, info=info)
    log.info("distilling %d teacher(s) into %s: %d steps of %d images (%d process(es)), peak lr %.2e, on %s",
             len(tr.teachers), config.student, num_steps, global_batch, dist.world_size, peak_lr, device)
    tr.model.train()
    window = {"t0": time.perf_counter(), "images": 0}
    consecutive_skips = 0
    step = start_step
    stopping = False
    with _StopRequest() as stop, (failure := _AllocationFailure()):
        while step < num_steps and not stopping:
            lr = learning_rate(step, peak_lr=peak_lr, min_lr=config.min_lr, warmup_steps=warmup, total_steps=num_steps)
            momentum = ema_momentum(step, total_steps=num_steps, start=config.ema_momentum_start,
                                    end=config.ema_momentum_end)
            for group in tr.optimizer.param_groups:
                group["lr"] = lr
            tr.optimizer.zero_grad(set_to_none=True)
            data_state = loader.state_dict()  # this step boundary, for a checkpoint if the data fails mid-step
            try:
                # the stop flag is read after the micro-batches: a signal during this step stops after it
                stats = forward_backward(tr, batches, momentum, timer, lambda: stop.signal_name is not None)
            except DataError as err:  # e.g. the data vanished mid-run (a mount lost): keep what was trained
                if dist.world_size > 1 or step == start_step:
                    raise
                path = checkpoint(step, last_metrics, data_state)
                raise DataError(f"{err}; the run was saved at step {step} ({path}): fix the data and continue "
                                "with --resume") from None
            counters["skipped_images"] += stats.num_skipped
            window["images"] += stats.num_images * dist.world_size
            # The one per-step host sync: a non-finite loss must never reach the weights.
            loss_value, stop_votes = torch.stack([stats.loss, stats.stop]).tolist()
            stopping = stop_votes > 0
            if stopping and stop.signal_name is None:
                stop.signal_name = "SIGTERM"  # another process was signalled: stop at the same step
            if not math.isfinite(loss_value):
                where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                if not config.skip_nonfinite:
                    raise TrainingError(f"loss is {loss_value} at step {step + 1}; {where}. Lower --base-lr, "
                                        "set --grad-clip, or pass --skip-nonfinite to skip such steps.")
                consecutive_skips += 1
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise TrainingError(f"loss is non-finite at {consecutive_skips} steps in a row (steps "
                                        f"{step + 2 - consecutive_skips}-{step + 1}): the run has diverged; {where}. "
                                        "Lower --base-lr or set --grad-clip.")
                log.warning("loss is %s at step %d: step skipped", loss_value, step + 1)
                counters["skipped_steps"] += 1
                tr.optimizer.zero_grad(set_to_none=True)
            else:
                consecutive_skips = 0
                optimizer_step(tr, timer)
            step += 1
            hooks.on_step(step)
            if step % config.log_every == 0 or step == num_steps or stopping:
                all_reduce_mean_(stats.metrics_TM)
                all_reduce_mean_(stats.coeff_T)
                elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                extra = {"epoch": step / steps_per_epoch, "images_per_sec": window["images"] / elapsed,
                         **run_counters()}
                last_metrics = _metrics_line(step, stats.loss, stats.metrics_TM, stats.coeff_T, config, lr, momentum,
                                             extra)
                if dist.is_main:
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(last_metrics) + "\n")
                hooks.on_log(last_metrics)
                window = {"t0": time.perf_counter(), "images": 0}
            if step % config.checkpoint_every == 0 or step == num_steps or stopping:
                last_ckpt = checkpoint(step, last_metrics) or last_ckpt
    if failure.what is not None:
        raise TrainingError(_out_of_memory_message(tr, step, last_ckpt, failure.what))
    if dist.is_main:
        plot_run(run_dir)
    distributed.barrier()  # the plots and the last checkpoint exist before any process returns
    status = "interrupted" if step < num_steps else "done"
    if last_ckpt is None and dist.world_size > 1:  # only rank 0 writes; the others read where it did
        last_ckpt = find_checkpoint(run_dir)
    if status == "interrupted" and dist.is_main:
        log.warning("%s at step %d/%d; checkpoint %s. Continue with --resume.", stop.signal_name, step,
                    num_steps, last_ckpt)
    return RunResult(run_dir, step, num_steps, status, last_ckpt, last_metrics, stop.signal_name)

