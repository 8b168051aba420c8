"""TeacherTokens, the Backbone protocol, and Teacher: the one token-extractor contract for every source.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D token width, h/w patch grid.

A source adapter (timm, hf, open_clip, py) only turns normalised pixels at the teacher's input size into
tokens on the teacher's own feature grid (`Backbone.forward_tokens`). Everything every teacher shares lives in
`Teacher`: pixels in [0, 255] (uint8) or [0, 1] (float) on any device, resized to the teacher's input size,
normalised with the card's mean/std, run under no_grad, register tokens already removed by the adapter, and
patch tokens resampled onto the requested grid when the grids differ. Precision follows the weights: a teacher
whose weights were converted to bf16 runs natively in bf16 with autocast switched off (autocast would send every
layer norm through fp32 and back); fp32 weights run under bf16 autocast on CUDA and in fp32 on the CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from unic_cli.errors import DataError
from unic_cli.registry import TeacherCard


class TeacherTokens(NamedTuple):
    """What a teacher returns for a batch of images."""

    summary_BD: torch.Tensor | None  # None when "summary" is not in card.tokens
    patch_BND: torch.Tensor  # register tokens removed, row-major on the (h, w) grid


class Backbone(Protocol):
    """A source adapter: normalised images at `input_size` -> tokens on its own feature grid."""

    card: TeacherCard

    def forward_tokens(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, int]]:
        """Return (summary_BD or None, patch_BND without registers, feature grid (h, w))."""
        ...

    # Optional: `set_input_size((h, w))`, called once by Teacher so that position embeddings are resampled once
    # for the fixed input size rather than in every forward.


def resample_grid(patch_BND: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Resize patch tokens laid on grid `src` to grid `dst` (bilinear, as for a feature map).

    Shrinking averages over each target cell's footprint (antialiased), so a 64x64 SAM map brought down to a
    14x14 student grid summarises every token rather than sampling 4 of every 21.
    """
    if src == dst:
        return patch_BND
    B, N, D = patch_BND.shape
    fmap_BDhw = patch_BND.transpose(1, 2).reshape(B, D, *src)
    shrink = dst[0] < src[0] or dst[1] < src[1]
    fmap_BDhw = F.interpolate(fmap_BDhw.float(), size=dst, mode="bilinear", align_corners=False, antialias=shrink)
    return fmap_BDhw.flatten(2).transpose(1, 2).to(patch_BND.dtype)


class Teacher(nn.Module):
    """A frozen teacher behind the uniform token contract.

    Args:
        card: the resolved card (sizes, mean/std, tokens).
        backbone: the source adapter (an nn.Module implementing `Backbone`).
        grid: the student's patch grid (h, w) to lay patch tokens on; None keeps the teacher's native grid.
    """

    def __init__(self, card: TeacherCard, backbone: nn.Module, *, grid: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.card = card
        self.backbone = backbone.eval().requires_grad_(False)
        self.input_size = card.input_size_for(grid)
        # Native mode (grid=None) keeps whatever grid the backbone produces: the card's grid is exact for a ViT but
        # only a ceil(size / stride) estimate for a ConvNet (a patchify stem floors), so the first forward corrects it.
        self.native = grid is None
        self.grid = tuple(grid) if grid is not None else card.grid_for(self.input_size)
        if hasattr(self.backbone, "set_input_size"):
            self.backbone.set_input_size(self.input_size)
        self.register_buffer("mean_C", torch.tensor(card.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_C", torch.tensor(card.std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:  # a teacher never leaves eval mode
        return super().train(False)

    def preprocess(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] -> float32 at the teacher's input size, normalised."""
        if images_BCHW.ndim != 4 or images_BCHW.shape[1] != 3:  # a shape check, no host sync
            raise DataError(f"teacher {self.card.alias!r} takes RGB images [B, 3, H, W], got a tensor of shape "
                            f"{list(images_BCHW.shape)} (grayscale: repeat the channel, `x.expand(-1, 3, -1, -1)`)")
        x_BCHW = images_BCHW.to(self.mean_C.device, non_blocking=True).float()  # no-op when already there
        if images_BCHW.dtype == torch.uint8:
            x_BCHW = x_BCHW / 255.0
        if tuple(x_BCHW.shape[-2:]) != self.input_size:
            mode = self.card.interpolation
            x_BCHW = F.interpolate(x_BCHW, size=self.input_size, mode=mode,
                                   align_corners=False if mode != "nearest" else None, antialias=mode != "nearest")
        return (x_BCHW - self.mean_C) / self.std_C

    def precision(self, x_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.autocast]:
        """(preprocessed pixels in the backbone's dtype, the autocast context to run the backbone under)."""
        weight = next(self.backbone.parameters(), None)  # a parameter-free module (pooling) runs in fp32
        weight_dtype = torch.float32 if weight is None else weight.dtype
        if weight_dtype != torch.float32:  # converted weights: run in their dtype, nothing to autocast
            return x_BCHW.to(weight_dtype), torch.autocast(x_BCHW.device.type, enabled=False)
        return x_BCHW, torch.autocast("cuda", dtype=torch.bfloat16, enabled=x_BCHW.is_cuda)

    @torch.no_grad()  # not inference_mode: the loss must be able to save these tensors for backward
    def forward(self, images_BCHW: torch.Tensor) -> TeacherTokens:
        x_BCHW, autocast = self.precision(self.preprocess(images_BCHW))
        with autocast:
            summary_BD, patch_BND, feat_grid = self.backbone.forward_tokens(x_BCHW)
        if self.native:
            self.grid = tuple(feat_grid)
        patch_BND = resample_grid(patch_BND, tuple(feat_grid), self.grid)
        if not self.card.has_summary:
            summary_BD = None
        if x_BCHW.is_cuda:  # final norms run in fp32 under autocast; the contract is bf16 on CUDA
            patch_BND = patch_BND.to(torch.bfloat16)
            summary_BD = summary_BD.to(torch.bfloat16) if summary_BD is not None else None
        return TeacherTokens(summary_BD, patch_BND)
