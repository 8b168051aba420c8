"""Feature extraction: any model -> (summary_BD, patch_BND, grid), extracted once per dataset, through the cache.

Shape legend: B batch, C channels, H/W pixels, N patch tokens, D token width, M rows (images).

Images are decoded once per dataset for all models of a call (PIL, in loader workers) and resized to each
distinct model resolution there, so a model's features depend on the model and the data only, never on which
other models share the call; that is what lets the on-disk cache (`unic_cli.probe.cache`) hit. Each model's rows
are written in chunks as the pass goes, so an interrupted pass resumes after its last whole chunk. Dense targets
are read through the same cache: training splits at one size ([M, H, W], `load_targets`), test splits at each
image's own size (`RaggedTargets`, memory-mapped, `load_native_targets`), where they are scored.
`unic_cli.probe.features.RaggedTargets` is the documented import path (docs/probe.md): it stays importable here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from unic_cli.data import decode_image, resize_center_crop
from unic_cli.errors import ProbeError
from unic_cli.probe.cache import (
    CHUNK_BYTES,
    FeatureCache,
    Features,
    FeatureStore,
    _gib,
    _map_safetensors,
    _safetensors_buffers,
    _slug,
    _write_atomic,
    remove_superseded,
)
from unic_cli.probe.encoder import ModelRef, load_encoder
from unic_cli.probe.split import Split, _few
from unic_cli.probe.target import RaggedTargets, _narrow_mask, _TargetDataset, check_depth_files, read_target

log = logging.getLogger("unic_cli")

ProgressFn = Callable[[str, int, int], None]  # (label, done, total)


def _no_progress(label: str, done: int, total: int) -> None:
    pass


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


# ----------------------------------------------------------------------------------------------------------------
# Extraction: one shared pass per split, each model's rows written in chunks
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Dense targets, read once per split and cached
# ----------------------------------------------------------------------------------------------------------------


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
