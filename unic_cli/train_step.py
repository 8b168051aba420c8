"""The training step that `unic distill` runs and `unic bench` times: build it, then one optimiser step.

Shape legend: B batch, C channels, H/W pixels, T teachers, M metric columns (losses.METRIC_COLUMNS).

One optimiser step: for each micro-batch, uint8 images go to the device and every frozen teacher produces its
tokens (no_grad, in its weights' dtype); the standardisation statistics take the step's moments once (every
micro-batch, every process); then for each micro-batch the student and ladder predict the tokens, the
standardised targets give per-(teacher, image) losses, teacher dropping (Eq. 4) weights them, and the loss is
back-propagated; then one reduction of the loss and the stop flag across processes (the step's only
host-visible result), optional clipping, and the AdamW step. So k micro-batches train exactly like one batch of
k*b (statistics included); they hold the step's teacher tokens at once (about 1.4 MB per image for dinov2_g and
metaclip_h in bf16). Under torchrun the trainable model is wrapped in DDP (or FSDP2 with `fsdp`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unic_cli import distributed
from unic_cli.config import DistillConfig
from unic_cli.distributed import DistInfo, all_reduce_mean_
from unic_cli.errors import ConfigError
from unic_cli.losses import teacher_drop_coefficients, weighted_loss
from unic_cli.teachers.base import TeacherTokens


CUDA_GRAPH_MODES = ("max-autotune", "reduce-overhead")  # torch.compile modes that capture CUDA graphs


def global_batch_size(config: DistillConfig, world_size: int) -> int:
    return config.batch_size * config.grad_accum_steps * world_size


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on norms, biases, position embeddings and cls/register tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or any(k in name for k in ("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class Trainer:
    """What one training step needs; built by `build_trainer` for both `run` and `unic bench`."""

    config: DistillConfig
    device: torch.device
    dist: DistInfo
    model: torch.nn.Module  # what the step calls: the DistillModel, its DDP wrapper, or itself FSDP-sharded
    core: torch.nn.Module  # the DistillModel itself
    teachers: list
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    teacher_dtype: torch.dtype
    peak_lr: float


def build_trainer(config: DistillConfig, device: torch.device, dist: DistInfo, ckpt: dict | None = None, *,
                  init_on_device: bool = False) -> Trainer:
    """Student, teachers, ladder and standardisers on `device`, wrapped for data parallelism, with AdamW.

    Seeds the global RNG: `config.seed` while building, so every rank builds identical modules (random
    teachers are never broadcast, FSDP shards without a broadcast); then ranks > 0 switch to their own stream
    `config.seed + rank` (drop path), while rank 0 continues its stream as a single process does.

    Args:
        ckpt: restores the weights, statistics and optimiser (onto any number of processes).
        init_on_device: initialise random teachers directly on `device` (fast for 1B-parameter models, but
            a different random stream than a host-side initialisation; `unic bench` uses it).
    """
    from unic_cli.plan import build_model, build_teachers, compile_parts, resolve_dtypes
    from unic_cli.registry import TeacherCard
    from unic_cli.student import build_student

    global_batch = global_batch_size(config, dist.world_size)
    peak_lr = config.base_lr * global_batch / 256
    if not math.isfinite(peak_lr):  # a --base-lr near the float limit, times the global batch
        raise ConfigError(f"--base-lr {config.base_lr} x a global batch of {global_batch} / 256 overflows; "
                          "AdamW learning rates are around 1e-4 to 1e-3")
    teacher_dtype, student_bf16 = resolve_dtypes(config, device)
    torch.manual_seed(config.seed)
    # a resumed run keeps the student's architecture and the teacher cards it started with (saved in every checkpoint)
    student = build_student(config.student, image_size=config.image_size, drop_path_rate=config.drop_path_rate,
                            model_args=ckpt["student"]["model_args"] if ckpt is not None else None)
    cards = [TeacherCard.from_dict(c, origin="checkpoint") for c in ckpt["teachers"]] if ckpt is not None else None
    teachers = build_teachers(config, student.grid, device, teacher_dtype, init_on_device=init_on_device,
                              cards=cards)
    core = build_model(config, teachers, student, student_bf16=student_bf16).to(device)
    if dist.rank > 0:
        torch.manual_seed(config.seed + dist.rank)
    if ckpt is not None and not config.fsdp:
        _load_weights(core, ckpt)
    if config.compile:
        compile_parts(core, teachers, config.compile_mode)
    model = distributed.wrap(core, device, fsdp=config.fsdp)
    if ckpt is not None and config.fsdp:
        _load_weights(core, ckpt, fsdp=True)
    # fused AdamW: one kernel for all parameters instead of a dozen per tensor, on CUDA. On the CPU the default
    # multi-tensor path measured faster (0.3 s vs 1.2 s per step for a 53M-parameter ladder on 2 threads).
    optimizer = torch.optim.AdamW(param_groups(core, config.weight_decay), lr=peak_lr, betas=tuple(config.betas),
                                  fused=device.type == "cuda" or None)
    if ckpt is not None:
        distributed.load_optimizer_state(optimizer, ckpt["optimizer"], config.fsdp)
    # One teacher-dropping stream, identical on every rank (see teacher_drop_coefficients)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    return Trainer(config, device, dist, model, core, teachers, optimizer, generator, teacher_dtype, peak_lr)


def _load_weights(core, ckpt: dict, fsdp: bool = False) -> None:
    distributed.load_full_state_dict(core.student.model, ckpt["student"]["state_dict"], fsdp)
    distributed.load_full_state_dict(core.ladder, ckpt["ladder"], fsdp)
    if core.standardizers is not None:
        core.standardizers.load_state_dict(ckpt["standardizers"])


@dataclass
class StepStats:
    """One optimiser step's device-side results (no host sync has happened yet)."""

    loss: torch.Tensor  # averaged over micro-batches and processes
    stop: torch.Tensor  # > 0 when any process was asked to stop (reduced with the loss: one collective)
    metrics_TM: torch.Tensor
    coeff_T: torch.Tensor
    num_images: int
    num_skipped: int


def forward_backward(tr: Trainer, batches, momentum: float, timer,
                     stop_requested: Callable[[], bool] = lambda: False) -> StepStats:
    """Every micro-batch of one optimiser step: teachers, student, losses, backward (gradients accumulate).

    `stop_requested` is asked after the last micro-batch (a signal during the step stops the run after it)."""
    config, dist = tr.config, tr.dist
    accum = config.grad_accum_steps
    loss_sum = metrics_sum_TM = coeff_sum_T = 0.0
    num_images = num_skipped = 0
    cuda_graphs = config.compile and config.compile_mode in CUDA_GRAPH_MODES
    micro_images, own_offset = config.batch_size * dist.world_size, config.batch_size * dist.rank
    draws_TG = None
    if cuda_graphs and accum > 1:
        _grads_outside_cuda_graphs(tr.core)
    step_inputs = []  # (images on the device, every teacher's tokens) per micro-batch
    for micro in range(accum):
        if cuda_graphs:  # a new iteration: earlier graph outputs are consumed or copied, their memory may be reused
            torch.compiler.cudagraph_mark_step_begin()
        batch = next(batches)
        num_skipped += batch.num_skipped
        num_images += len(batch.images_BCHW)
        if micro == 0 and config.teacher_drop_prob > 0:  # after the first batch: a data error draws nothing
            # One draw for every image of the optimiser step (all micro-batches, all processes); micro-batch m of
            # rank r keeps the columns of its images, so k micro-batches of b drop exactly what one batch of k*b
            # drops (not k draws laid out per micro-batch), and a resume may re-split the global batch.
            draws_TG = torch.rand((len(tr.teachers), micro_images * accum), generator=tr.generator,
                                  device=tr.device)
        images_BCHW = batch.images_BCHW.to(tr.device, non_blocking=True)
        with timer("teachers"):  # each teacher runs in its weights' dtype (Teacher.forward)
            targets = [teacher(images_BCHW) for teacher in tr.teachers]
            if cuda_graphs and accum > 1:  # a graph's next replay overwrites its outputs: keep a copy
                targets = [TeacherTokens(*(None if t is None else t.clone() for t in tokens)) for tokens in targets]
        step_inputs.append((images_BCHW, targets))
    with timer("loss"):  # the statistics see the whole step before any of it is standardised
        tr.core.update_standardizers([targets for _, targets in step_inputs], momentum)
    for micro, (images_BCHW, targets) in enumerate(step_inputs):
        if cuda_graphs and micro > 0:  # the previous micro-batch's student outputs are consumed
            torch.compiler.cudagraph_mark_step_begin()
        # DDP all-reduces gradients only on the last micro-batch
        sync = micro == accum - 1 or not hasattr(tr.model, "no_sync")
        with contextlib.nullcontext() if sync else tr.model.no_sync():
            with timer("student"):
                preds = tr.model(images_BCHW)
            with timer("loss"):
                out = tr.core.losses(preds, targets)  # standardised with the step's statistics
                alpha_TB = teacher_drop_coefficients(out.loss_TB, config.teacher_drop_prob, tr.generator,
                                                     draws_TG=draws_TG, offset=micro_images * micro + own_offset)
                loss = weighted_loss(out.loss_TB, alpha_TB)
            with timer("backward"):
                (loss / accum).backward()
        loss_sum = loss_sum + loss.detach() / accum
        metrics_sum_TM = metrics_sum_TM + out.metrics_TM / accum
        coeff_sum_T = coeff_sum_T + alpha_TB.mean(dim=1) / accum
        step_inputs[micro] = None  # this micro-batch's images and targets are no longer needed
    # every rank must take the same finite/non-finite branch and stop at the same step
    loss_sum = loss_sum.float()
    check_2 = all_reduce_mean_(torch.stack([loss_sum, loss_sum.new_full((), float(stop_requested()))]))  # no H2D copy
    return StepStats(check_2[0], check_2[1], metrics_sum_TM, coeff_sum_T, num_images, num_skipped)


def _grads_outside_cuda_graphs(model: torch.nn.Module) -> None:
    """Give every trainable parameter without a gradient a zero one, allocated outside the CUDA graphs.

    Under CUDA graphs a compiled backward's gradients live in the graphs' memory pool, and autograd keeps the
    first micro-batch's as `.grad` without a copy; the next micro-batch's replay then overwrites them ("accessing
    tensor output of CUDAGraphs that has been overwritten", seen on an H100 with `--compile-mode
    reduce-overhead --grad-accum-steps 2`). With `.grad` already allocated, autograd adds every micro-batch's
    gradient into it. Existing gradients are kept (accumulated onto, as without CUDA graphs)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def optimizer_step(tr: Trainer, timer) -> None:
    with timer("optimizer"):
        if tr.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(tr.core.parameters(), tr.config.grad_clip)
        tr.optimizer.step()
