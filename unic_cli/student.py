"""build_student(name, image_size) -> a timm ViT with per-block summary/patch taps.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D student width, P prefix tokens (cls + registers).

Supported students: timm models built on `VisionTransformer` (vit_*, deit_*/deit3_*, vit_*_reg*, test_vit*, ...)
and `Eva` (eva02_*, vit_*_rope_*, ...), with or without register tokens. A VisionTransformer's blocks run in
`Student.forward`'s own loop (timm's `forward_intermediates` steps), each tapped block's tokens going through
`Student.tap` (final norm, prefix split); an Eva's taps come from timm's `forward_intermediates`.
ConvNets, hierarchical transformers (Swin, MaxViT, ...) and hybrids have no per-block token sequence on one
grid and are rejected with a clear error.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unic_cli.errors import ConfigError

SUPPORTED_CLASSES = ("VisionTransformer", "Eva")
SUPPORTED_HINT = "a timm ViT (VisionTransformer or Eva: vit_*, deit3_*, vit_*_reg*, eva02_*, test_vit, ...)"


class Student(nn.Module):
    """A timm ViT whose tapped blocks feed the ladder of projectors.

    The timm model lives at `student.model`, so `student.model.state_dict()` is a plain timm state dict that
    `unic export` writes as is. Every tapped block goes through the model's final norm: the norm that the
    exported encoder applies to its output is trained, not left at its initialisation.
    """

    def __init__(self, model: nn.Module, *, name: str, model_args: dict) -> None:
        super().__init__()
        self.model = model
        self.name = name
        self.model_args = dict(model_args)
        self.embed_dim: int = model.embed_dim
        self.num_blocks: int = len(model.blocks)
        self.patch_size: int = model.patch_embed.patch_size[0]
        self.grid: tuple[int, int] = tuple(model.patch_embed.grid_size)
        self.image_size: int = self.grid[0] * self.patch_size
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.has_cls_token: bool = getattr(model, "cls_token", None) is not None
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean: tuple[float, ...] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, ...] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.interpolation: str = cfg.get("interpolation", "bicubic")
        # Classifier-side modules that the taps never reach (fc_norm, attention pooling, head) get no gradient:
        # frozen, so DDP runs without `find_unused_parameters` (they stay in the state dict for export).
        for module_name in ("fc_norm", "attn_pool", "head"):
            if isinstance(getattr(model, module_name, None), nn.Module):
                getattr(model, module_name).requires_grad_(False)
        self.register_buffer("mean_C", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_C", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] -> float at the student's input size, normalised with its mean/std (on the images'
        device). Batches come at the largest input size among the student and its teachers (`plan.load_size`)."""
        x_BCHW = images_BCHW.float()
        if images_BCHW.dtype == torch.uint8:
            x_BCHW = x_BCHW / 255.0
        if tuple(x_BCHW.shape[-2:]) != (self.image_size, self.image_size):
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
            x_BCHW = F.interpolate(x_BCHW, size=(self.image_size, self.image_size), mode=mode, align_corners=False,
                                   antialias=True)
        return (x_BCHW - self.mean_C) / self.std_C

    def forward(self, images_BCHW: torch.Tensor, blocks: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Normalised images -> [(summary_BD, patch_BND)] for each block in `blocks` (in block order), final norm
        applied.

        The summary token is the CLS token, or the mean patch token for a ViT built without one.
        A `VisionTransformer` runs its blocks here so that each tap is one call of `tap` (compiled under
        `--compile`); an `Eva` (rotary embeddings), or a model with timm's gradient checkpointing on, goes through
        timm's `forward_intermediates`.
        """
        model = self.model
        bad = [b for b in blocks if not -self.num_blocks <= b < self.num_blocks]
        if bad:
            raise IndexError(f"blocks {bad} out of range for a {self.num_blocks}-block student")
        if type(model).__name__ != "VisionTransformer" or getattr(model, "grad_checkpointing", False):
            outs = model.forward_intermediates(images_BCHW, indices=list(blocks), norm=True,
                                               return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True,
                                               stop_early=True)
            taps = []
            for out in outs:
                patch_BND, prefix_BPD = out if isinstance(out, tuple) else (out, None)
                taps.append((prefix_BPD[:, 0] if self.has_cls_token else patch_BND.mean(dim=1), patch_BND))
            return taps
        # VisionTransformer.forward_intermediates' own steps, without the eager per-tap norm and prefix slicing
        x_BTD = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images_BCHW))))
        wanted, taps = {b % self.num_blocks for b in blocks}, []
        for i, block in enumerate(model.blocks[:max(wanted, default=-1) + 1]):
            x_BTD = block(x_BTD)
            if i in wanted:
                taps.append(self.tap(x_BTD))
        return taps

    def tap(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's tokens (prefix first) -> (summary_BD, patch_BND) through the final norm.

        Speed: `--compile` compiles this as one graph for every tapped block (`compile_taps`), so the norm, the
        prefix/patch split and their backward are fused kernels. Eager, the split's backward zero-fills and
        copies a full-size gradient per slice and autograd adds them (measured on an H100 for UNIC-L: the eager
        per-tap norms, fills, copies and adds took up to about 40 of the step's 726 ms of kernels).
        """
        y_BTD = self.model.norm(x_BTD)
        patch_BND = y_BTD[:, self.num_prefix_tokens:]
        summary_BD = y_BTD[:, 0] if self.has_cls_token else patch_BND.mean(dim=1)
        # Contiguous copies, not views of y: a compiled function's outputs that are views of one intermediate
        # come out as that intermediate plus view replays outside the graph, whose backward zero-fills again.
        # (The ladder reshapes patch tokens to rows, which copies a view anyway.)
        return summary_BD.contiguous(), patch_BND.contiguous()

    def compile_taps(self, mode: str = "default") -> None:
        """`tap` as one compiled graph (torch.compile's `mode`), shared by every tapped block."""
        self.tap = torch.compile(self.tap, mode=mode)  # an instance attribute shadowing the method


class _TensorDropPath(nn.Module):
    """Stochastic depth whose rate is a buffer, not a Python float: under `torch.compile` every block then shares
    one compiled graph (timm's DropPath holds a different float per block, and each float is a recompile)."""

    def __init__(self, drop_prob: float, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = self.keep_prob.to(x.dtype)
        mask = torch.bernoulli(keep.expand((x.shape[0],) + (1,) * (x.ndim - 1)))
        return x * (mask / keep) if self.scale_by_keep else x * mask


def uniform_drop_path(model: nn.Module) -> None:
    """Swap each block's `drop_path*` (timm DropPath or Identity at rate 0) for `_TensorDropPath`, in place.

    Only for compiled students: the mask is drawn differently from timm's, so eager runs keep timm's module.
    Without stochastic depth (every rate 0) nothing is swapped: a swapped module would still draw a mask per block.
    """
    rates = [float(getattr(child, "drop_prob", 0.0) or 0.0) for block in model.blocks
             for name, child in block.named_children() if name.startswith("drop_path")]
    if not any(rate > 0 for rate in rates):
        return
    for block in model.blocks:
        device = next(block.parameters()).device
        for name, child in list(block.named_children()):
            if name.startswith("drop_path"):
                swap = _TensorDropPath(float(getattr(child, "drop_prob", 0.0) or 0.0),
                                       bool(getattr(child, "scale_by_keep", True)))
                setattr(block, name, swap.to(device))


def check_student_name(name: str) -> None:
    """Raise ConfigError for a name timm does not know, suggesting close names."""
    import timm

    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.7)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(f"--student {name!r} is not a timm model.{hint} Use {SUPPORTED_HINT}.")


# timm's argument that moves a post-pooling norm (`fc_norm`) in front of the pooling, as the final `norm`
_NORM_BEFORE_POOL = {"VisionTransformer": {"fc_norm": False}, "Eva": {"use_fc_norm": False}}


def _norm_after_pool(model: nn.Module) -> bool:
    """Whether the model normalises only after pooling: no final `norm`, a norm module as `fc_norm` (timm's
    default for `global_pool='avg'`: the *_gap_* ViTs, EVA-02, BEiT-3, test_vit2)."""
    fc_norm = getattr(model, "fc_norm", None)
    return isinstance(model.norm, nn.Identity) and isinstance(fc_norm, nn.Module) and \
        not isinstance(fc_norm, nn.Identity)


def build_student(name: str, *, image_size: int, drop_path_rate: float = 0.0,
                  model_args: dict | None = None) -> Student:
    """Build a randomly initialised timm ViT student at `image_size` (builds on the current default device).

    A model that normalises only after pooling (`fc_norm`) is built with that norm as its final `norm` instead
    (`fc_norm=False`, recorded in `model_args`): every tap then goes through a trained norm, and the exported
    encoder keeps it. Such a model's timm default would leave the taps unnormalised (the pooled-only norm never
    sees a token) and export no norm at all.

    Args:
        name: any timm model name of a supported family (see the module docstring).
        image_size: square input size; must be a multiple of the model's patch size.
        drop_path_rate: stochastic depth rate (official UNIC: 0.1).
        model_args: timm arguments to build exactly (a checkpoint's `student.model_args`, so a resumed run gets
            the architecture it started with); by default chosen here.
    """
    import timm

    check_student_name(name)

    def create(args: dict) -> nn.Module:
        try:
            return timm.create_model(name, pretrained=False, drop_path_rate=drop_path_rate, **args)
        except TypeError as err:  # e.g. a ConvNet that takes no img_size
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__  # no C++ frames
            raise ConfigError(f"--student {name!r} cannot be built as a ViT student at --image-size {image_size} "
                              f"({first}); unic students must be {SUPPORTED_HINT}.") from None

    chosen = model_args is None
    model_args = {"img_size": image_size, "num_classes": 0} if chosen else dict(model_args)
    # Checked and laid out on the meta device (about 0.1 s for a ViT-L, no memory), so that a wrong student costs
    # no real build and the layout is settled before the one real build (2 s for a ViT-L on the CPU).
    with torch.device("meta"):
        shape = create(model_args)
    family = type(shape).__name__
    if family not in SUPPORTED_CLASSES:
        raise ConfigError(f"--student {name!r} is a timm {family}; unic students must be {SUPPORTED_HINT}.")
    patch = shape.patch_embed.patch_size[0]
    if image_size % patch:
        below, above = image_size // patch * patch, (image_size // patch + 1) * patch
        raise ConfigError(f"--image-size {image_size} is not a multiple of {name}'s patch size {patch}; "
                          f"use {f'{below} or {above}' if below else above}.")
    if chosen and _norm_after_pool(shape):
        model_args = {**model_args, **_NORM_BEFORE_POOL[family]}
    return Student(create(model_args), name=name, model_args=model_args)
