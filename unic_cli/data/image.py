"""Decoding any image file to 8-bit RGB, and the UNIC augmentation on uint8.

Every random draw comes from a `numpy.random.Generator` passed in, never from the global RNG.
Shape legend: C channels (3, RGB), H height, W width.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps

# Everything PIL (or a broken file) raises while decoding; a bad file is skipped, never fatal. Not a
# blanket `except Exception`: a bug in our own code must still surface.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                 Image.DecompressionBombError)
_EXIF_ORIENTATION = 0x0112




def decode_image(source: str | Path | BinaryIO) -> Image.Image:
    """Open any supported image as 8-bit RGB, EXIF orientation applied.

    Palette images (GIF: first frame), CMYK, 16-bit and 32-bit grayscale, float, bilevel, L/LA and
    RGBA are converted; transparent pixels are composited over white (their colour is often junk).

    Raises:
        OSError, ValueError, ...: the file is unreadable (see `DECODE_ERRORS`).
    """
    with Image.open(source) as img:
        img.load()  # decode now, inside the caller's error handling (truncated files fail here)
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is no EXIF rotation
    return _to_rgb(img)


def load_crop(source: str | Path | BinaryIO, image_size: int,
              choose_box: Callable[[int, int], tuple[float, float, float, float]]) -> Image.Image:
    """Decode an image and resize the region `choose_box(width, height)` to `image_size` squared.

    The box is chosen from the header's size (EXIF orientation applied) before any pixel is
    decoded, so a JPEG whose box is at least twice the output is decoded at 1/2, 1/4 or 1/8 scale by
    libjpeg (`Image.draft`): a 12-megapixel photo then costs a fraction of a full decode. The result
    depends only on the file and the box, so it stays deterministic.
    """
    with Image.open(source) as img:
        width, height = img.size
        if img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # stored transposed
            width, height = height, width
        box = choose_box(width, height)
        reduction = 1
        while reduction < 8 and min(box[2] - box[0], box[3] - box[1]) >= 2 * reduction * image_size:
            reduction *= 2
        if reduction > 1 and img.format == "JPEG":
            # ceil keeps libjpeg's chosen scale <= reduction, so the box never drops below image_size
            img.draft(img.mode, (math.ceil(img.width / reduction), math.ceil(img.height / reduction)))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)
    scale_x, scale_y = img.width / width, img.height / height
    box = (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)
    # PIL resizes the box in one antialiased pass: no full-size intermediate copy.
    return _to_rgb(img).resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale to 8 bits: PIL's own convert("L") clips instead of scaling."""
    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255
    elif img.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif values.size and values.max() <= 255.0 and values.min() >= 0.0:
        scaled = values  # 32-bit container holding 8-bit data
    elif img.mode == "I" and values.size and values.min() >= 0.0 and values.max() <= 65535.0:
        scaled = values / 257.0  # 16-bit PNGs open as mode "I" in some Pillow versions
    else:  # arbitrary range (float maps, signed data): stretch to [0, 255]
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 1.0)
        scaled = (values - lo) * (255.0 / max(hi - lo, 1e-12))
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> CHW uint8 tensor (a copy, so it owns writable memory).

    PIL splits the bands (planar copies) 1.5x faster than torch transposes an HWC array.
    """
    return torch.from_numpy(np.stack([np.asarray(band) for band in img.split()]))




def center_square_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Source box of "resize the shorter side to S, then center-crop S x S", for one-pass PIL resize."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h)
    in_ratio = width / height  # fallback: the largest centered crop within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def augment_unic(img: Image.Image, image_size: int, rng: np.random.Generator,
                 crop_scale: tuple[float, float] = (0.08, 1.0)) -> torch.Tensor:
    """The official UNIC training recipe (naver/unic `main_unic.py`) on an image in memory.

    RandomResizedCrop(scale `crop_scale`, official 0.08-1; ratio 3/4-4/3, bicubic, antialiased), then
    `augment_colour`. The loaders do the same from files through `load_crop`, which also decodes large JPEGs at
    reduced scale.
    """
    box = random_resized_crop_box(img.width, img.height, rng, scale=crop_scale)
    return augment_colour(img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box), rng)


def augment_colour(img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    """The photometric half of the UNIC recipe, on a cropped image; returns uint8 CHW.

    Horizontal flip (p 0.5), colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1,
    in random order, p 0.8), grayscale (p 0.2), Gaussian blur (kernel 9, sigma 0.1-5, p 0.2),
    solarize (p 0.2). The official code blurs and solarizes float images; here they run on uint8,
    which rounds blurred pixels to integers (its threshold 0.5 on [0, 1] is >= 128 on [0, 255]).
    The colour jitter gives torchvision's result bit for bit (`adjust_brightness`, ...), and the blur its
    kernel (`gaussian_blur`: a pixel may differ by 1), in 40% of torchvision's time on one core.
    """
    from torchvision.transforms.v2 import functional as TF

    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image_CHW = to_tensor(img)
    if rng.random() < 0.8:
        factors = (rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1))
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        for op in rng.permutation(4):  # torchvision's ColorJitter also shuffles the order
            image_CHW = ops[op](image_CHW, float(factors[op]))
    if rng.random() < 0.2:
        image_CHW = TF.rgb_to_grayscale(image_CHW, num_output_channels=3)
    if rng.random() < 0.2:
        image_CHW = gaussian_blur(image_CHW, float(rng.uniform(0.1, 5.0)))
    if rng.random() < 0.2:
        image_CHW = torch.where(image_CHW >= 128, 255 - image_CHW, image_CHW)
    return image_CHW


def _as_float(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 (or bool) -> float32, exact. numpy's casts are 3-7x faster than torch's on one core (224 px)."""
    return torch.from_numpy(np.asarray(image).astype(np.float32))


def _as_uint8(image: torch.Tensor) -> torch.Tensor:
    """float32 in [0, 255] -> uint8, truncating like torch's `.to(torch.uint8)`."""
    return torch.from_numpy(image.numpy().astype(np.uint8))


def _gray(image_CHW: torch.Tensor) -> torch.Tensor:
    """torchvision's luma of a uint8 image as float [1, H, W], floored as its uint8 path does."""
    r, g, b = _as_float(image_CHW).unbind(0)
    return r.mul_(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(0)


def _blend(image_CHW: torch.Tensor, other: torch.Tensor, ratio: float) -> torch.Tensor:
    return _as_uint8(_as_float(image_CHW).mul_(ratio).add_(other, alpha=1.0 - ratio).clamp_(0, 255))


def adjust_brightness(image_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's `adjust_brightness` on uint8, bit for bit (the same float ops, cheaper casts)."""
    return _as_uint8(_as_float(image_CHW).mul_(factor).clamp_(0, 255))


def adjust_contrast(image_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's `adjust_contrast` on uint8 RGB, bit for bit: blend with the mean luma."""
    return _blend(image_CHW, torch.mean(_gray(image_CHW), dim=(-3, -2, -1), keepdim=True), factor)


def adjust_saturation(image_CHW: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision's `adjust_saturation` on uint8 RGB, bit for bit: blend with the luma."""
    return _blend(image_CHW, _gray(image_CHW), factor)


# Which of (max, mid, min) of a pixel's channels each output channel (R, G, B) takes, per hue sector 0-5.
_HUE_ROLES = ((0, 1, 2, 2, 1, 0), (1, 0, 0, 1, 2, 2), (2, 2, 1, 0, 0, 1))


def adjust_hue(image_CHW: torch.Tensor, hue_factor: float) -> torch.Tensor:
    """torchvision's `adjust_hue` on a uint8 RGB image, bit for bit, in 2/5 of its time (1 thread, 224 px).

    The float steps are torchvision's own tensor ops in its order (RGB -> HSV, shift, HSV -> RGB), so every
    rounding matches. What is cheaper: a hue shift keeps each pixel's max and min channel values, so only the
    middle value is computed in float, and the output is assembled with integer masks instead of
    torchvision's stacks, gathers and `torch.where` (which costs 4 ns per element on CPU, 20x a multiply).
    """
    rgb_CHW = image_CHW.numpy()
    r_HW, g_HW, b_HW = rgb_CHW
    max_HW = np.maximum(np.maximum(r_HW, g_HW), b_HW)
    min_HW = np.minimum(np.minimum(r_HW, g_HW), b_HW)
    is_r = max_HW == r_HW  # which channel holds the max picks the hue formula, as in torchvision
    is_g = (max_HW == g_HW) & ~is_r
    is_b = ~(is_r | is_g)

    maxc = _as_float(max_HW).mul_(1.0 / 255)
    channels_range = maxc - _as_float(min_HW).mul_(1.0 / 255)
    saturation = channels_range / maxc.clamp_min(1e-30)  # 0 / tiny = 0 where torchvision divides by 1
    rc, gc, bc = (maxc - _as_float(rgb_CHW).mul_(1.0 / 255)).div_(channels_range.clamp_min(1e-30)).unbind(0)
    hg = rc.add(2.0).sub_(bc).mul_(_as_float(is_g))
    hr = bc.sub_(gc).mul_(_as_float(is_r))
    hb = gc.add_(4.0).sub_(rc).mul_(_as_float(is_b))
    hue = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0)  # in [5/6, 11/6)
    hue_N = hue.numpy().reshape(-1)  # torch's fmod and remainder cost 2 us per 1000 elements; these are exact:
    hue_N -= hue_N >= 1.0  # fmod(x, 1) for x in [0.5, 2): x - 1 is exact there (Sterbenz)
    hue.add_(hue_factor)  # in [-0.5, 1.5)
    negative, above = hue_N < 0.0, hue_N >= 1.0
    hue_N += negative  # remainder(x, 1) as torch computes it: fmod(x, 1) = x here, then + 1 (rounded)
    hue_N -= above
    hue6 = hue.mul_(6)
    sector_f = torch.floor(hue6)
    frac = hue6.sub_(sector_f)
    sector = sector_f.numpy().astype(np.uint8)  # 0-5, or 6 where the hue rounded up to 1.0 (= sector 0)
    odd = _as_float(sector & 1)
    sxf = saturation * frac
    q = (1.0 - sxf).mul_(maxc).clamp_(0.0, 1.0)  # odd sectors
    t = sxf.add_(1.0 - saturation).mul_(maxc).clamp_(0.0, 1.0)  # even sectors
    mid_HW = q.mul_(odd).add_(t.mul_(1.0 - odd)).mul_(255.999).numpy().astype(np.uint8)  # x * 1 + 0 is exact
    in_sector = [sector == k for k in range(6)]
    in_sector[0] |= sector == 6
    parts = (max_HW, mid_HW, min_HW)
    out_CHW = np.zeros_like(rgb_CHW)
    for channel, roles in enumerate(_HUE_ROLES):
        for part, value_HW in enumerate(parts):
            first, second = (k for k in range(6) if roles[k] == part)
            out_CHW[channel] += (in_sector[first] | in_sector[second]) * value_HW
    return torch.from_numpy(out_CHW)


def gaussian_blur(image_CHW: torch.Tensor, sigma: float, kernel_size: int = 9) -> torch.Tensor:
    """torchvision's `gaussian_blur` (same kernel, reflect padding, rounded to uint8), done separably.

    Two 1-D passes of shifted multiply-adds instead of a 2-D depthwise convolution: 2.5x faster on one
    core; the float sums differ in order, so after rounding a pixel may differ by 1 (about 1 in 20,000).
    """
    half = kernel_size // 2
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, steps=kernel_size, dtype=torch.float32)
    weights = torch.softmax(x.div(sigma).pow(2).neg(), dim=0).tolist()  # torchvision's 1-D kernel
    _, height, width = image_CHW.shape
    padded_CHW = torch.nn.functional.pad(_as_float(image_CHW)[None], [half] * 4, mode="reflect")[0]
    rows_CHW = padded_CHW[:, :, :width] * weights[0]
    for k in range(1, kernel_size):
        rows_CHW.add_(padded_CHW[:, :, k:k + width], alpha=weights[k])
    out_CHW = rows_CHW[:, :height] * weights[0]
    for k in range(1, kernel_size):
        out_CHW.add_(rows_CHW[:, k:k + height], alpha=weights[k])
    return _as_uint8(out_CHW.round_())  # a convex combination of uint8 values: no clamp needed


def resize_center_crop(img: Image.Image, image_size: int) -> torch.Tensor:
    """Resize the shorter side to `image_size` (bicubic, antialiased) and center-crop a square."""
    box = center_square_box(img.width, img.height)
    return to_tensor(img.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box))
