"""run(config): the whole distillation loop, top to bottom.

Shape legend: B batch, C channels, H/W pixels, T teachers, M metric columns (losses.METRIC_COLUMNS).

One optimiser step: for each micro-batch, uint8 images go to the device, every frozen teacher produces its tokens
(no_grad), the student and ladder predict them, the standardised targets give per-(teacher, image) losses,
teacher dropping (Eq. 4) weights them, and the loss is back-propagated; then one non-finite check, optional
clipping, and the AdamW step. Metrics stay on the device and reach the host only every `log_every` steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from unic_cli import __version__
from unic_cli.checkpoint import find_checkpoint, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from unic_cli.config import DistillConfig
from unic_cli.distributed import dist_info
from unic_cli.errors import ConfigError, TrainingError
from unic_cli.losses import METRIC_COLUMNS, teacher_drop_coefficients, weighted_loss
from unic_cli.schedule import default_warmup_steps, ema_momentum, learning_rate

log = logging.getLogger("unic_cli")

# Fields that change shapes or the meaning of saved state: a resumed run must keep them.
_FIXED_ON_RESUME = ("teachers", "student", "image_size", "shared_heads", "ladder_blocks", "ladder_hidden",
                    "ladder_last_hidden", "standardize", "batch_size", "grad_accum_steps", "seed")
_RUN_FILES = ("config.toml", "metrics.jsonl", "run.json", "losses.png", "teacher_coefficients.png")


class DistillHooks:
    """Callbacks for progress display (the CLI attaches a rich progress bar); the library never prints."""

    def on_start(self, *, start_step: int, total_steps: int, info: dict) -> None: ...
    def on_step(self, step: int) -> None: ...
    def on_log(self, metrics: dict) -> None: ...
    def on_checkpoint(self, path: Path) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    step: int
    total_steps: int
    status: str  # "done" or "interrupted"
    checkpoint: Path | None
    last_metrics: dict = field(default_factory=dict)
    signal_name: str | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def total_steps(config: DistillConfig, loader_steps_per_epoch: int) -> tuple[int, int]:
    """(optimiser steps in the run, optimiser steps per epoch)."""
    per_epoch = max(1, loader_steps_per_epoch // config.grad_accum_steps)
    if config.steps is not None:
        return config.steps, per_epoch
    return (config.epochs or DistillConfig.DEFAULT_EPOCHS) * per_epoch, per_epoch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position embeddings and cls/register tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary. A second signal kills."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # the next one acts immediately

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _prepare_run_dir(config: DistillConfig, *, resume: bool, overwrite: bool) -> dict | None:
    """Create the run folder; return the checkpoint to resume from, refusing to clobber an earlier run."""
    run_dir = config.out_dir
    if resume:
        ckpt = load_checkpoint(run_dir) if find_checkpoint(run_dir) else None
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {str(run_dir / 'checkpoints')!r}; drop --resume to start")
        saved = DistillConfig.from_dict(ckpt["config"])
        changed = [k for k in _FIXED_ON_RESUME if getattr(saved, k) != getattr(config, k)]
        if changed:
            raise ConfigError([f"--resume: {k} was {getattr(saved, k)!r}, now {getattr(config, k)!r}; a resumed run "
                               f"must keep it" for k in changed])
        return ckpt
    used = [p for p in (*_RUN_FILES, "checkpoints") if (run_dir / p).exists()]
    if used and not overwrite:
        raise ConfigError(f"run folder {str(run_dir)!r} already holds a run ({', '.join(used)}); pass --resume to "
                          "continue it, --overwrite to replace it, or choose another --out")
    for name in used:
        path = run_dir / name
        if path.is_dir():
            for f in path.glob("*.pt"):
                f.unlink()
        else:
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _metrics_line(step, loss, metrics_TM, coeff_T, config, lr, momentum, window) -> dict:
    """Host-side metrics for one logging step (this is the loop's only regular host sync besides the check)."""
    def finite(v: float) -> float | None:  # JSON has no NaN: a missing token type or a skipped step is null
        return v if math.isfinite(v) else None

    rows, coeffs = metrics_TM.tolist(), coeff_T.tolist()
    teachers = {f"t{i}": {"name": spec, **{k: finite(v) for k, v in zip(METRIC_COLUMNS, rows[i])}, "coeff": coeffs[i]}
                for i, spec in enumerate(config.teachers)}
    return {"step": step, "loss": finite(float(loss)), "lr": lr, "ema_momentum": momentum, **window,
            "teachers": teachers}


def run(config: DistillConfig, *, resume: bool = False, overwrite: bool = False,
        hooks: DistillHooks | None = None, timer=None) -> RunResult:
    """Distill `config.teachers` into `config.student` on `config.data_dir`, writing the run to `config.out_dir`.

    Args:
        resume: continue exactly from `out_dir/checkpoints/last.pt`.
        overwrite: replace an earlier run in `out_dir`.
        hooks: progress callbacks (see DistillHooks).
        timer: optional `timer(name)` context manager wrapped around each part of a step (teachers, student,
            backward, optimizer): a hook for benchmarks; the default does nothing.
    """
    from unic_cli.data import build_train_loader
    from unic_cli.plan import build_model, build_teachers, describe, ladder_meta
    from unic_cli.plots import plot_run
    from unic_cli.student import build_student

    hooks, timer = hooks or DistillHooks(), timer or (lambda name: contextlib.nullcontext())
    dist, device = dist_info(), resolve_device(config.device)
    ckpt = _prepare_run_dir(config, resume=resume, overwrite=overwrite)
    run_dir = config.out_dir
    _write_text_atomic(run_dir / "config.toml", config.to_toml())
    torch.manual_seed(config.seed + dist.rank)

    loader = build_train_loader(config.data_dir, image_size=config.image_size, batch_size=config.batch_size,
                                num_workers=config.num_workers, seed=config.seed, rank=dist.rank,
                                world_size=dist.world_size, augment=config.augment)
    num_steps, steps_per_epoch = total_steps(config, loader.steps_per_epoch)
    student = build_student(config.student, image_size=config.image_size, drop_path_rate=config.drop_path_rate)
    teachers = build_teachers(config, student.grid, device)
    model = build_model(config, teachers, student).to(device)
    info = describe(config, model, teachers)
    _write_text_atomic(run_dir / "run.json", json.dumps({**info, "total_steps": num_steps}, indent=2) + "\n")
    global_batch = config.batch_size * config.grad_accum_steps * dist.world_size
    peak_lr = config.base_lr * global_batch / 256
    warmup = config.warmup_steps if config.warmup_steps is not None else default_warmup_steps(num_steps)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=peak_lr, betas=tuple(config.betas))
    generator = torch.Generator(device=device).manual_seed(config.seed + 1_000_003 * dist.rank)

    start_step, last_ckpt, metrics_path = 0, None, run_dir / "metrics.jsonl"
    if ckpt is not None:
        student.model.load_state_dict(ckpt["student"]["state_dict"])
        model.ladder.load_state_dict(ckpt["ladder"])
        if model.standardizers is not None:
            model.standardizers.load_state_dict(ckpt["standardizers"])
        optimizer.load_state_dict(ckpt["optimizer"])
        restore_rng_states(ckpt["rng"], generator)
        loader.load_state_dict(ckpt["data"])
        start_step, last_ckpt = ckpt["step"], Path(ckpt["path"])
        if metrics_path.exists():  # drop lines logged after the checkpoint: they are about to be redone
            lines = metrics_path.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start_step]
            _write_text_atomic(metrics_path, "".join(f"{ln}\n" for ln in kept))
        log.info("resuming %s at step %d/%d", run_dir, start_step, num_steps)
        del ckpt  # free the host copy of the weights

    def checkpoint(step: int, last_metrics: dict) -> Path:
        payload = {
            "format": "unic-checkpoint", "format_version": 1, "unic_version": __version__, "step": step,
            "config": config.to_dict(), "teachers": [t.card.to_dict() for t in teachers],
            "teacher_specs": list(config.teachers),
            "student": {"name": student.name, "model_args": student.model_args,
                        "state_dict": student.model.state_dict(), "image_size": student.image_size,
                        "patch_size": student.patch_size, "mean": list(student.mean), "std": list(student.std),
                        "interpolation": student.interpolation},
            "ladder": model.ladder.state_dict(), "ladder_meta": ladder_meta(config, model),
            "standardizers": model.standardizers.state_dict() if model.standardizers is not None else {},
            "optimizer": optimizer.state_dict(),
            "scheduler": {"step": step, "total_steps": num_steps, "peak_lr": peak_lr, "warmup_steps": warmup},
            "rng": rng_states(generator), "data": loader.state_dict(), "last_metrics": last_metrics,
        }
        path = save_checkpoint(payload, run_dir, keep=config.keep_checkpoints)
        hooks.on_checkpoint(path)
        return path

    batches = iter(loader)
    hooks.on_start(start_step=start_step, total_steps=num_steps, info=info)
    log.info("distilling %d teacher(s) into %s: %d steps of %d images, peak lr %.2e, on %s",
             len(teachers), config.student, num_steps, global_batch, peak_lr, device)
    model.train()
    last_metrics: dict = {}
    window = {"t0": time.perf_counter(), "images": 0}
    skipped_images = skipped_steps = 0
    step = start_step
    with _StopRequest() as stop:
        while step < num_steps and stop.signal_name is None:
            lr = learning_rate(step, peak_lr=peak_lr, min_lr=config.min_lr, warmup_steps=warmup, total_steps=num_steps)
            momentum = ema_momentum(step, total_steps=num_steps, start=config.ema_momentum_start,
                                    end=config.ema_momentum_end)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = metrics_sum_TM = coeff_sum_T = 0.0
            for _ in range(config.grad_accum_steps):
                with torch.random.fork_rng(devices=[]):  # the DataLoader draws its worker seed from the global
                    batch = next(batches)                  # RNG on first use: keep that off the training stream
                skipped_images += batch.num_skipped
                window["images"] += len(batch.images_BCHW)
                images_BCHW = batch.images_BCHW.to(device, non_blocking=True)
                with timer("teachers"):
                    targets = [teacher(images_BCHW) for teacher in teachers]
                with timer("student"):
                    out = model(images_BCHW, targets, momentum)
                    alpha_TB = teacher_drop_coefficients(out.loss_TB, config.teacher_drop_prob, generator)
                    loss = weighted_loss(out.loss_TB, alpha_TB)
                with timer("backward"):
                    (loss / config.grad_accum_steps).backward()
                loss_sum = loss_sum + loss.detach() / config.grad_accum_steps
                metrics_sum_TM = metrics_sum_TM + out.metrics_TM / config.grad_accum_steps
                coeff_sum_T = coeff_sum_T + alpha_TB.mean(dim=1) / config.grad_accum_steps
            # The one per-step host sync: a non-finite loss must never reach the weights.
            if not torch.isfinite(loss_sum):
                if not config.skip_nonfinite:
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingError(f"loss is {float(loss_sum)} at step {step + 1}; {where}. Lower --base-lr, "
                                        "set grad_clip, or pass --skip-nonfinite to skip such steps.")
                log.warning("loss is %s at step %d: step skipped", float(loss_sum), step + 1)
                skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
            else:
                with timer("optimizer"):
                    if config.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
            step += 1
            hooks.on_step(step)
            if step % config.log_every == 0 or step == num_steps or stop.signal_name:
                elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                stats = {"epoch": step / steps_per_epoch, "images_per_sec": window["images"] / elapsed,
                         "skipped_images": skipped_images, "skipped_steps": skipped_steps}
                last_metrics = _metrics_line(step, loss_sum, metrics_sum_TM, coeff_sum_T, config, lr, momentum, stats)
                if dist.is_main:
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(last_metrics) + "\n")
                hooks.on_log(last_metrics)
                window = {"t0": time.perf_counter(), "images": 0}
            if dist.is_main and (step % config.checkpoint_every == 0 or step == num_steps or stop.signal_name):
                last_ckpt = checkpoint(step, last_metrics)
    if dist.is_main:
        plot_run(run_dir)
    status = "interrupted" if step < num_steps else "done"
    if status == "interrupted":
        log.warning("%s at step %d/%d; checkpoint %s. Continue with --resume.", stop.signal_name, step,
                    num_steps, last_ckpt)
    return RunResult(run_dir, step, num_steps, status, last_ckpt, last_metrics, stop.signal_name)
