"""Encoders and cached features: any model -> (summary_BD, patch_BND, grid), extracted once per dataset.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D token width, h/w patch grid.

Three kinds of MODEL share one interface (`Encoder`): an exported student folder (it has `unic.json`), a
registry alias or explicit teacher spec (`unic_cli.teachers.load_teacher`, local weights with `SPEC=PATH`), and
a bare timm model name (treated as `timm:NAME`). Each is wrapped in a `Teacher`, so every model takes uint8
images on the device and resizes/normalises them itself.

Images are decoded once per dataset for all models of a call (PIL, in loader workers) and resized to each
distinct model resolution there, so a model's features depend on the model and the data only, never on which
other models share the call; that is what lets the on-disk cache hit. The cache key is (model identity incl.
weights file size/mtime, dataset folder + file list fingerprint, resolution, feature kind).

Each cache entry is a folder of row chunks written while the pass runs (`FeatureStore`), so an interrupted
extraction (hours on ImageNet) resumes after its last whole chunk, and at most one chunk per model is held in
memory. Probes read entries lazily (`Features`): one model's features at a time, dense patch tokens
memory-mapped (`RowStore`), since they do not fit in memory at scale. Dense targets: training splits at one
size ([M, H, W]), test splits at each image's own size (`RaggedTargets`, memory-mapped), where they are scored.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from unic_cli.data import IMAGE_EXTENSIONS, decode_image, list_image_folder, resize_center_crop
from unic_cli.errors import DataError, ProbeError, UnknownTeacherError
from unic_cli.files import atomic_write
from unic_cli.registry import TeacherCard, TeacherSpec, parse_teacher_spec
from unic_cli.teachers import Teacher, load_teacher, resolve_card

log = logging.getLogger("unic_cli")

# Bump when extraction changes in a way that changes cached features.
FEATURE_VERSION = 2  # 2: an entry is a folder of row chunks (resumable), not one file
DEPTH_EXTENSIONS = (".png", ".npy")

ProgressFn = Callable[[str, int, int], None]  # (label, done, total)


def _no_progress(label: str, done: int, total: int) -> None:
    pass


# ----------------------------------------------------------------------------------------------------------------
# Dataset layouts
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """One split of a probe dataset: image files, and labels (classification) or target files (dense)."""

    name: str
    root: Path
    images: tuple[Path, ...]
    labels: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    targets: tuple[Path, ...] = ()

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the folder and its file list (names, sizes, mtimes): a changed file changes the key."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for path in (*self.images, *self.targets):
            st = path.stat()
            h.update(f"{path.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def find_splits(data_dir: Path, *, need_train: bool, eval_split: str | None) -> tuple[Path | None, Path]:
    """The train folder (None when not needed) and the evaluation folder (`eval_split`, else test, else val)."""
    if not data_dir.is_dir():
        raise DataError(f"--data {str(data_dir)!r} is not a folder; it must hold train/ and val/ or test/")
    problems = []
    train = data_dir / "train"
    if need_train and not train.is_dir():
        problems.append(f"{str(data_dir)!r} has no train/ split")
    if eval_split is not None:
        evaluation = data_dir / eval_split
        if not evaluation.is_dir():
            problems.append(f"{str(data_dir)!r} has no {eval_split}/ split (from --eval-split)")
    else:
        evaluation = next((data_dir / s for s in ("test", "val") if (data_dir / s).is_dir()), data_dir / "val")
        if not evaluation.is_dir():
            problems.append(f"{str(data_dir)!r} has neither a val/ nor a test/ split")
    if problems:
        found = sorted(p.name + "/" for p in data_dir.iterdir() if p.is_dir())
        raise DataError("; ".join(problems) + f" (found: {', '.join(found) or 'no folders'}). Expected "
                        "DIR/train/ plus DIR/val/ or DIR/test/: class folders for knn/linear/zeroshot, "
                        "images/ + masks/ for seg, images/ + depth/ for depth.")
    return (train if need_train else None), evaluation


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(map(str, names[:n]))
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def list_class_split(split_dir: Path) -> Split:
    """A class-folder split: `split_dir/<class>/**/<image>`; class index = sorted folder order."""
    folders = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if "images" in folders and {"masks", "depth"} & folders and folders <= {"images", "masks", "depth"}:
        targets = sorted(folders - {"images"})
        tasks = " or ".join(f"--task {'seg' if t == 'masks' else 'depth'}" for t in targets)
        raise DataError(f"{str(split_dir)!r} holds images/ + {'/ + '.join(targets)}/ (the seg/depth layout), not "
                        f"class folders; knn, linear and zeroshot need {split_dir.name}/<class>/<image>: use {tasks}")
    entries = list_image_folder(split_dir)
    loose = [p.name for p, c in entries if not c]
    if loose:
        raise DataError(f"{str(split_dir)!r} has images outside class folders ({_few(loose)}); knn, linear and "
                        f"zeroshot expect {split_dir.name}/<class>/<image> (for seg or depth use --task seg|depth)")
    classes = sorted({c for _, c in entries})
    index = {c: i for i, c in enumerate(classes)}
    return Split(split_dir.name, split_dir, tuple(p for p, _ in entries), tuple(index[c] for _, c in entries),
                 tuple(classes))


def check_same_classes(train: Split, evaluation: Split) -> None:
    """Class folders must be the same in both splits, or labels would silently mean different classes."""
    if train.classes == evaluation.classes:
        return
    only_train = sorted(set(train.classes) - set(evaluation.classes))
    only_eval = sorted(set(evaluation.classes) - set(train.classes))
    parts = []
    if only_train:
        parts.append(f"only in {train.name}/: {_few(only_train)}")
    if only_eval:
        parts.append(f"only in {evaluation.name}/: {_few(only_eval)}")
    raise DataError(f"class folders differ between {str(train.root)!r} and {str(evaluation.root)!r} "
                    f"({'; '.join(parts)}); both splits need the same class folders")


def list_dense_split(split_dir: Path, target_folder: Literal["masks", "depth"]) -> Split:
    """`split_dir/images/*` paired by file stem with `split_dir/masks/*.png` or `split_dir/depth/*.{png,npy}`."""
    image_dir, target_dir = split_dir / "images", split_dir / target_folder
    task = "seg" if target_folder == "masks" else "depth"
    missing = [f"{d.name}/" for d in (image_dir, target_dir) if not d.is_dir()]
    if missing:
        raise DataError(f"{str(split_dir)!r} has no {' or '.join(missing)}; --task {task} expects "
                        f"{split_dir.name}/images/ and {split_dir.name}/{target_folder}/ with matching file names")
    images = _images_in(image_dir)
    if not images:
        raise DataError(f"{str(image_dir)!r} holds no images")
    extensions = (".png",) if target_folder == "masks" else DEPTH_EXTENSIONS
    by_stem = {p.stem: p for p in sorted(target_dir.iterdir())
               if p.suffix.lower() in extensions and not p.name.startswith(".")}
    lacking = [p.name for p in images if p.stem not in by_stem]
    if lacking:
        kinds = " or ".join(extensions)
        raise DataError(f"{len(lacking)} of {len(images)} images in {str(image_dir)!r} have no {kinds} in "
                        f"{target_folder}/ with the same name: {_few(lacking)}")
    return Split(split_dir.name, split_dir, tuple(images), targets=tuple(by_stem[p.stem] for p in images))


# ----------------------------------------------------------------------------------------------------------------
# Decoding (CPU, loader workers): images once, resized to every requested size
# ----------------------------------------------------------------------------------------------------------------


# What PIL (or a broken file) raises while decoding: that image is left out, never fatal. Not a blanket
# `except Exception`, so a bug in our own code still surfaces.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error,
                  Image.DecompressionBombError)


class _ImageDataset(torch.utils.data.Dataset):
    """Decode each image once and return it at every size in `sizes` (uint8 CHW), plus an ok flag.

    `stretch` resizes the whole image to the square (dense tasks, whose targets cover the whole image);
    otherwise the shorter side is resized and the centre cropped. An unreadable file gives zeros and ok=False,
    so a bad file costs one row instead of the whole extraction; callers drop those rows.
    """

    def __init__(self, images: Sequence[Path], sizes: Sequence[int], *, stretch: bool) -> None:
        self.images, self.sizes, self.stretch = [str(p) for p in images], list(sizes), stretch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], bool]:
        try:
            image = decode_image(self.images[index])
        except _DECODE_ERRORS:
            return tuple(torch.zeros(3, s, s, dtype=torch.uint8) for s in self.sizes), False
        if self.stretch:
            out = [_uint8_chw(image.resize((s, s), Image.Resampling.BICUBIC)) for s in self.sizes]
        else:
            out = [resize_center_crop(image, s) for s in self.sizes]
        return tuple(out), True


def _uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


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


# ----------------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------------


class _TimmTokens(nn.Module):
    """A timm model (an exported student) as a teachers.base.Backbone: final-norm tokens, prefix split off."""

    def __init__(self, model: nn.Module, *, is_vit: bool) -> None:
        super().__init__()
        self.model, self.is_vit = model, is_vit

    def forward_tokens(self, images_BCHW: torch.Tensor):
        if not self.is_vit:
            fmap_BDhw = self.model.forward_features(images_BCHW)
            summary_BD = self.model.forward_head(fmap_BDhw, pre_logits=True)
            return summary_BD, fmap_BDhw.flatten(2).transpose(1, 2), tuple(fmap_BDhw.shape[-2:])
        (patch_BDhw, prefix_BPD), = self.model.forward_intermediates(
            images_BCHW, indices=1, norm=True, return_prefix_tokens=True, output_fmt="NCHW", intermediates_only=True
        )
        # the class token (timm puts it first, before any registers); none: the mean patch token downstream, as
        # the student was distilled (a register token is no summary)
        has_cls = getattr(self.model, "cls_token", None) is not None
        summary_BD = prefix_BPD[:, 0] if has_cls and prefix_BPD.shape[1] else None
        return summary_BD, patch_BDhw.flatten(2).transpose(1, 2), tuple(patch_BDhw.shape[-2:])


@dataclass(frozen=True)
class ModelRef:
    """A MODEL argument resolved without loading weights: enough to key the cache and to load it later.

    Attributes:
        name: the key in probe.json: the MODEL argument as typed, a student folder normalised
            (`normalise_model_name`).
        kind: `student` (an exported folder) or `teacher` (a registry alias, explicit spec or timm name).
        image_size: the side of the square input this model is fed.
        identity: what its features depend on (model, weights files, resolution); hashed into cache keys.
        spec: the teacher spec (teachers), with any resolution override applied.
        folder: the exported folder (students).
    """

    name: str
    kind: Literal["student", "teacher"]
    image_size: int
    identity: dict
    spec: TeacherSpec | None = None
    folder: Path | None = None


@dataclass(eq=False)
class Encoder:
    """A loaded model behind the common interface: images -> (summary_BD, patch_BND, grid).

    `module` is a frozen `Teacher`: it takes uint8 or [0, 1] images on its device, resizes them to its input
    size and normalises them with its own mean/std.
    """

    ref: ModelRef
    module: Teacher

    @property
    def name(self) -> str:
        return self.ref.name

    @torch.no_grad()
    def __call__(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """A model without a summary token gets its mean patch token as summary."""
        summary_BD, patch_BND = self.module(images_BCHW)
        if summary_BD is None:
            summary_BD = patch_BND.mean(dim=1)
        return summary_BD.float(), patch_BND.float(), self.module.grid

    @torch.no_grad()
    def dense_tokens(self, images_BCHW: torch.Tensor, num_levels: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens of the last `num_levels` feature levels, concatenated channel-wise (see multi_level_tokens)."""
        if num_levels == 1:
            _, patch_BND = self.module(images_BCHW)
            return patch_BND.float(), self.module.grid
        return multi_level_tokens(self.module, images_BCHW, num_levels)


DENSE_STRIDE = 16  # ConvNet levels are laid on a 16-pixel grid, the patch grid of a ViT/16 at the same input


def timm_model_of(module: Teacher) -> nn.Module | None:
    """The timm model inside a Teacher (timm teachers and exported students), or None for other sources."""
    model = getattr(module.backbone, "model", None)
    return model if model is not None and hasattr(model, "forward_intermediates") else None


def multi_level_tokens(module: Teacher, images_BCHW: torch.Tensor, num_levels: int):
    """The last `num_levels` feature levels of a timm model as one token map: (patch_BND float32, grid).

    A ViT gives its last blocks' patch tokens, each through the final norm (DINOv2's multi-layer linear probe).
    A ConvNet gives its last stages (timm `feature_info`), average-pooled or bilinearly upsampled onto a grid of
    stride 16 (or its coarsest stage's stride, if finer): a hypercolumn, where a ConvNet's last map alone is at
    stride 32 and too coarse for small objects.
    """
    model = timm_model_of(module)
    if model is None:
        raise ProbeError(f"--dense-layers {num_levels} needs a timm model; {module.card.alias!r} is a "
                         f"{module.card.source} model: probe it with --dense-layers 1")
    available = len(model.blocks) if module.card.family == "vit" else len(getattr(model, "feature_info", []))
    if num_levels > available:
        raise ProbeError(f"--dense-layers {num_levels}: {module.card.alias!r} has {available} feature levels; "
                         f"use at most {available}")
    x, autocast = module.precision(module.preprocess(images_BCHW))
    with autocast:
        if module.card.family == "vit":
            maps = model.forward_intermediates(x, indices=num_levels, norm=True, output_fmt="NCHW",
                                               intermediates_only=True)
            grid = tuple(maps[-1].shape[-2:])
        else:
            maps = model.forward_intermediates(x, indices=num_levels, intermediates_only=True)
            stride = min(DENSE_STRIDE, x.shape[-1] // maps[-1].shape[-1])
            grid = (-(-x.shape[-2] // stride), -(-x.shape[-1] // stride))
    resized = []
    for fmap_BDhw in maps:
        fmap_BDhw = fmap_BDhw.float()
        if tuple(fmap_BDhw.shape[-2:]) != grid:
            finer = fmap_BDhw.shape[-1] > grid[1]
            fmap_BDhw = (F.adaptive_avg_pool2d(fmap_BDhw, grid) if finer
                         else F.interpolate(fmap_BDhw, size=grid, mode="bilinear", align_corners=False))
        resized.append(fmap_BDhw)
    return torch.cat(resized, dim=1).flatten(2).transpose(1, 2), grid


def is_student_dir(model: str) -> bool:
    return (Path(model).expanduser() / "unic.json").is_file()


def normalise_model_name(model: str) -> str:
    """The probe.json key of a MODEL: a student folder without `./` or a trailing `/` (shell completion adds
    one), so `students/a/` and `students/a` are one model; any other MODEL as typed."""
    return os.path.normpath(model) if is_student_dir(model) else model


def _file_stamp(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _vit_size(size: int, patch: int) -> int:
    """The nearest multiple of the patch size (a ViT needs whole patches)."""
    return max(patch, round(size / patch) * patch)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ProbeError(f"{str(path)!r} is unreadable ({err}); re-run `unic export` for this student") from None


def _check_weights(path: Path) -> None:
    """An exported student's model.safetensors must exist and have a readable header (the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ProbeError(f"{str(path)!r} is missing, so this student folder is incomplete; re-run `unic export` "
                         "for this student")
    try:
        with safe_open(path, framework="pt"):
            pass
    except (OSError, SafetensorError) as err:
        raise ProbeError(f"{str(path)!r} is not a readable safetensors file ({err}); re-run `unic export` for "
                         "this student") from None


def _resolve_spec(model: str) -> TeacherSpec:
    """A teacher spec; a bare timm model name that is not a registry alias becomes `timm:NAME`."""
    spec = parse_teacher_spec(model)
    if spec.source != "alias":
        return spec
    try:
        resolve_card(spec)
        return spec
    except UnknownTeacherError as err:
        if Path(model).expanduser().is_dir():
            raise ProbeError(f"{model!r} is a folder without unic.json; pass a folder written by `unic export`, "
                             "a registry alias, a teacher spec or a timm model name") from None
        import timm

        if timm.is_model(spec.target.split(".")[0]):
            return parse_teacher_spec("timm:" + model)
        name = spec.name
        if spec.weights is None and ("/" in name or os.sep in name or name.startswith((".", "~"))):  # no alias does
            what = "is a file, not a folder" if Path(model).expanduser().exists() else "does not exist"
            raise ProbeError(f"MODEL {model!r} looks like a student folder, but it {what}; pass a folder written "
                             "by `unic export` (check the path), a registry alias, a teacher spec or a timm model "
                             "name") from None
        raise err


def resolve_model(model: str, *, image_size: int | None = None, pretrained: bool = True, seed: int = 0) -> ModelRef:
    """Resolve a MODEL argument (student folder, alias, teacher spec, timm name) without loading weights.

    Args:
        model: the MODEL argument.
        image_size: None feeds the model at its own resolution (classification); an int feeds it at that
            resolution (dense tasks), rounded to a multiple of a ViT's patch size.
        pretrained: False means random weights (a baseline; cached separately, seeded by `seed`).
    """
    extra = {"pretrained": pretrained, **({} if pretrained else {"seed": seed})}
    if is_student_dir(model):
        folder = Path(model).expanduser()
        config, meta = _read_json(folder / "config.json"), _read_json(folder / "unic.json")
        _check_weights(folder / "model.safetensors")
        native = int(config.get("pretrained_cfg", {}).get("input_size", (3, 224, 224))[-1])
        patch = int(meta.get("student", {}).get("patch_size") or 16)
        size = native if image_size is None else _vit_size(image_size, patch)
        files = [folder / n for n in ("config.json", "unic.json", "model.safetensors")]
        # "summary": how the summary token is read (v2: a register token is no summary; cached v1 features are stale)
        identity = {"kind": "student", "files": [_file_stamp(p) for p in files], "image_size": size,
                    "summary": 2, **extra}
        return ModelRef(normalise_model_name(model), "student", size, identity, folder=folder)
    spec = _resolve_spec(model)
    card = resolve_card(spec)
    if image_size is not None and image_size != card.image_size:
        size = _vit_size(image_size, card.patch_size) if card.family == "vit" else image_size
        spec = dataclasses.replace(spec, overrides={**spec.overrides, "image_size": str(size)})
        card = resolve_card(spec)
    identity = {"kind": "teacher", "spec": spec.text, "card": card.to_dict(), **extra}
    local = [spec.weights, Path(card.weights).expanduser() if card.weights and ":" not in card.weights else None]
    stamps = [_file_stamp(p) for p in local if p is not None and p.is_file()]
    if stamps:
        identity["weights"] = stamps
    return ModelRef(model, "teacher", card.image_size, identity, spec=spec)


def _build_student(ref: ModelRef, *, pretrained: bool) -> Teacher:
    """An exported student folder (model.safetensors + timm config.json + unic.json) as a frozen Teacher."""
    import timm

    folder = ref.folder
    config, meta = _read_json(folder / "config.json"), _read_json(folder / "unic.json")
    cfg = config.get("pretrained_cfg", {})
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    # timm resamples the position embedding while loading the weights at another size
    kwargs = {"img_size": ref.image_size} if ref.image_size != native else {}
    model = timm.create_model(f"local-dir:{folder}", pretrained=pretrained, num_classes=0, **kwargs)
    is_vit = hasattr(model, "num_prefix_tokens") and hasattr(model, "patch_embed")
    # a ConvNet's "patch size" is the stride of its last feature map
    patch = int(model.patch_embed.patch_size[0]) if is_vit else int(model.feature_info[-1]["reduction"])
    interpolation = cfg.get("interpolation", "bicubic")
    card = TeacherCard(
        alias=ref.name, source="timm", model_id=config.get("architecture", "unknown"),
        family="vit" if is_vit else "convnet", image_size=ref.image_size, patch_size=patch,
        summary_dim=int(model.num_features), patch_dim=int(model.num_features),
        num_register_tokens=int(getattr(model, "num_reg_tokens", 0) or 0),
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))), std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear", "nearest") else "bicubic",
        license=",".join(meta.get("license", {}).get("licenses", [])) or "unknown",
    )
    return Teacher(card, _TimmTokens(model, is_vit=is_vit))


def load_encoder(ref: ModelRef, *, device: str = "cpu") -> Encoder:
    """Load a resolved model's weights (or seeded random weights) onto `device`."""
    pretrained = ref.identity["pretrained"]
    torch.manual_seed(ref.identity.get("seed", 0))
    if ref.kind == "student":
        module = _build_student(ref, pretrained=pretrained)
    else:
        module = load_teacher(ref.spec, grid=None, pretrained=pretrained)
    return Encoder(ref, module.to(device))


# ----------------------------------------------------------------------------------------------------------------
# Feature cache: one folder of row chunks per (model, split, kind), written as the pass goes (resumable)
# ----------------------------------------------------------------------------------------------------------------

# A chunk is flushed once a job has this many bytes of features waiting: at most this much work per model is
# lost to an interrupt, and at most this much host memory per model is held while extracting.
CHUNK_BYTES = 256 * 2**20
_CHUNK_NAME = "rows-{:09d}-{:09d}.safetensors"
_COMPLETE = "complete.json"
_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                 "U8": np.uint8, "BOOL": np.bool_}
_SAFETENSORS_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in (Path(text).name or text))
    return keep[:40] or "model"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def _disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _write_atomic(path: Path, data: bytes | Sequence[memoryview], what: str) -> None:
    """Write `data` (bytes, or buffers written one after the other) through a temporary name, then rename:
    a crash never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffers = [data] if isinstance(data, bytes) else data
    try:
        with atomic_write(path) as f:
            for buffer in buffers:
                f.write(buffer)
    except OSError as err:
        if not _disk_full(err):
            raise
        free = shutil.disk_usage(path.parent).free
        size = sum(memoryview(b).nbytes for b in buffers)
        raise ProbeError(f"the disk holding the feature cache {str(path.parent.parent)!r} is full ({_gib(free)} "
                         f"free) while writing {_gib(size)} of {what}; free some space or pass --cache-dir "
                         "on a bigger disk. Chunks already written are kept: the same command resumes") from None


class RowStore:
    """One feature's rows spread over memory-mapped chunk files: rows are read only when taken.

    Dense patch features do not fit in memory at scale (ADE20K train, ViT-G/14 at 448 px: 64 GiB in fp16),
    so probes gather the rows of each batch from here instead of holding the whole array.

    Args:
        parts: one array per chunk, [rows, ...] each (numpy memmaps).
        index: global row numbers this view holds (None: every row, in order).
    """

    def __init__(self, parts: Sequence[np.ndarray], index: np.ndarray | None = None) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.starts = self.ends - np.array([len(p) for p in self.parts], dtype=np.int64)
        self.index = index
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.shape = (total if index is None else len(index), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.parts[0].itemsize

    def __getitem__(self, rows: torch.Tensor | slice) -> RowStore:
        """A view of some rows (a bool mask, row numbers or a slice); nothing is read."""
        local = np.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).cpu().numpy()
        if local.dtype == np.bool_:
            local = np.flatnonzero(local)
        return RowStore(self.parts, local if self.index is None else self.index[local])

    def take(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Rows read into memory, as a CPU tensor (one copy per chunk touched, no per-row loop)."""
        local = np.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).cpu().numpy()
        wanted = local if self.index is None else self.index[local]
        part = np.searchsorted(self.ends, wanted, side="right")
        out = np.empty((len(wanted), *self.shape[1:]), dtype=self.parts[0].dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][wanted[sel] - self.starts[p]]
        return torch.from_numpy(out)

    def load(self) -> torch.Tensor:
        return self.take(slice(None))


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the byte offset of its data; ValueError when the file is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"{size} bytes, the header describes {8 + length + end}")
    return header, 8 + length


def _safetensors_buffers(arrays: dict[str, list[np.ndarray]], metadata: dict[str, str]) -> list:
    """A safetensors file as buffers to write one after the other: each tensor is its arrays concatenated along
    the first axis, without making that concatenated copy (nor a serialised one, as the library's `save` would)."""
    header: dict[str, dict] = {"__metadata__": metadata}
    buffers, offset = [], 0
    for name, parts in arrays.items():
        size = sum(a.nbytes for a in parts)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[parts[0].dtype], "data_offsets": [offset, offset + size],
                        "shape": [sum(len(a) for a in parts), *parts[0].shape[1:]]}
        buffers += [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in parts if a.size]
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [struct.pack("<Q", len(raw)) + raw, *buffers]


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, memory-mapped (copy-on-write: writable for torch, the file never is).

    Raises OSError or ValueError when the file is missing or damaged.
    """
    header, offset = _read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype, shape = _NUMPY_DTYPES[info["dtype"]], tuple(info["shape"])
        out[name] = (np.memmap(path, dtype=dtype, mode="c", offset=offset + begin, shape=shape)
                     if end > begin else np.empty(shape, dtype=dtype))
    return out


class FeatureStore:
    """One cache entry: a folder of row chunks `rows-<start>-<end>.safetensors`, then `complete.json`.

    Chunks are written in row order, each atomically, so after an interrupt the folder holds a run of whole
    chunks from row 0: extraction resumes after the last of them. A chunk whose header, size, key or rows do
    not check out (a damaged disk, a stray file) is deleted and extracted again.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = folder.name.rsplit("-", 1)[-1]

    @property
    def complete(self) -> bool:
        return (self.folder / _COMPLETE).is_file()

    def chunks(self) -> list[tuple[int, int, Path]]:
        """The valid chunks that continue each other from row 0, as (start, end, path); the rest is deleted."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.glob("rows-*.safetensors")):
            try:
                start, end = (int(x) for x in path.stem.split("-")[1:3])
                meta = _read_header(path)[0].get("__metadata__", {})
                if meta.get("key") != self.key or (int(meta["start"]), int(meta["end"])) != (start, end):
                    raise ValueError("its key or rows do not match its name")
            except (OSError, ValueError, KeyError) as err:
                log.warning("cache chunk %s is damaged (%s): extracting those rows again", path, err)
                path.unlink(missing_ok=True)
                continue
            found.append((start, end, path))
        run, row = [], 0
        for start, end, path in found:
            if start == row:
                run.append((start, end, path))
                row = end
            else:  # not contiguous (chunks of another interrupted pass): redo from `row`
                path.unlink(missing_ok=True)
        return run

    def next_row(self) -> int:
        chunks = self.chunks()
        return chunks[-1][1] if chunks else 0

    def write_chunk(self, start: int, tensors: dict[str, torch.Tensor | Sequence[torch.Tensor]], what: str) -> None:
        """Write rows `start`... of each feature (a tensor, or batches to be concatenated) as one chunk file.

        The safetensors layout is written by hand from the batches' buffers: no concatenated copy and no
        serialised copy of the chunk is made (the library's `save` would hold both, 3x the chunk in memory).
        """
        parts = {k: [v] if isinstance(v, torch.Tensor) else list(v) for k, v in tensors.items()}
        end = start + sum(len(v) for v in next(iter(parts.values())))
        arrays = {name: [b.detach().cpu().contiguous().numpy() for b in batches] for name, batches in parts.items()}
        _write_atomic(self.folder / _CHUNK_NAME.format(start, end),
                      _safetensors_buffers(arrays, {"key": self.key, "start": str(start), "end": str(end)}), what)

    def finish(self, rows: int, meta: dict) -> None:
        _write_atomic(self.folder / _COMPLETE, json.dumps({"rows": rows, **meta}, default=str).encode(), "metadata")

    def arrays(self) -> dict[str, list[np.ndarray]]:
        """Every feature as memory-mapped chunk arrays (copy-on-write: writable for torch, the file never is)."""
        out: dict[str, list[np.ndarray]] = {}
        for _, _, path in self.chunks():
            for name, array in _map_safetensors(path).items():
                out.setdefault(name, []).append(array)
        return out


class Features(Mapping):
    """A complete cache entry, read lazily: `feats["summary"]` reads that feature (all rows) when asked.

    Small features are returned as tensors; `patch` (dense tokens) as a memory-mapped `RowStore`. Nothing is
    kept, so a caller that drops the tensor frees its memory: a probe holds one model's features at a time.
    """

    MAPPED = ("patch",)

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._arrays = store.arrays()

    def __getitem__(self, name: str) -> torch.Tensor | RowStore:
        rows = RowStore(self._arrays[name])
        return rows if name in self.MAPPED else rows.load()

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


class FeatureCache:
    """Feature entries under `root`, one folder per (model identity, split fingerprint, feature kind)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, ref: ModelRef, split: Split, kind: str) -> Path:
        key = _digest({"v": FEATURE_VERSION, "model": ref.identity, "data": split.fingerprint, "kind": kind})
        return self.root / f"{_slug(ref.name)}-{split.name}-{_slug(kind)}-{key}"

    def target_path(self, split: Split, kind: str, size: tuple[int, int] | None, depth_scale: float) -> Path:
        """The cache file of a split's targets: resized to `size` ([M, H, W]), or at their own sizes when `size` is
        None (`RaggedTargets`, another layout under another key and name: never read as the other)."""
        # "png8": depth targets cached before 8-bit PNGs were refused may hold such maps: read them again
        extra = {"scale": depth_scale, "png8": "refused"} if kind == "depth" else {"scale": None}
        layout = {} if size is not None else {"layout": "ragged"}
        key = _digest({"v": FEATURE_VERSION, "data": split.fingerprint, "kind": kind, "size": size, **extra, **layout})
        name = kind if size is not None else f"{kind}-native"
        return self.root / f"targets-{split.name}-{name}-{key}.safetensors"

    @staticmethod
    def features(path: Path) -> Features | None:
        """A complete entry, or None (absent, or only partly extracted)."""
        store = FeatureStore(path)
        if not store.complete:
            return None
        try:
            rows = int(json.loads((path / _COMPLETE).read_text(encoding="utf-8"))["rows"])
        except (OSError, ValueError, KeyError):
            rows = -1
        if store.next_row() != rows:  # a chunk was damaged or deleted since: extract those rows again
            log.warning("cache entry %s lacks rows it once held: extracting them again", path)
            (path / _COMPLETE).unlink(missing_ok=True)
            return None
        return Features(store)

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (OSError, SafetensorError) as err:  # e.g. a file truncated by a full disk: extract again
            log.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None

    @staticmethod
    def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta, default=str)})
        _write_atomic(path, data, "targets")


def _slot(meta: dict) -> tuple | None:
    """What a cache entry stands for apart from its key: (model name, split folder, feature kind, input size,
    pretrained, seed); None when its metadata does not say (such an entry is never removed)."""
    try:
        identity = meta["identity"]
        size = identity["image_size"] if "image_size" in identity else identity["card"]["image_size"]
        return (meta["model"], meta["split"], meta["kind"], size, identity["pretrained"], identity.get("seed"))
    except (KeyError, TypeError):
        return None


def remove_superseded(path: Path, meta: dict) -> list[Path]:
    """Delete the cache entries that the complete entry `path` replaces; returns what was deleted.

    A complete entry with the same slot (`_slot`: model name, split folder, kind, resolution, random-init seed)
    but another key was extracted from other weights (a re-exported student, an updated card), another file
    list of the dataset, or by an older feature version: its key can never match again, so it only takes disk
    space. Entries of other models, datasets, resolutions or seeds are kept, and so are unfinished entries (no
    complete.json: possibly another process extracting now). Single-file entries of feature version 1 with the
    same name prefix are never read by this version and are deleted too.
    """
    slot = _slot(meta)
    prefix = path.name.rsplit("-", 1)[0]
    if slot is None or not path.parent.is_dir():
        return []
    removed = []
    for other in sorted(path.parent.iterdir()):
        if other == path or other.name.rsplit("-", 1)[0] != prefix:
            continue
        if other.is_file() and other.suffix == ".safetensors":  # feature version 1
            other.unlink(missing_ok=True)
            removed.append(other)
            continue
        try:
            other_meta = json.loads((other / _COMPLETE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(other_meta, dict) and _slot(other_meta) == slot:
            # readers that mapped its chunks keep them (POSIX); a failed delete only leaves the space used
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    if removed:
        log.info("removed %d superseded cache entr%s of %s (%s/, %s): %s", len(removed),
                 "y" if len(removed) == 1 else "ies", meta["model"], Path(meta["split"]).name, meta["kind"],
                 ", ".join(p.name for p in removed))
    return removed


@dataclass
class Job:
    """One model's pass over a split: `fn(images_BCHW at image_size) -> {name: tensor per batch}`, cached."""

    name: str
    image_size: int
    path: Path
    fn: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    meta: dict


class _ChunkWriter:
    """A job's rows waiting to be written: flushed as a chunk once they reach `chunk_bytes`."""

    def __init__(self, job: Job, start: int, chunk_bytes: int) -> None:
        self.job, self.store, self.start, self.chunk_bytes = job, FeatureStore(job.path), start, chunk_bytes
        self.parts: dict[str, list[torch.Tensor]] = {}
        self.rows = self.bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            self.parts.setdefault(key, []).append(value)
        self.rows += len(tensors["ok"])
        self.bytes += sum(v.numel() * v.element_size() for v in tensors.values())
        if self.bytes >= self.chunk_bytes:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.store.write_chunk(self.start, self.parts, f"{self.job.name} features")
            self.start += self.rows
        self.parts, self.rows, self.bytes = {}, 0, 0


def _check_disk(jobs: Sequence[Job], bytes_per_row: dict[str, int], rows_left: dict[str, int]) -> None:
    """Refuse a pass the cache disk cannot hold, after its first batch rather than hours later."""
    need = sum(bytes_per_row[job.name] * rows_left[job.name] for job in jobs)
    folder = jobs[0].path.parent
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ProbeError(f"the features of this pass need about {_gib(need)} in the cache {str(folder)!r}, and its "
                         f"disk has {_gib(free)} free; free some space or pass --cache-dir on a bigger disk")


def run_jobs(jobs: Sequence[Job], split: Split, *, stretch: bool, batch_size: int, num_workers: int, device: str,
             progress: ProgressFn = _no_progress, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Features]:
    """Decode `split` once and run every job on each batch, writing each job's rows in chunks as it goes.

    A job whose entry already holds chunks (an interrupted earlier pass) resumes after its last whole chunk: the
    pass decodes from the earliest such row, and a job skips the rows it has. Every output also gets "ok" [M]
    (bool): False rows are unreadable images, to be dropped by the caller.

    Args:
        chunk_bytes: bytes of features per chunk file and job (the most an interrupt can lose).
    """
    total = len(split.images)
    starts = {job.name: FeatureStore(job.path).next_row() for job in jobs}
    first = min(starts.values())
    for job in jobs:
        if starts[job.name]:
            log.info("%s: resuming %s/ features at image %d of %d (earlier chunks are cached)", job.name,
                     split.name, starts[job.name], total)
    sizes = sorted({job.image_size for job in jobs})
    dataset = torch.utils.data.Subset(_ImageDataset(split.images, sizes, stretch=stretch), range(first, total))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         pin_memory=device.startswith("cuda"))
    if total - first > 20_000 and num_workers < min(8, os.cpu_count() or 1):
        log.warning("decoding %d images with %d loader worker(s) on a %d-core machine: pass --num-workers %d or "
                    "more if the encoders wait for images", total - first, num_workers, os.cpu_count(),
                    min(8, os.cpu_count() or 1))
    writers = {job.name: _ChunkWriter(job, starts[job.name], chunk_bytes) for job in jobs}
    label = f"{split.name}/ " + ", ".join(_slug(job.name) for job in jobs)
    row, checked = first, False
    began = logged = time.monotonic()
    progress(label, row, total)
    try:
        for images, ok_B in loader:
            by_size = {s: im.to(device, non_blocking=True) for s, im in zip(sizes, images)}
            batch_rows = {}
            for job in jobs:
                skip = starts[job.name] - row  # rows of this batch the job already has in its chunks
                if skip >= len(ok_B):
                    continue
                out = {k: v.cpu() for k, v in job.fn(by_size[job.image_size]).items()}
                out["ok"] = ok_B.bool()
                writers[job.name].add({k: v[max(skip, 0):] for k, v in out.items()})
                batch_rows[job.name] = sum(v[0].numel() * v.element_size() for v in out.values())
            if not checked and batch_rows:
                checked = True
                _check_disk([j for j in jobs if j.name in batch_rows], batch_rows,
                            {name: total - max(starts[name], row) for name in batch_rows})
            row += len(ok_B)
            progress(label, row, total)
            # without a progress bar (the Python API, a batch job's log) say how far it is once a minute
            if progress is _no_progress and time.monotonic() - logged >= 60:
                logged = time.monotonic()
                speed = (row - first) / (logged - began)
                log.info("%s: %d/%d images, %.0f images/s, about %.0f min left", label, row, total, speed,
                         (total - row) / max(speed, 1e-9) / 60)
    except KeyboardInterrupt:
        kept = min(w.start for w in writers.values())
        if kept:
            log.warning("interrupted: %s/ features of images 0-%d of %d are kept in %s; the same command resumes "
                        "there", split.name, kept, total, jobs[0].path.parent)
        else:
            log.warning("interrupted before a whole chunk of %s/ features (%s per model) was written; nothing of "
                        "this pass is kept", split.name, _gib(chunk_bytes))
        raise
    out = {}
    for job in jobs:
        writers[job.name].flush()
        store = writers[job.name].store
        store.finish(total, job.meta)
        remove_superseded(job.path, job.meta)  # only now: a failed pass never costs the old entry
        out[job.name] = Features(store)
    ok = out[jobs[0].name]["ok"]
    if not ok.all():
        bad = [split.images[i].name for i in (~ok).nonzero().flatten().tolist()]
        log.warning("%d unreadable image(s) in %s left out: %s", len(bad), split.root, _few(bad))
    return out


def extract_features(
    refs: Sequence[ModelRef],
    splits: Sequence[Split],
    *,
    kind: Literal["pooled", "patch"],
    cache: FeatureCache,
    batch_size: int,
    num_workers: int,
    device: str,
    progress: ProgressFn = _no_progress,
    dense_levels: int = 1,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, dict[str, Features]]:
    """Features of each split for every model: from the cache, or from one shared pass per split.

    A model is loaded (once) only when some split misses the cache; a partly extracted entry is resumed.
    Returns split name -> model name -> `Features` (read lazily from the cache): {"summary": [M, D],
    "patch_mean": [M, D]} (kind `pooled`, float32) or {"patch": RowStore [M, N, D] (float16), "grid": [M, 2]}
    (kind `patch`; `dense_levels` > 1 concatenates the last feature levels, see `multi_level_tokens`), plus
    "ok" [M] marking readable images.
    """
    cache_kind = kind if kind == "pooled" or dense_levels == 1 else f"{kind}-levels{dense_levels}"
    out: dict[str, dict[str, Features]] = {split.name: {} for split in splits}
    missing: dict[str, list[ModelRef]] = {split.name: [] for split in splits}
    for split in splits:
        for ref in refs:
            cached = cache.features(cache.path(ref, split, cache_kind))
            if cached is not None:
                log.info("%s: %s features of %s/ from the cache", ref.name, kind, split.name)
                out[split.name][ref.name] = cached
            else:
                missing[split.name].append(ref)
    encoders = {ref.name: load_encoder(ref, device=device) for ref in refs
                if any(ref in m for m in missing.values())}

    def job(ref: ModelRef, split: Split) -> Job:
        encoder = encoders[ref.name]

        def fn(images_BCHW):
            if kind == "pooled":
                summary_BD, patch_BND, _ = encoder(images_BCHW)
                return {"summary": summary_BD, "patch_mean": patch_BND.mean(dim=1)}
            patch_BND, grid = encoder.dense_tokens(images_BCHW, dense_levels)
            return {"patch": patch_BND.half(), "grid": torch.tensor(grid).expand(patch_BND.shape[0], 2)}

        meta = {"model": ref.name, "identity": ref.identity, "split": str(split.root), "kind": cache_kind}
        return Job(ref.name, ref.image_size, cache.path(ref, split, cache_kind), fn, meta)

    for split in splits:
        if missing[split.name]:
            jobs = [job(ref, split) for ref in missing[split.name]]
            out[split.name].update(run_jobs(jobs, split, stretch=kind == "patch", batch_size=batch_size,
                                            num_workers=num_workers, device=device, progress=progress,
                                            chunk_bytes=chunk_bytes))
    return out


def load_targets(split: Split, kind: Literal["mask", "depth"], *, cache: FeatureCache, depth_scale: float,
                 num_workers: int, progress: ProgressFn = _no_progress) -> torch.Tensor:
    """Masks (uint8 or int32) or depth maps (float32) of a dense split, all at the first target's size, cached.

    For training: a split whose targets differ in size is resized (nearest: no label or depth is invented) to
    the first one's, so batches stack (as training crops or resizes in the segmentation toolboxes). Scores use
    `load_native_targets`.
    """
    size = tuple(read_target(split.targets[0], kind, depth_scale=depth_scale).shape)
    path = cache.target_path(split, kind, size, depth_scale)
    cached = cache.load(path)
    if cached is not None:
        return cached["targets"]
    if kind == "depth":  # in this process: one clear error naming the files, not one from a loader worker
        check_depth_files(split.targets, depth_scale=depth_scale)
    loader = torch.utils.data.DataLoader(_TargetDataset(split.targets, kind, size, depth_scale), batch_size=32,
                                         num_workers=num_workers)
    chunks, done = [], 0
    label = f"{split.name}: {'masks' if kind == 'mask' else 'depth maps'}"
    for batch in loader:
        # narrowed per batch: int64 masks of a whole split (ADE20K train: 56 GiB) never exist at once
        if kind == "mask":
            batch = _narrow_mask(batch)
        chunks.append(batch.float() if kind == "depth" else batch)
        done += len(batch)
        progress(label, done, len(split.targets))
    wide = any(c.dtype == torch.int32 for c in chunks)
    targets = torch.cat([c.to(torch.int32) for c in chunks] if wide else chunks)
    cache.save(path, {"targets": targets}, {"split": str(split.root), "size": size})
    return targets


def load_native_targets(split: Split, kind: Literal["mask", "depth"], *, cache: FeatureCache, depth_scale: float,
                        num_workers: int, progress: ProgressFn = _no_progress) -> RaggedTargets:
    """Masks (uint8 or int32) or depth maps (float32) of a dense split, each at its own size, cached.

    The test targets: mmsegmentation (ADE20K, Pascal VOC) and the depth toolboxes (NYU, KITTI) score every image
    at the resolution of its annotation. Stored ragged (`RaggedTargets`: one flat buffer plus offsets and shapes)
    in one safetensors file, and memory-mapped from it.
    """
    path = cache.target_path(split, kind, None, depth_scale)
    cached = _load_ragged(path, len(split.targets))
    if cached is not None:
        return cached
    if kind == "depth":  # in this process: one clear error naming the files, not one from a loader worker
        check_depth_files(split.targets, depth_scale=depth_scale)
    loader = torch.utils.data.DataLoader(_TargetDataset(split.targets, kind, None, depth_scale), batch_size=32,
                                         num_workers=num_workers, collate_fn=list)
    images: list[torch.Tensor] = []
    label = f"{split.name}: {'masks' if kind == 'mask' else 'depth maps'}"
    for batch in loader:
        # narrowed per image: int64 masks of a whole split never exist at once
        images += [_narrow_mask(t) if kind == "mask" else t.float() for t in batch]
        progress(label, len(images), len(split.targets))
    if any(t.dtype == torch.int32 for t in images):
        images = [t.to(torch.int32) for t in images]
    shapes_M2 = np.array([t.shape for t in images], dtype=np.int64).reshape(-1, 2)
    sizes_M = shapes_M2.prod(axis=1)
    arrays = {"flat": [t.numpy().reshape(-1) for t in images], "offsets": [np.cumsum(sizes_M) - sizes_M],
              "shapes": [shapes_M2]}
    meta = {"split": str(split.root), "kind": kind, "layout": "ragged"}
    _write_atomic(path, _safetensors_buffers(arrays, {"meta": json.dumps(meta)}), "targets")
    del images, arrays
    return _load_ragged(path, len(split.targets))


def _load_ragged(path: Path, num_images: int) -> RaggedTargets | None:
    """A ragged targets file, memory-mapped; None when it is absent, damaged or not of this split's size."""
    if not path.is_file():
        return None
    try:
        arrays = _map_safetensors(path)
        flat, offsets, shapes = arrays["flat"], arrays["offsets"], arrays["shapes"]
        if len(offsets) != num_images or shapes.shape != (num_images, 2) or (
                num_images and int(offsets[-1] + shapes[-1].prod()) != len(flat)):
            raise ValueError(f"{len(offsets)} images and {len(flat)} pixels, expected {num_images} images")
    except (OSError, ValueError, KeyError) as err:  # e.g. a file truncated by a full disk: read the targets again
        log.warning("ignoring unreadable cache file %s (%s)", path, err)
        return None
    return RaggedTargets(torch.from_numpy(flat), torch.from_numpy(offsets), torch.from_numpy(shapes))
