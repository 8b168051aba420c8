"""Dense targets of a split: masks and depth maps read from files, and `RaggedTargets` for mixed sizes.

Shape legend: M images, H/W target pixels, P pixels of all images together.

Masks are index PNGs (uint8 or int32 once read, never int64 at scale); depth maps are 16-bit PNGs divided by
`--depth-scale`, or .npy in metres (float32). 8-bit PNG depth maps are refused: a silent unit error. Training
targets are resized (nearest) to one size so batches stack; test targets keep each image's own size
(`RaggedTargets`), where they are scored. `features.load_targets` / `features.load_native_targets` read a
split's targets through the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from unic_cli.errors import DataError
from unic_cli.probe.split import _few

# PIL modes of a PNG that holds 16 bits per pixel: the only PNG depth maps `value / depth_scale` makes sense for
_DEPTH_PNG_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _low_bit_depth(path: Path, mode: str, depth_scale: float) -> str:
    """Why an 8-bit (or 1-bit) PNG depth map is refused, and the fix."""
    return (f"{str(path)!r} is a {'1' if mode == '1' else '8'}-bit PNG (mode {mode}); depth maps must be 16-bit "
            f"PNG or .npy: at --depth-scale {depth_scale:g} an 8-bit value of at most 255 would mean at most "
            f"{255 / depth_scale:.4g} m, and 8-bit depth has no common unit (some datasets store 255 = 10 m, "
            "others disparity). Save each map as a 16-bit PNG (value / --depth-scale = metres) or as .npy in metres")


def check_depth_files(targets: Sequence[Path], *, depth_scale: float) -> None:
    """Refuse 8-bit PNG depth maps before any is decoded (PIL reads only the header here)."""
    low = []
    for path in targets:
        if path.suffix.lower() != ".png":
            continue
        try:
            with Image.open(path) as image:
                mode = image.mode
        except OSError:
            continue  # reported with the file name when it is read
        if mode not in _DEPTH_PNG_MODES:
            low.append((path, mode))
    if low:
        path, mode = low[0]
        more = f" ({len(low)} of {len(targets)} files, e.g. {_few([p.name for p, _ in low])})" if len(low) > 1 else ""
        raise DataError(_low_bit_depth(path, mode, depth_scale) + more)


def read_target(path: Path, kind: Literal["mask", "depth"], *, depth_scale: float = 1000.0) -> np.ndarray:
    """A mask (index PNG -> int64 [H, W]) or a depth map (16-bit PNG / depth_scale, or .npy as is -> float32).

    An 8-bit PNG depth map is refused (DataError): dividing its 0-255 values by a scale meant for 16-bit
    millimetres gives depths under 0.26 m, a silent unit error.
    """
    if path.suffix.lower() == ".npy":
        try:
            array = np.load(path, allow_pickle=False).astype(np.float32).squeeze()
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read depth map {str(path)!r}: {err}") from None
    else:
        try:
            with Image.open(path) as image:
                mode = image.mode
                array = np.asarray(image)
        except OSError as err:
            raise DataError(f"cannot read {kind} {str(path)!r}: {err}") from None
        if kind == "depth" and mode not in _DEPTH_PNG_MODES and array.ndim == 2:
            raise DataError(_low_bit_depth(path, mode, depth_scale))
        if kind == "depth":
            array = array.astype(np.float32) / depth_scale
    if array.ndim != 2:
        raise DataError(f"{str(path)!r} has shape {array.shape}; masks and depth maps must be single-channel "
                        "(index/palette or 16-bit grayscale PNG, or a 2-D .npy)")
    return array if kind == "depth" else array.astype(np.int64)


def _resize_target(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize: never invent labels or depths between neighbours."""
    if array.shape == size:
        return array
    rows = (np.arange(size[0]) * array.shape[0] / size[0]).astype(np.int64)
    cols = (np.arange(size[1]) * array.shape[1] / size[1]).astype(np.int64)
    return array[rows[:, None], cols[None, :]]


class _TargetDataset(torch.utils.data.Dataset):
    """Targets read in loader workers, resized (nearest) to `size`, or at their own size when `size` is None."""

    def __init__(self, targets: Sequence[Path], kind: str, size: tuple[int, int] | None, depth_scale: float) -> None:
        self.targets, self.kind, self.size, self.depth_scale = list(targets), kind, size, depth_scale

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> torch.Tensor:
        array = read_target(self.targets[index], self.kind, depth_scale=self.depth_scale)
        return torch.from_numpy((array if self.size is None else _resize_target(array, self.size)).copy())


def _narrow_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 when the labels allow it (8x less disk and memory than int64), else int32."""
    fits = bool((mask >= 0).all()) and bool((mask <= 255).all())
    return mask.to(torch.uint8 if fits else torch.int32)


@dataclass(frozen=True, eq=False)
class RaggedTargets:
    """Masks or depth maps of one split, each at its own size: one flat buffer, no padding to the largest.

    Image i is `flat_P[offsets_M[i] : offsets_M[i] + H * W]` in row-major order, with (H, W) = `shapes_M2[i]`.
    A split of one size costs what a [M, H, W] tensor does; ADE20K's val masks (up to 2048 px a side) cost
    their pixels, where a tensor padded to the largest would cost M * 2048^2. Read from the cache, `flat_P` is
    memory-mapped: an image's pixels are read when it is scored.

    Attributes:
        flat_P: every pixel (P in all): uint8 or int32 masks, float32 depth in metres.
        offsets_M: int64 start of each image in `flat_P`.
        shapes_M2: int64 (H, W) of each image.
    """

    flat_P: torch.Tensor
    offsets_M: torch.Tensor
    shapes_M2: torch.Tensor

    @classmethod
    def from_images(cls, images: Sequence[torch.Tensor]) -> RaggedTargets:
        """Copy [H, W] tensors of any sizes into one buffer."""
        shapes_M2 = torch.tensor([tuple(t.shape) for t in images], dtype=torch.int64).reshape(-1, 2)
        sizes_M = shapes_M2.prod(dim=1)
        flat_P = torch.cat([t.reshape(-1) for t in images]) if images else torch.empty(0)
        return cls(flat_P, sizes_M.cumsum(0) - sizes_M, shapes_M2)

    @classmethod
    def from_dense(cls, targets_MHW: torch.Tensor) -> RaggedTargets:
        """A [M, H, W] tensor as ragged targets of one size, without a copy (on its device)."""
        num, height, width = targets_MHW.shape
        offsets_M = torch.arange(num, dtype=torch.int64) * (height * width)
        return cls(targets_MHW.reshape(-1), offsets_M, torch.tensor([[height, width]] * num).reshape(-1, 2))

    def __len__(self) -> int:
        return len(self.offsets_M)

    @property
    def dtype(self) -> torch.dtype:
        return self.flat_P.dtype

    def __getitem__(self, rows: torch.Tensor | slice) -> RaggedTargets:
        """Some of the images (a bool mask, indices or a slice), sharing the buffer: no pixel is copied."""
        return RaggedTargets(self.flat_P, self.offsets_M[rows], self.shapes_M2[rows])

    def image(self, index: int) -> torch.Tensor:
        height, width = self.shapes_M2[index].tolist()
        start = int(self.offsets_M[index])
        return self.flat_P[start : start + height * width].view(height, width)

    def stack(self, first: int, stop: int) -> torch.Tensor:
        """Images first..stop-1 as one [G, H, W] tensor; they must share a size. A view of the buffer when they
        lie one after the other in it (always for a split read from the cache), else a copy."""
        shapes_G2 = self.shapes_M2[first:stop]
        height, width = shapes_G2[0].tolist()
        if not bool((shapes_G2 == shapes_G2[0]).all()):
            raise ValueError(f"images {first}-{stop - 1} differ in size: {shapes_G2.tolist()}")
        offsets_G = self.offsets_M[first:stop]
        begin, pixels = int(offsets_G[0]), height * width
        if bool((offsets_G == begin + torch.arange(len(offsets_G)) * pixels).all()):
            return self.flat_P[begin : begin + len(offsets_G) * pixels].view(-1, height, width)
        return torch.stack([self.image(i) for i in range(first, stop)])
