"""DistillModel (student + ladder + standardisers), module building, and the `--dry-run` plan.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D student width, E a teacher's width, T teachers.

`build_teachers` and `build_model` are shared by the real run and by `plan_distillation`, which builds the same
modules on the meta device (no weights, no memory) to report shapes, parameter counts, FLOPs per image and a
peak-memory estimate. `describe` gives both the same dict, so a dry run can be checked against a real run.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from unic_cli.config import DistillConfig
from unic_cli.ladder import LadderProjector, parse_ladder_blocks
from unic_cli.losses import TeacherLosses, teacher_losses
from unic_cli.registry import TeacherCard
from unic_cli.standardize import TeacherStandardizers
from unic_cli.student import Student, build_student

log = logging.getLogger("unic_cli")


class DistillModel(nn.Module):
    """Everything trainable (student + ladder) plus the standardisation buffers, in one module for DDP/FSDP.

    `forward` is the part with parameters (student and ladder, under bf16 autocast when `student_bf16`), so it
    is what DDP wraps; `losses` standardises the targets and computes the losses outside the wrapper (it has
    buffers only).
    """

    def __init__(self, student: Student, ladder: LadderProjector, standardizers: TeacherStandardizers | None,
                 *, student_bf16: bool = False) -> None:
        super().__init__()
        self.student, self.ladder, self.standardizers = student, ladder, standardizers
        self.student_bf16 = student_bf16

    def forward(self, images_BCHW: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """uint8 images -> per teacher {"summary": pred_BE, "patch": pred_BNE} (bf16 under autocast)."""
        x_BCHW = self.student.normalize(images_BCHW)
        device_type = "cpu" if x_BCHW.is_meta else x_BCHW.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.student_bf16):
            return self.ladder(self.student(x_BCHW, self.ladder.blocks))

    def update_standardizers(self, step_targets: Sequence[Sequence], momentum: float) -> None:
        """Blend one optimiser step's teacher outputs into the statistics, once: `step_targets` holds each
        micro-batch's TeacherTokens (one entry without gradient accumulation)."""
        if self.standardizers is None:
            return
        for i in range(len(step_targets[0])):
            micro_kinds = [_token_kinds(targets[i]) for targets in step_targets]
            for kind in micro_kinds[0]:
                self.standardizers.stats[f"t{i}"][kind].update([kinds[kind] for kinds in micro_kinds], momentum)

    def losses(self, preds: Sequence[dict], targets: Sequence) -> TeacherLosses:
        """Predictions and each teacher's TeacherTokens -> per-teacher losses, the targets standardised with the
        current statistics (`update_standardizers` moved them for this step)."""
        standardized = []
        for i, tokens in enumerate(targets):
            kinds = _token_kinds(tokens)
            if self.standardizers is not None:
                kinds = {k: self.standardizers(i, k, y_xE, None) for k, y_xE in kinds.items()}
            standardized.append(kinds)
        return teacher_losses(preds, standardized)


def _token_kinds(tokens) -> dict[str, torch.Tensor]:
    """A teacher's TeacherTokens by token type: {"patch": patch_BNE, "summary": summary_BE when it has one}."""
    kinds = {"patch": tokens.patch_BND}
    if tokens.summary_BD is not None:
        kinds["summary"] = tokens.summary_BD
    return kinds


def resolve_dtypes(config: DistillConfig, device: torch.device) -> tuple[torch.dtype, bool]:
    """(teacher weight dtype, student under bf16 autocast) for `config.teacher_dtype`/`student_dtype` on `device`.

    "auto" teachers are bf16 wherever bf16 matrix products are fast (CUDA; a CPU with AVX512-BF16 or AMX, where
    they ran 4-5x faster than fp32 on 2 threads; ConvNets about 2x: EfficientNet-Lite0 at 128 px 0.40 -> 0.22 s
    and CIFAR ResNet-56 0.083 -> 0.037 s per 64 images); "auto" students are bf16 on CUDA only, fp32 on CPU.
    """
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and torch.backends.mkldnn.is_available()
                                          and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    teacher_bf16 = config.teacher_dtype == "bf16" or (config.teacher_dtype == "auto" and fast_bf16)
    student_bf16 = config.student_dtype == "bf16" or (config.student_dtype == "auto" and device.type == "cuda")
    return (torch.bfloat16 if teacher_bf16 else torch.float32), student_bf16


def teacher_dims(teachers) -> list[tuple[int | None, int]]:
    """(summary width, or None without a summary token; patch width) per teacher, the ladder's `teacher_dims`."""
    return [(t.card.summary_dim if t.card.has_summary else None, t.card.patch_dim) for t in teachers]


def build_teachers(config: DistillConfig, grid: tuple[int, int], device: str | torch.device,
                   dtype: torch.dtype = torch.float32, *, init_on_device: bool = False,
                   cards: Sequence[TeacherCard] | None = None) -> list[nn.Module]:
    """Every teacher, frozen, at the student's grid; random weights on the meta device or when asked.

    `dtype` converts the backbone's weights (bf16 teachers then run natively in bf16, without autocast);
    ConvNet teachers are put in channels-last memory format, which their convolutions run faster in.
    `init_on_device` builds random teachers directly on `device` (a 1B-parameter init on the host is slow).
    `cards` (a checkpoint's, one per teacher) replace what the specs resolve to today, so that a resumed run
    feeds its teachers exactly as before even when the registry changed in between.
    """
    from unic_cli.teachers import load_teacher

    pretrained = not config.random_init_teachers and str(device) != "meta"
    teachers = []
    for i, spec in enumerate(config.teachers):
        with torch.device(device) if init_on_device and not pretrained else contextlib.nullcontext():
            teacher = load_teacher(spec, grid=grid, pretrained=pretrained, device=device,
                                   card=cards[i] if cards is not None else None)
        if dtype != torch.float32:
            teacher.backbone.to(dtype)
        if teacher.card.family == "convnet":
            teacher.backbone.to(memory_format=torch.channels_last)
        teachers.append(teacher)
    return teachers


def load_size(image_size: int, teachers: Sequence[nn.Module]) -> int:
    """The side the data loader crops training images at: the largest input among the student and its teachers.

    Each model then resizes on the device from real pixels: a 128-px ConvNet teacher of a 64-px student sees
    128 px of detail, not a 2x upscale of the student's view (ViT teachers usually match the student's grid and
    size, so the common case loads at the student's size).
    """
    return max([image_size, *(max(t.input_size) for t in teachers)])


def train_loader(config: DistillConfig, teachers: Sequence[nn.Module], *, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, source=None):
    """The training stream of a distill config: its data, seed, augmentation and crop scale, loaded at
    `load_size` for these teachers (one place for `unic distill`, `unic bench` and `--dry-run`). `source`: the
    data already opened by `open_train_source` (so its errors came before the teachers loaded)."""
    from unic_cli.data import build_train_loader

    return build_train_loader(config.data_dir if source is None else source,
                              image_size=load_size(config.image_size, teachers),
                              batch_size=config.batch_size,
                              num_workers=config.num_workers if num_workers is None else num_workers,
                              seed=config.seed, rank=rank, world_size=world_size, augment=config.augment,
                              crop_scale=tuple(config.crop_scale), accum_steps=config.grad_accum_steps)


def compile_repeated_blocks(module: nn.Module, mode: str = "default") -> int:
    """`torch.compile` each block of every run of identical blocks (a ViT's `blocks`, HF's `layer`, open_clip's
    `resblocks`), in place; returns how many blocks were compiled.

    Regional compilation: blocks of one class share a single compiled graph (their weights are graph inputs),
    so a 40-block ViT-G compiles once, in seconds, where compiling the whole model traces every block. The
    elementwise work between matrix products (norms, residual adds, layer scales, activations) is fused.
    """
    count = 0
    for child in module.children():
        if (isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) >= 2
                and len({type(block) for block in child}) == 1):
            for block in child:
                block.compile(mode=mode)
            count += len(child)
        else:
            count += compile_repeated_blocks(child, mode)
    return count


def compile_parts(core: DistillModel, teachers: Sequence[nn.Module], mode: str = "default") -> None:
    """`--compile`: the student's and every teacher's blocks one by one, the student's tap (final norm and
    summary/patch split, one graph for every tapped block) and the ladder as a whole, in torch.compile's
    `mode` (`--compile-mode`)."""
    from unic_cli.student import uniform_drop_path

    uniform_drop_path(core.student.model)
    compiled = compile_repeated_blocks(core.student.model, mode)
    core.student.compile_taps(mode)
    core.ladder.compile(mode=mode)
    for teacher in teachers:
        compiled += compile_repeated_blocks(teacher.backbone, mode)
    log.info("torch.compile (mode %s): %d blocks (student and teachers), the student's taps and the ladder", mode,
             compiled)


def build_model(config: DistillConfig, teachers: Sequence[nn.Module], student: Student, *,
                student_bf16: bool = False) -> DistillModel:
    """The ladder (on `config.ladder_blocks`) and standardisers for these teachers, with `student`, in one module."""
    blocks = parse_ladder_blocks(config.ladder_blocks, student.num_blocks)
    dims = teacher_dims(teachers)
    ladder = LadderProjector(
        in_dim=student.embed_dim, teacher_dims=dims, blocks=blocks, num_blocks=student.num_blocks,
        shared_heads=config.shared_heads, hidden_dim=config.ladder_hidden or student.embed_dim,
        last_hidden_dim=config.ladder_last_hidden or 4 * student.embed_dim,
    )
    standardizers = TeacherStandardizers(dims, eps=config.std_eps) if config.standardize else None
    return DistillModel(student, ladder, standardizers, student_bf16=student_bf16)


def ladder_meta(config: DistillConfig, model: DistillModel) -> dict:
    """The checkpoint's `ladder_meta`: how to rebuild the heads (`unic export --keep-heads` reads it back)."""
    first_teacher = next(iter(model.ladder.heads.values()))
    first_ladder = next(iter(first_teacher.values()))  # every ladder has the same hidden widths
    last_block = model.student.num_blocks - 1
    widths = {b: first_ladder[f"b{b}"].fc1.out_features for b in model.ladder.blocks}
    hidden = next((w for b, w in widths.items() if b != last_block), config.ladder_hidden or model.student.embed_dim)
    return {"blocks": list(model.ladder.blocks), "shared_heads": model.ladder.shared_heads, "hidden_dim": hidden,
            "last_hidden_dim": widths[last_block], "std_eps": config.std_eps, "standardize": config.standardize}


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(config: DistillConfig, model: DistillModel, teachers: Sequence[nn.Module]) -> dict:
    """Shapes and parameter counts of a built run (real or meta): what `--dry-run` promises."""
    s = model.student
    return {
        "student": {"name": s.name, "image_size": s.image_size, "patch_size": s.patch_size, "grid": list(s.grid),
                    "embed_dim": s.embed_dim, "num_blocks": s.num_blocks, "num_params": _num_params(s)},
        "teachers": [
            {"spec": spec, "alias": t.card.alias, "source": t.card.source, "input_size": list(t.input_size),
             "grid": list(t.grid), "native_grid": list(t.card.native_grid),
             "summary_dim": t.card.summary_dim if t.card.has_summary else None, "patch_dim": t.card.patch_dim,
             "num_params": _num_params(t)}
            for spec, t in zip(config.teachers, teachers)
        ],
        "ladder": {**ladder_meta(config, model), "num_params": _num_params(model.ladder)},
        "load_size": load_size(config.image_size, teachers),
    }


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _saved_activation_bytes(fn) -> int:
    """Bytes autograd saves for backward during `fn()`: the activation memory of one training step."""
    seen: dict[int, int] = {}
    keep = []  # hold references so ids stay unique while counting

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep.append(t)
        seen.setdefault(id(t), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def build_meta(config: DistillConfig) -> tuple[DistillModel, list[nn.Module]]:
    """The run's modules on the meta device: shapes and FLOPs without weights or memory."""
    with torch.device("meta"):
        student = build_student(config.student, image_size=config.image_size, drop_path_rate=config.drop_path_rate)
        teachers = build_teachers(config, student.grid, "meta")
        model = build_model(config, teachers, student)
    return model, teachers


def _meta_step(config: DistillConfig, model: DistillModel, teachers: Sequence[nn.Module], batch: int):
    size = load_size(config.image_size, teachers)
    images_BCHW = torch.empty(batch, 3, size, size, dtype=torch.uint8, device="meta")
    targets = [t(torch.empty(batch, 3, *t.input_size, device="meta")) for t in teachers]
    return lambda: model.losses(model(images_BCHW), targets).loss_TB.mean()


def flops_per_image(config: DistillConfig, model: DistillModel | None = None,
                    teachers: Sequence[nn.Module] | None = None) -> dict:
    """FLOPs per image of one training step (torch.utils.flop_counter on the meta device).

    Returns {"teachers": [forward FLOPs per teacher], "student_and_ladder_forward": int, "train_step": int};
    the step counts teachers forward plus student and ladder forward and backward (backward ~ 2x forward).
    """
    if model is None:
        model, teachers = build_meta(config)
    teacher_flops = [_count_flops(lambda t=t: t(torch.empty(1, 3, *t.input_size, device="meta"))) for t in teachers]
    student_flops = _count_flops(_meta_step(config, model, teachers, 1))
    return {"teachers": teacher_flops, "student_and_ladder_forward": student_flops,
            "train_step": sum(teacher_flops) + 3 * student_flops}


def plan_distillation(config: DistillConfig) -> dict:
    """Validate everything and describe the run without loading any weights (`unic distill --dry-run`).

    Returns `describe()`'s dict plus the data size and schedule, FLOPs per image (teachers forward, student
    and ladder forward + backward) and a rough peak-memory estimate at the chosen batch size.
    """
    from unic_cli.devices import resolve_device
    from unic_cli.distill import total_steps

    config.validate()  # a config built directly (the Python API) is checked here, as `run` does
    device = resolve_device(config.device)
    model, teachers = build_meta(config)
    loader = train_loader(config, teachers, num_workers=0)
    plan = describe(config, model, teachers)
    num_steps, steps_per_epoch = total_steps(config, loader.steps_per_epoch)
    plan["data"] = {"num_images": loader.num_images, "steps_per_epoch": steps_per_epoch, "total_steps": num_steps,
                    "global_batch": config.batch_size * config.grad_accum_steps}
    plan["device"] = str(device)
    plan["flops_per_image"] = flops_per_image(config, model, teachers)
    teacher_dtype, student_bf16 = resolve_dtypes(config, device)
    activations = _saved_activation_bytes(_meta_step(config, model, teachers, config.batch_size))
    activations //= 2 if student_bf16 else 1
    trainable = _num_params(model)
    teacher_params = sum(_num_params(t) for t in teachers)
    # the step holds the teachers' tokens of all its micro-batches (train_step.forward_backward)
    step_images = config.batch_size * config.grad_accum_steps
    target_bytes = sum(step_images * (t.grid[0] * t.grid[1] + 1) * t.card.patch_dim * 4 for t in teachers)
    memory = {
        "weights_grads_adam": 16 * trainable,  # fp32 weights, grads and two AdamW moments
        "teachers": teacher_dtype.itemsize * teacher_params,
        "activations": activations,
        "teacher_outputs": target_bytes,
    }
    plan["memory_bytes"] = {**memory, "peak_estimate": int(1.2 * sum(memory.values()))}  # 20% allocator slack
    return plan
