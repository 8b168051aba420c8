"""run_bench(config): time the real training step of any `unic distill` configuration, random weights only.

The step is `train_step.forward_backward` + `optimizer_step`, exactly what a run executes (teachers in their
precision, student and ladder, standardisation and losses, teacher dropping, backward, the non-finite check,
AdamW), on random-init teachers and student (nothing is downloaded: every model is built from its library's
config). Images are a fixed random uint8 batch (pinned when CUDA is available and copied to the device every
step, as the loader's batches are), unless `config.data_dir` is given: then the real loader feeds the step and
decoding is included.

Reported: seconds per step and images/s (the mean over the timed steps, one host sync per step, as in a run),
peak host and device memory, the split between teacher forward, student forward, loss, backward and optimizer
(CUDA events on a GPU, so splitting costs no extra syncs), FLOPs per image (torch.utils.flop_counter on the meta
device: teachers forward + 3x student and ladder forward), achieved FLOP/s and, on a known GPU, the model FLOPs
utilisation against its dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import resource
import sys
import time
from collections import defaultdict

import torch

from unic_cli.config import DistillConfig

log = logging.getLogger("unic_cli")

PARTS = ("teachers", "student", "loss", "backward", "optimizer")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets; the first matching
# substring of torch.cuda.get_device_name() wins, so the more specific names come first.
BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name (None when it is not in `BF16_PEAK_FLOPS`)."""
    for key, peak in BF16_PEAK_FLOPS:
        if key in device_name:
            return peak
    return None


class _Timer:
    """`timer(name)` for distill's step: wall time on the CPU, CUDA events (read after the run) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.wall: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, object, object]] = []
        self.enabled = False

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.wall[name] += time.perf_counter() - t0

    def totals(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.events:
                self.wall[name] += start.elapsed_time(end) / 1000
            self.events.clear()
        return {name: self.wall.get(name, 0.0) for name in PARTS}


def _synthetic_batches(batch_size: int, image_size: int, seed: int):
    from unic_cli.data import Batch

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    if torch.cuda.is_available():
        images = images.pin_memory()
    while True:
        yield Batch(images, 0)


def _host_peak_bytes() -> int:
    # ru_maxrss: kilobytes on Linux, bytes on macOS; the peak of the whole process so far
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def run_bench(config: DistillConfig, *, warmup: int = 2, batch_sizes: tuple[int, ...] = ()) -> dict:
    """Time `config.steps` training steps after `warmup` untimed ones; returns the measurements as a dict.

    Args:
        config: any distill configuration; teachers are built with random weights whatever it says.
        warmup: untimed steps first (allocator, autotuning, `--compile`).
        batch_sizes: per-process batch sizes to try, in the given order, on the same built models; the first
            out-of-memory ends the sweep. The result is the fastest that fits, with every trial in `sweep`.
    """
    from dataclasses import replace

    from unic_cli import distill, distributed, train_step
    from unic_cli.distributed import dist_info

    config = replace(config, random_init_teachers=True)
    dist = dist_info()
    device, created = distributed.setup(dist, distill.resolve_device(config.device), fsdp=config.fsdp)
    try:
        t_build = time.perf_counter()
        tr = train_step.build_trainer(config, device, dist, init_on_device=True)
        build_s = time.perf_counter() - t_build
        flops = _flops_per_image(config)
        results = []
        for batch_size in batch_sizes or (config.batch_size,):
            tr.config = replace(config, batch_size=batch_size)
            try:
                results.append(_time_steps(tr, warmup, flops))
            except torch.OutOfMemoryError:
                log.warning("batch size %d does not fit on %s", batch_size, device)
                results.append({"batch_size": batch_size, "oom": True})
                break
            finally:
                tr.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        distributed.teardown(created)
    fitting = [r for r in results if not r.get("oom")]
    if not fitting:
        raise torch.OutOfMemoryError(f"batch size {results[0]['batch_size']} does not fit on {device}")
    best = {**max(fitting, key=lambda r: r["images_per_sec"]), "build_sec": build_s}
    return {**best, "sweep": results} if batch_sizes else best


def _flops_per_image(config: DistillConfig) -> dict:
    from unic_cli.plan import flops_per_image

    return flops_per_image(config)


def _time_steps(tr, warmup: int, flops: dict) -> dict:
    from unic_cli import train_step
    from unic_cli.plan import load_size, train_loader
    from unic_cli.schedule import ema_momentum

    config, device, dist = tr.config, tr.device, tr.dist
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if config.data_dir is not None:
        batches = iter(train_loader(config, tr.teachers, rank=dist.rank, world_size=dist.world_size))
    else:
        batches = _synthetic_batches(config.batch_size, load_size(config.image_size, tr.teachers), config.seed)
    timer = _Timer(device)
    tr.model.train()
    num_steps = config.steps or 5
    step_times = []
    for step in range(warmup + num_steps):
        timer.enabled = step >= warmup
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_timed = time.perf_counter()
        t0 = time.perf_counter()
        tr.optimizer.zero_grad(set_to_none=True)
        momentum = ema_momentum(step, total_steps=warmup + num_steps, start=config.ema_momentum_start,
                                end=config.ema_momentum_end)
        stats = train_step.forward_backward(tr, batches, momentum, timer)
        if torch.isfinite(stats.loss):  # the run's one host sync per step
            train_step.optimizer_step(tr, timer)
        step_times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sec_per_step = (time.perf_counter() - t_timed) / num_steps
    split = timer.totals()
    global_batch = config.batch_size * config.grad_accum_steps * dist.world_size
    images_per_sec = global_batch / sec_per_step
    achieved = flops["train_step"] * images_per_sec  # all processes together
    device_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({torch.get_num_threads()} threads)",
        "world_size": dist.world_size,
        "batch_size": config.batch_size,
        "global_batch": global_batch,
        "steps": num_steps,
        "warmup": warmup,
        "sec_per_step": sec_per_step,
        "sec_per_step_min": min(step_times[warmup:]),
        "images_per_sec": images_per_sec,
        "split_sec_per_step": {k: v / num_steps for k, v in split.items()},
        "peak_mem_bytes": device_peak if device_peak is not None else _host_peak_bytes(),
        "peak_host_mem_bytes": _host_peak_bytes(),
        "peak_device_mem_bytes": device_peak,
        "flops_per_image": flops,
        "flops_per_step": flops["train_step"] * global_batch,
        "achieved_flops_per_sec": achieved,
        "teacher_dtype": str(tr.teacher_dtype).removeprefix("torch."),
        "student_dtype": "bf16" if tr.core.student_bf16 else "fp32",
        "compile": config.compile,
        "fsdp": config.fsdp,
        "loss": float(stats.loss),
    }
    if device.type == "cuda":
        peak = bf16_peak_flops(result["device"])
        result["bf16_peak_flops"] = peak
        result["mfu"] = achieved / (peak * dist.world_size) if peak else None
    return result
