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
import re
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from unic_cli.config import DistillConfig
from unic_cli.devices import memory_advice, out_of_memory, resolve_device
from unic_cli.errors import TrainingError

log = logging.getLogger("unic_cli")

PARTS = ("teachers", "student", "loss", "backward", "optimizer")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets, keyed by the words of
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"): a row matches when the name
# holds all its words, whole (so L40 is not L4, nor A10G A10); more specific rows come first.
BF16_PEAK_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM
    (("GH200",), 989e12),
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),
    (("B200",), 2250e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("A10",), 125e12),
    (("RTX", "4090"), 165e12),
)


def bf16_peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name (None when it is not in `BF16_PEAK_FLOPS`)."""
    words = {w.lower() for w in re.split(r"[^0-9A-Za-z]+", device_name) if w}
    for key, peak in BF16_PEAK_FLOPS:
        if all(k.lower() in words for k in key):
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
    images_BCHW = torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g)
    if torch.cuda.is_available():
        images_BCHW = images_BCHW.pin_memory()
    while True:
        yield Batch(images_BCHW, 0)


def _host_peak_bytes() -> int:
    # ru_maxrss: kilobytes on Linux, bytes on macOS; the peak of the whole process so far
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def run_bench(config: DistillConfig, *, warmup: int = 2, batch_sizes: tuple[int, ...] = (),
              profile_dir: Path | None = None) -> dict:
    """Time `config.steps` training steps after `warmup` untimed ones; returns the measurements as a dict.

    Args:
        config: any distill configuration; teachers are built with random weights whatever it says.
        warmup: untimed steps first (allocator, autotuning, `--compile`).
        batch_sizes: per-process batch sizes to try, in the given order, on the same built models; the first
            out-of-memory ends the sweep. The result is the fastest that fits, with every trial in `sweep`.
        profile_dir: then one more step at the fastest batch size under torch.profiler (`profile_step`).
    """
    from dataclasses import replace

    from unic_cli import distributed, train_step
    from unic_cli.distributed import dist_info
    from unic_cli.plan import flops_per_image

    config = replace(config, random_init_teachers=True)
    dist = dist_info()
    device, created = distributed.setup(dist, resolve_device(config.device), fsdp=config.fsdp)
    try:
        t_build = time.perf_counter()
        tr = train_step.build_trainer(config, device, dist, init_on_device=True)
        build_s = time.perf_counter() - t_build
        flops = flops_per_image(config)
        results = []
        for i, batch_size in enumerate(batch_sizes or (config.batch_size,)):
            if config.compile and i > 0:
                # Each size compiled for its own shapes, as a run at that size is. Otherwise torch.compile
                # recompiles the second size with a dynamic batch dimension and reuses that graph for every later
                # size, timing kernels that no run uses.
                torch.compiler.reset()
            tr.config = replace(config, batch_size=batch_size)
            try:
                results.append(_time_steps(tr, warmup, flops))
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if (what := out_of_memory(err)) is None:
                    raise
                log.warning("batch size %d does not fit on %s (%s)", batch_size, device, what)
                results.append({"batch_size": batch_size, "oom": True})
                break
            finally:
                tr.optimizer.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        fitting = [r for r in results if not r.get("oom")]
        if not fitting:
            raise TrainingError(f"batch size {results[0]['batch_size']} does not fit on {device} ({what}); "
                                + memory_advice(results[0]["batch_size"], config.grad_accum_steps,
                                                fp32_student=not tr.core.student_bf16, bench_hint=False))
        best = {**max(fitting, key=lambda r: r["images_per_sec"]), "build_sec": build_s}
        if profile_dir is not None:
            tr.config = replace(config, batch_size=best["batch_size"])
            profile = profile_step(tr, profile_dir)
            if dist.is_main:
                best["profile"] = profile
    finally:
        distributed.teardown(created)
    return {**best, "sweep": results} if batch_sizes else best


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
        "teacher_dtype": {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(tr.teacher_dtype, str(tr.teacher_dtype)),
        "student_dtype": "bf16" if tr.core.student_bf16 else "fp32",
        "compile": config.compile,
        "compile_mode": config.compile_mode if config.compile else None,
        "fsdp": config.fsdp,
        "loss": float(stats.loss),
    }
    # null off a known GPU (the CPU included): every result has the same keys
    peak = bf16_peak_flops(result["device"]) if device.type == "cuda" else None
    result["bf16_peak_flops"] = peak
    result["mfu"] = achieved / (peak * dist.world_size) if peak else None
    return result


# Kernel (GPU) or operator (CPU) names by kind, the first match wins: inductor's fused elementwise/reduction
# kernels (on the CPU they run inside a compiled graph's call, whose self time they are), attention (cuDNN's
# SDPA backward helpers included), copies, fills and cuDNN's layout transposes, matrix products (cuBLAS
# nvjet/xmma, CUTLASS, inductor's mm templates, cuDNN convolutions, aten mm/bmm/addmm/baddbmm/linear and
# convolutions on the CPU), collectives.
_KINDS = (
    ("fused elementwise", re.compile(r"^triton_(?:poi|red|per)_|^cpp_fused_|^## Call CompiledFxGraph")),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|scaled_dot_product|dot_do_o|convert_dq_to", re.I)),
    ("memcpy/memset", re.compile(r"^Memcpy|^Memset|^aten::(?:copy_|fill_|zero_)$|nchwToNhwc|nhwcToNchw", re.I)),
    ("matmul", re.compile(r"gemm|nvjet|xmma|cutlass|cublas|cudnn|triton_tem_|"
                          r"aten::(?:mm|bmm|addmm|baddbmm|linear|matmul|[a-z_]*convolution)$", re.I)),
    ("communication", re.compile(r"nccl|gloo|all_?reduce|all_?gather|reduce_?scatter", re.I)),
)


def kernel_kind(name: str) -> str:
    """The kind of one profiled GPU kernel or CPU op (`_KINDS`), or "other"."""
    return next((kind for kind, pattern in _KINDS if pattern.search(name)), "other")


def profiled_costs(events, cuda: bool) -> list[tuple[str, float, int]]:
    """(name, seconds, count) of each profiled kernel (`cuda`) or CPU operator, costliest first.

    User ranges are left out on both: the step's parts (`record_function`) also appear on the GPU as
    annotations spanning their kernels (counting them counted the step's 0.74 s as 1.98 s on an H100), and
    on the CPU they hold only Python time."""
    if cuda:  # kernels, copies and fills: their self time is GPU time, nothing counted twice
        picked = [(e.key, e.self_device_time_total, e.count) for e in events
                  if e.device_type.name == "CUDA" and not e.is_user_annotation]
    else:
        picked = [(e.key, e.self_cpu_time_total, e.count) for e in events if not e.is_user_annotation]
    return sorted(((name, us / 1e6, n) for name, us, n in picked if us > 0), key=lambda c: -c[1])


def profile_step(tr, out_dir: Path) -> dict:
    """One training step (batch size `tr.config.batch_size`) under torch.profiler.

    Writes `out_dir/trace.json` (the timeline with the step's parts as ranges, for Perfetto or
    chrome://tracing), `out_dir/ops.txt` (the 50 costliest ops or kernels) and `out_dir/ops_by_shape.txt` (the
    50 costliest operators by input shapes: which tensors an eager copy or fill touches); returns the total GPU
    kernel time (CPU: self time of every op, all threads) and its split by `kernel_kind`, with the 15 costliest
    names.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    from unic_cli import train_step
    from unic_cli.plan import load_size

    config, device = tr.config, tr.device
    cuda = device.type == "cuda"
    batches = _synthetic_batches(config.batch_size, load_size(config.image_size, tr.teachers), config.seed)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    tr.optimizer.zero_grad(set_to_none=True)
    with profile(activities=activities, record_shapes=True) as prof:
        with record_function("unic_step"):
            stats = train_step.forward_backward(tr, batches, config.ema_momentum_end, record_function)
            if torch.isfinite(stats.loss):
                train_step.optimizer_step(tr, record_function)
        if cuda:
            torch.cuda.synchronize(device)
    tr.optimizer.zero_grad(set_to_none=True)
    out_dir = Path(out_dir) / (f"rank{tr.dist.rank}" if tr.dist.world_size > 1 else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    trace, table = out_dir / "trace.json", out_dir / "ops.txt"
    prof.export_chrome_trace(str(trace))
    events = prof.key_averages()
    costs = profiled_costs(events, cuda)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table.write_text(events.table(sort_by=sort_by, row_limit=50))
    (out_dir / "ops_by_shape.txt").write_text(
        prof.key_averages(group_by_input_shape=True).table(sort_by=sort_by, row_limit=50, max_name_column_width=40,
                                                           max_shapes_column_width=100))
    by_kind = defaultdict(float)
    for name, sec, _ in costs:
        by_kind[kernel_kind(name)] += sec
    return {
        "batch_size": config.batch_size,
        "clock": "GPU kernel time" if cuda else "CPU op self time, all threads",
        "total_sec": sum(sec for _, sec, _ in costs),
        "by_kind_sec": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top": [{"name": name[:160], "sec": sec, "count": n} for name, sec, n in costs[:15]],
        "trace": str(trace),
        "table": str(table),
    }
