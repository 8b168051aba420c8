"""Training and evaluation loaders: seeded order, rank sharding, exact resume, skipped-file counting.

Shape legend: B batch, C channels (3, RGB), H height, W width.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import math
import numbers
import os
import signal
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from unic_cli.data.image import (
    DECODE_ERRORS,
    augment_colour,
    center_square_box,
    load_crop,
    random_resized_crop_box,
    to_tensor,
)
from unic_cli.data.source import list_image_folder, open_image_source
from unic_cli.errors import DataError

log = logging.getLogger("unic_cli")

AUGMENTATIONS = ("unic", "none")
# Domain tags so the permutation and the augmentation streams never share a seed sequence.
_PERMUTATION_TAG, _AUGMENT_TAG = 0x5EED_0001, 0x5EED_0002
_MAX_SKIP_WARNINGS = 20


class Batch(NamedTuple):
    """One training batch: `images_BCHW` uint8 (pinned when CUDA is available) and how many images of
    this batch (plus, with one process, any wholly unreadable batch folded into it) were skipped as unreadable.
    With several ranks, a wholly unreadable batch is stood in for by this rank's latest readable batch before it
    (its next one at the very start of a run): every rank takes exactly one batch position per batch."""

    images_BCHW: torch.Tensor
    num_skipped: int


class EvalBatch(NamedTuple):
    """One evaluation batch. `index_B` are positions in `EvalLoader.paths` of the images kept (an
    unreadable image is absent, so use it to align features with `EvalLoader.labels`); `label_B` is
    -1 when the images have no class folders."""

    images_BCHW: torch.Tensor
    label_B: torch.Tensor
    index_B: torch.Tensor
    num_skipped: int


# ---------------------------------------------------------------------------------------------
# Datasets and collation


@dataclass(frozen=True)
class _Sample:
    """What a worker sends back: an image, or None with the reason it was skipped."""

    image_CHW: torch.Tensor | None
    path: str
    error: str | None


class _TrainDataset(torch.utils.data.Dataset):
    """Map-style dataset over an image source; keys are (index, epoch) so augmentations can be seeded."""

    def __init__(self, source, *, image_size: int, augment: str, seed: int,
                 crop_scale: tuple[float, float]) -> None:  # see open_image_source
        self.source, self.image_size, self.augment, self.seed = source, image_size, augment, seed
        self.crop_scale = crop_scale

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> _Sample:
        index, epoch = key
        path = self.source.name(index)
        try:
            if self.augment == "unic":
                rng = np.random.default_rng([self.seed, epoch, index, _AUGMENT_TAG])
                img = load_crop(self.source.open(index), self.image_size,
                                partial(random_resized_crop_box, rng=rng, scale=self.crop_scale))
                return _Sample(augment_colour(img, rng), path, None)
            img = load_crop(self.source.open(index), self.image_size, center_square_box)
            return _Sample(to_tensor(img), path, None)
        except DECODE_ERRORS as err:
            return _Sample(None, path, f"{type(err).__name__}: {err}")


def _stack(samples: Sequence[_Sample]) -> tuple[torch.Tensor, list[tuple[str, str]], list[bool]]:
    kept = [s.image_CHW for s in samples if s.image_CHW is not None]
    skipped = [(s.path, s.error) for s in samples if s.image_CHW is None]
    if kept:
        out = None
        if torch.utils.data.get_worker_info() is not None:
            # Stack straight into shared memory (as torch's default_collate does): otherwise the batch is copied
            # there once more when it is sent to the main process.
            storage = kept[0].untyped_storage()._new_shared(len(kept) * kept[0].numel())
            out = torch.empty(0, dtype=torch.uint8).set_(storage).view(len(kept), *kept[0].shape)
        images_BCHW = torch.stack(kept, out=out)
    else:
        images_BCHW = torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    return images_BCHW, skipped, [s.image_CHW is not None for s in samples]


def _collate_train(samples: Sequence[_Sample]) -> tuple[torch.Tensor, list[tuple[str, str]]]:
    images_BCHW, skipped, _ = _stack(samples)
    return images_BCHW, skipped


class _SkipLog:
    """Warn once per unreadable file, and stop naming files after `_MAX_SKIP_WARNINGS` of them."""

    def __init__(self) -> None:
        self.paths: set[str] = set()
        self.num_skipped = 0

    def record(self, skipped: Sequence[tuple[str, str]]) -> None:
        for path, reason in skipped:
            self.num_skipped += 1
            if path in self.paths:
                continue
            self.paths.add(path)
            if len(self.paths) <= _MAX_SKIP_WARNINGS:
                log.warning("Skipping unreadable image %s (%s)", path, reason)
            if len(self.paths) == _MAX_SKIP_WARNINGS:
                log.warning("%d unreadable images so far; further ones are skipped and counted "
                               "without a warning each", _MAX_SKIP_WARNINGS)


@contextlib.contextmanager
def _one_torch_thread(enabled: bool = True) -> Iterator[None]:
    """One torch intra-op thread inside the block (when `enabled`), the caller's setting restored after."""
    previous = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _single_threaded(loader: torch.utils.data.DataLoader, num_workers: int) -> Iterator:
    """Iterate `loader`, decoding in-process batches with one torch thread.

    Per-image ops on small tensors gain nothing from intra-op threads, and on a busy machine the
    OpenMP threads' spin-waits made in-process decoding 4x slower (measured: 20 vs 79 images/s on
    2 shared cores). Workers already run single-threaded; the caller's setting is restored between
    batches, so the training step keeps its threads.
    """
    iterator = iter(loader)
    if num_workers:
        _LIVE_ITERATORS.add(iterator)
    try:
        while True:
            with _one_torch_thread(num_workers == 0):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
    finally:  # closed, failed or abandoned: end the workers now (see _shut_down_live_workers)
        _shut_down(iterator)


def _shut_down(iterator) -> None:
    _LIVE_ITERATORS.discard(iterator)
    if (shutdown := getattr(iterator, "_shutdown_workers", None)) is not None:
        shutdown()  # idempotent: torch's __del__ calls it again


# Worker iterators not shut down yet. One still alive when the interpreter exits (held by a traceback, a global)
# would be left to multiprocessing's exit, which SIGTERMs and joins its workers: they take STOP_GRACE_S to obey
# (`_shield_worker_from_stop_signals`). This hook runs before it (atexit is LIFO) and shuts them down the
# ordinary way (a sentinel on their queues), as the end of an epoch does.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _shut_down_live_workers() -> None:
    for iterator in list(_LIVE_ITERATORS):
        _shut_down(iterator)


# A decoding worker that got SIGTERM exits this long after it (see `_shield_worker_from_stop_signals`).
STOP_GRACE_S = 120.0


def _shield_worker_from_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: SIGINT and SIGTERM leave the stop to the main process.

    Ctrl-C (the terminal's process group), SLURM (every process of the job step), torchrun and `kill -- -PGID`
    signal the workers too. torch's worker died of SIGTERM, and its SIGCHLD handler then raised in the main
    process wherever it was (mid-step): the run ended with a traceback instead of finishing its step and
    checkpointing (`unic_cli.distill`). Ctrl-C ended a worker quietly, losing its batch in progress. Now the
    main process stops at a step boundary and shuts its workers down itself. A worker cannot tell who sent a
    SIGTERM (Python's handlers get no sender), and its parent sends one to a worker that fails to exit
    (DataLoader's shutdown, multiprocessing at exit), so SIGTERM still ends a worker, `STOP_GRACE_S` later.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Python runs a handler only between bytecodes of the main thread, which a stuck worker never reaches; the
    # wakeup fd is written by the C-level handler itself, so the grace thread wakes whatever the main thread does.
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=_exit_after_grace, args=(read_fd,), name="unic-stop-grace", daemon=True).start()


def _exit_after_grace(read_fd: int) -> None:
    while os.read(read_fd, 1) != bytes([signal.SIGTERM]):
        pass
    time.sleep(STOP_GRACE_S)
    os._exit(0)  # exit code 0: the main process reports no failed worker (it stopped reading, or shut us down)


PREFETCH_BYTES = 2 << 30  # uint8 batches prepared ahead by the workers of one training loader (see prefetch_factor)


def prefetch_factor(batch_size: int, image_size: int, num_workers: int) -> int:
    """Batches each worker prepares ahead: 4, fewer when batches are big, so that the batches in flight stay under
    `PREFETCH_BYTES` of pinned host memory per process (128 images at 1024 px, for a SAM teacher, are 400 MB a
    batch: 4 workers x 4 of them would pin 6.4 GB on every rank)."""
    batch_bytes = batch_size * 3 * image_size**2
    return max(1, min(4, PREFETCH_BYTES // (max(num_workers, 1) * batch_bytes)))


class _EpochBatches:
    """Infinite batch sampler: each epoch a seeded permutation; this rank's slice of every global batch.

    Global batch `step` of an epoch is permutation[step * G:(step + 1) * G] with G = batch_size *
    world_size, and rank r takes its r-th contiguous chunk of B. The tail of an epoch shorter than a
    global batch (of `accum_steps` micro-batches: an optimiser step) is dropped (as the official code's
    drop_last), so every rank runs the same steps and an epoch holds whole optimiser steps.
    """

    def __init__(self, *, num_images: int, batch_size: int, rank: int, world_size: int, seed: int,
                 start_epoch: int, start_step: int, steps_per_epoch: int, order_fn=None) -> None:
        self.num_images, self.batch_size, self.rank, self.world_size = num_images, batch_size, rank, world_size
        self.seed, self.start_epoch, self.start_step = seed, start_epoch, start_step
        self.steps_per_epoch = steps_per_epoch  # the loader's (`steps_per_epoch()`): whole optimiser steps
        self.order_fn = order_fn  # a source's own epoch order (parquet: block shuffle), from the same generator

    def epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch, _PERMUTATION_TAG])
        return self.order_fn(rng) if self.order_fn is not None else rng.permutation(self.num_images)

    def keys(self, order: np.ndarray, epoch: int, step: int) -> list[tuple[int, int]]:
        """This rank's dataset keys of global batch `step` of `epoch`, whose `epoch_order` is `order`."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return [(int(i), epoch) for i in order[start:start + self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, step = self.start_epoch, self.start_step
        while True:
            order = self.epoch_order(epoch)
            for s in range(step, self.steps_per_epoch):
                yield self.keys(order, epoch, s)
            epoch, step = epoch + 1, 0


class TrainLoader:
    """Endless, resumable, rank-sharded stream of augmented uint8 batches (see `build_train_loader`).

    Iterating yields `Batch`es forever; epochs roll over with a new permutation. `state_dict()` is the
    position after the last batch handed out; `load_state_dict()` before iterating resumes there with
    identical batches. Each `iter()` starts from the current position.
    """

    def __init__(self, dataset: _TrainDataset, *, batch_size: int, num_workers: int, seed: int,
                 rank: int, world_size: int, pin_memory: bool, accum_steps: int = 1) -> None:
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.seed, self.rank, self.world_size, self.pin_memory = seed, rank, world_size, pin_memory
        self.num_images = len(dataset)
        self.steps_per_epoch = steps_per_epoch(self.num_images, batch_size * world_size, accum_steps)
        self.epoch, self.batch_index = 0, 0
        self.skip_log = _SkipLog()

    @property
    def num_skipped_total(self) -> int:
        """Unreadable images met so far by this loader (counted each time one is drawn)."""
        return self.skip_log.num_skipped

    def state_dict(self) -> dict:
        """Plain ints only (loadable with `torch.load(weights_only=True)`)."""
        return {"epoch": self.epoch, "batch_index": self.batch_index,
                "samples_seen": self.batch_index * self.batch_size * self.world_size,
                "seed": self.seed, "num_images": self.num_images, "batch_size": self.batch_size,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`'s position; a different batch size or process count keeps the position
        in images (exact when the global batch size is unchanged)."""
        if state.get("seed", self.seed) != self.seed or state.get("num_images", self.num_images) != self.num_images:
            log.warning("Resuming data with seed %s and %s images, saved with seed %s and %s images: "
                           "the order differs from the interrupted run", self.seed, self.num_images,
                           state.get("seed"), state.get("num_images"))
        global_batch = self.batch_size * self.world_size
        seen = state.get("samples_seen", state["batch_index"] * global_batch)
        if seen % global_batch:
            log.warning("Resuming with a global batch of %d images after %d images of epoch %d: "
                           "restarting at image %d of that epoch", global_batch, seen, state["epoch"],
                           seen - seen % global_batch)
        self.epoch, self.batch_index = int(state["epoch"]), seen // global_batch
        if self.batch_index >= self.steps_per_epoch:
            self.epoch, self.batch_index = self.epoch + 1, 0

    def __iter__(self) -> Iterator[Batch]:
        sampler = _EpochBatches(num_images=self.num_images, batch_size=self.batch_size, rank=self.rank,
                                world_size=self.world_size, seed=self.seed, start_epoch=self.epoch,
                                start_step=self.batch_index, steps_per_epoch=self.steps_per_epoch,
                                order_fn=getattr(self.dataset.source, "epoch_order", None))
        # An explicit generator: the DataLoader draws its workers' base seed from it, not from the global RNG
        # (which the training loop owns: drop path, initialisation). Nothing here depends on that seed anyway.
        generator = torch.Generator().manual_seed(self.seed)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=_collate_train,
            pin_memory=self.pin_memory,
            prefetch_factor=prefetch_factor(self.batch_size, self.dataset.image_size, self.num_workers)
            if self.num_workers else None,
            persistent_workers=False, generator=generator,
            worker_init_fn=_shield_worker_from_stop_signals if self.num_workers else None)
        # previous_BCHW: this rank's latest readable batch (several ranks only); ahead_BCHW: its next readable one,
        # while no earlier one exists (the start of a run); empty_run: wholly unreadable batches in a row up to here.
        pending_skipped, empty_run, previous_BCHW, ahead_BCHW, first = 0, 0, None, None, True
        for images_BCHW, skipped in _single_threaded(loader, self.num_workers):
            self.batch_index += 1
            if self.batch_index == self.steps_per_epoch:
                self.epoch, self.batch_index = self.epoch + 1, 0
            self.skip_log.record(skipped)
            pending_skipped += len(skipped)
            if len(images_BCHW):
                empty_run = 0
                if self.world_size > 1:
                    previous_BCHW = images_BCHW
                yield Batch(images_BCHW, pending_skipped)
                pending_skipped, first = 0, False
                continue
            # every image of this batch was unreadable
            empty_run += 1
            if self.world_size == 1:  # one process: fold it into the next batch
                if empty_run >= self.steps_per_epoch:
                    raise self._empty_epoch_error()
                continue
            # Under data parallelism every rank must take one batch position per batch (a checkpoint holds rank 0's,
            # and the global batch is cut from one permutation): a stand-in repeats this rank's latest readable
            # batch. It is a function of the position, not of what this iteration has seen, so that a resumed run
            # equals the straight one: right after a (re)start it is looked up, decoded again.
            if first:
                position = self.epoch * self.steps_per_epoch + self.batch_index - 1  # this batch's, from the run start
                decode = self._decoder(sampler)
                empty_run, previous_BCHW = self._look_back(decode, position)
                empty_run += 1
                if empty_run < self.steps_per_epoch and previous_BCHW is None:  # nothing readable since the run start
                    ahead_BCHW = self._look_ahead(decode, position, empty_run)
            if empty_run >= self.steps_per_epoch:
                raise self._empty_epoch_error()
            yield Batch(previous_BCHW if previous_BCHW is not None else ahead_BCHW, pending_skipped)
            pending_skipped, first = 0, False

    def _empty_epoch_error(self) -> DataError:
        where = "" if self.world_size == 1 else f" for rank {self.rank} of {self.world_size}"
        return DataError(f"No readable image in a whole epoch{where} of {self.dataset.source.root!r} "
                         f"({self.skip_log.num_skipped} failed to decode); check the files.")

    def _look_back(self, decode, position: int) -> tuple[int, torch.Tensor | None]:
        """(wholly unreadable batches right before `position`, the readable batch before them or None): what a
        straight run holds in memory there. Bounded: `steps_per_epoch` unreadable batches in a row end the run."""
        for back in range(1, min(position, self.steps_per_epoch - 1) + 1):
            images_BCHW = decode(position - back)
            if len(images_BCHW):
                return back - 1, images_BCHW
        return min(position, self.steps_per_epoch - 1), None

    def _look_ahead(self, decode, position: int, empty_run: int) -> torch.Tensor:
        """This rank's next readable batch after `position` (that position is not taken here: the batch is handed
        out again when the stream reaches it).

        Raises:
            DataError: a whole epoch of wholly unreadable batches in a row comes first.
        """
        for ahead in range(1, self.steps_per_epoch - empty_run + 1):
            images_BCHW = decode(position + ahead)
            if len(images_BCHW):
                return images_BCHW
        raise self._empty_epoch_error()

    def _decoder(self, sampler: _EpochBatches):
        """decode(position): this rank's batch at `position` (counted from the run start), decoded in this process
        with the pixels a worker gives (augmentation is seeded per image); its unreadable images are not counted
        again. For the rare wholly unreadable batch only."""
        # A shallow copy: per-process file handles (parquet, Arrow) are dropped (`__getstate__`), so none stays open
        # here for later workers to inherit, and the source's caches are left as they are.
        dataset = copy.copy(self.dataset)
        dataset.source = copy.copy(self.dataset.source)
        orders: dict[int, np.ndarray] = {}  # an epoch's order is a permutation of every image: computed once

        def decode(position: int) -> torch.Tensor:
            epoch, step = divmod(position, self.steps_per_epoch)
            if epoch not in orders:
                orders[epoch] = sampler.epoch_order(epoch)
            with _one_torch_thread():  # as workers and in-process decoding run (see _single_threaded)
                images_BCHW, _ = _collate_train([dataset[key] for key in sampler.keys(orders[epoch], epoch, step)])
            # as the DataLoader pins: only with CUDA (it warns and skips pinning without, pin_memory() would raise)
            pin = self.pin_memory and len(images_BCHW) and torch.cuda.is_available()
            return images_BCHW.pin_memory() if pin else images_BCHW

        return decode


def steps_per_epoch(num_images: int, micro_batch: int, accum_steps: int = 1) -> int:
    """Micro-batches of `micro_batch` images (all processes) in an epoch: whole optimiser steps of `accum_steps`
    micro-batches only, so k micro-batches of b see exactly the images one batch of k * b sees."""
    return num_images // (micro_batch * accum_steps) * accum_steps


def open_train_source(data: Path | str, *, batch_size: int, world_size: int = 1, accum_steps: int = 1):
    """`open_image_source` plus the training check that it holds one global batch: every data error of a run,
    cheap enough to raise before any model is built (`unic distill` opens its data first, then its teachers)."""
    source = open_image_source(data)
    _check_global_batch(source, batch_size, world_size, accum_steps)
    return source


def _check_global_batch(source, batch_size: int, world_size: int, accum_steps: int = 1) -> None:
    global_batch = batch_size * world_size * accum_steps
    if len(source) < global_batch:
        accum = f" x {accum_steps} accumulation steps" if accum_steps > 1 else ""
        raise DataError(f"{source.root!r} has {len(source)} images, fewer than one global batch of "
                        f"{global_batch} ({batch_size} per process x {world_size} processes{accum}); lower "
                        f"--batch-size or add images.")


def _check_sizes(**values: int) -> None:
    """The loaders' integer settings, checked up front: a batch size of 0 divides by zero and an image size of 0
    makes every image "unreadable" (a misleading warning per file) much later."""
    minimum = {"num_workers": 0}
    problems = [f"{name} must be an integer >= {minimum.get(name, 1)}, got {value!r}" for name, value in values.items()
                if isinstance(value, bool) or not isinstance(value, numbers.Integral)
                or value < minimum.get(name, 1)]
    if problems:
        raise DataError("; ".join(problems) + ".")


def build_train_loader(data_dir, *, image_size: int, batch_size: int, num_workers: int, seed: int,
                       rank: int = 0, world_size: int = 1, augment: str = "unic",
                       crop_scale: tuple[float, float] = (0.08, 1.0), pin_memory: bool | None = None,
                       accum_steps: int = 1) -> TrainLoader:
    """Endless training stream over a folder of images (class subfolders allowed, labels ignored).

    Args:
        data_dir: a folder searched recursively for `IMAGE_EXTENSIONS`, or WebDataset tar shards
            (see `open_image_source`); or a source already opened by `open_train_source`.
        image_size: square output side in pixels.
        batch_size: images per batch on this process.
        num_workers: decoding processes (0 decodes in the calling process).
        seed: fixes the order and every augmentation; must be >= 0.
        rank, world_size: this process's slice of every global batch of `batch_size * world_size`.
        augment: "unic" (the paper's recipe, `augment_unic`) or "none" (resize + center crop).
        crop_scale: the random crop's area range, as fractions of the image (the "unic" augmentation).
        pin_memory: pin batches for fast host-to-device copies; default: when CUDA is available.
        accum_steps: micro-batches per optimiser step (gradient accumulation): an epoch then holds whole
            steps, its tail shorter than `batch_size * world_size * accum_steps` images dropped.

    Raises:
        DataError: the folder is missing or empty, holds fewer images than one global batch, or a size or
            count is out of range (image_size, batch_size, world_size, accum_steps below 1, num_workers below 0).
    """
    _check_sizes(image_size=image_size, batch_size=batch_size, num_workers=num_workers, world_size=world_size,
                 accum_steps=accum_steps)
    if augment not in AUGMENTATIONS:
        raise DataError(f"Unknown augmentation {augment!r}; choose one of {', '.join(AUGMENTATIONS)}.")
    if not (len(crop_scale) == 2 and 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0):
        raise DataError(f"crop scale must be two fractions 0 < MIN <= MAX <= 1, got {list(crop_scale)}.")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}.")
    if seed < 0:
        raise DataError(f"The data seed must be >= 0, got {seed}.")
    source = open_image_source(data_dir) if isinstance(data_dir, (str, os.PathLike)) else data_dir
    _check_global_batch(source, batch_size, world_size, accum_steps)
    dataset = _TrainDataset(source, image_size=image_size, augment=augment, seed=seed,
                            crop_scale=(float(crop_scale[0]), float(crop_scale[1])))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return TrainLoader(dataset, batch_size=batch_size, num_workers=num_workers, seed=seed, rank=rank,
                       world_size=world_size, pin_memory=pin_memory, accum_steps=accum_steps)




class _EvalDataset(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], image_size: int) -> None:
        self.paths, self.image_size = list(paths), image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, _Sample]:
        path = self.paths[index]
        try:
            img = load_crop(path, self.image_size, center_square_box)
            return index, _Sample(to_tensor(img), path, None)
        except DECODE_ERRORS as err:
            return index, _Sample(None, path, f"{type(err).__name__}: {err}")


class EvalLoader:
    """Deterministic single pass over images, resized and center-cropped (see `build_eval_loader`).

    Attributes:
        paths: every listed image, in order.
        labels: class index per path (-1 without class folders).
        class_names: sorted class folder names ([] without class folders).
    """

    def __init__(self, paths: list[str], labels: list[int], class_names: list[str], *, image_size: int,
                 batch_size: int, num_workers: int) -> None:
        self.paths, self.labels, self.class_names = paths, labels, class_names
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.skip_log = _SkipLog()
        self._label_N = torch.tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __iter__(self) -> Iterator[EvalBatch]:
        loader = torch.utils.data.DataLoader(
            _EvalDataset(self.paths, self.image_size), batch_size=self.batch_size, shuffle=False,
            num_workers=self.num_workers, collate_fn=_collate_eval, pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(0))  # keeps the global RNG untouched
        pending_skipped = 0
        for images_BCHW, index_B, skipped in _single_threaded(loader, self.num_workers):
            self.skip_log.record(skipped)
            pending_skipped += len(skipped)
            if len(index_B):  # a batch of only unreadable files is folded into the next one
                yield EvalBatch(images_BCHW, self._label_N[index_B], index_B, pending_skipped)
                pending_skipped = 0


def _collate_eval(items: Sequence[tuple[int, _Sample]]) -> tuple[torch.Tensor, torch.Tensor, list]:
    images_BCHW, skipped, kept = _stack([s for _, s in items])
    index_B = torch.tensor([i for (i, _), k in zip(items, kept) if k], dtype=torch.long)
    return images_BCHW, index_B, skipped


def build_eval_loader(paths_or_dir: Path | Sequence[Path], *, image_size: int, batch_size: int,
                      num_workers: int = 0) -> EvalLoader:
    """A deterministic pass over a folder (labels from class subfolders) or an explicit list of paths.

    Raises:
        DataError: the folder is missing or holds no image, the list is empty, or a size is below 1.
    """
    _check_sizes(image_size=image_size, batch_size=batch_size, num_workers=num_workers)
    if isinstance(paths_or_dir, (str, os.PathLike)):
        entries = list_image_folder(Path(paths_or_dir))
        paths = [str(p) for p, _ in entries]
        names = [c for _, c in entries]
        if all(names):
            class_names = sorted(set(names))
            lookup = {c: i for i, c in enumerate(class_names)}
            labels = [lookup[c] for c in names]
        else:
            class_names, labels = [], [-1] * len(paths)
    else:
        paths = [str(p) for p in paths_or_dir]
        if not paths:
            raise DataError("build_eval_loader got an empty list of image paths.")
        class_names, labels = [], [-1] * len(paths)
    return EvalLoader(paths, labels, class_names, image_size=image_size, batch_size=batch_size,
                      num_workers=num_workers)
