"""Wholly unreadable batches: every rank takes one batch position per batch, and a resume equals the straight run.

Under data parallelism a rank whose batch holds no readable image stands in its latest readable batch before it (its
next readable one at the very start of a run), looked up from the position, not from memory: a run that starts, or
resumes, right before such a batch hands out the batches of a straight run. One process folds the batch into the
next one, as before.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unic_cli.data import build_train_loader
from unic_cli.errors import DataError

SIZE, BATCH, NUM_IMAGES = 32, 2, 16
STEPS = 8  # global batch 4 (2 ranks x 2): 4 batches per epoch, so two epochs


def _write_jpegs(folder, unreadable) -> None:
    """16 noise JPEGs `000.jpg`..., the ones in `unreadable` zero bytes."""
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        image = Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8))
        if i in unreadable:
            (folder / f"{i:03d}.jpg").write_bytes(b"")
        else:
            image.save(folder / f"{i:03d}.jpg")


def _loader(folder, rank: int, *, world_size: int = 2, num_workers: int = 0):
    return build_train_loader(folder, image_size=SIZE, batch_size=BATCH, num_workers=num_workers, seed=0, rank=rank,
                              world_size=world_size, augment="none")


def _take(loader, num_batches: int) -> list[tuple[torch.Tensor, int, int]]:
    """(images, num_skipped, batch_index after it) of the next `num_batches` batches."""
    it, out = iter(loader), []
    for _ in range(num_batches):
        images_BCHW, num_skipped = next(it)
        out.append((images_BCHW, num_skipped, loader.state_dict()["batch_index"]))
    return out


def _resumed(folder, rank: int, stop: int, *, world_size: int = 2, num_workers: int = 0):
    """`stop` batches, the state saved and loaded as a checkpoint does, then the rest of the STEPS batches."""
    first = _loader(folder, rank, world_size=world_size, num_workers=num_workers)
    before = _take(first, stop)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _loader(folder, rank, world_size=world_size, num_workers=num_workers)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    return before + _take(second, STEPS - stop)


def _assert_same(straight, resumed, what: str) -> None:
    assert len(straight) == len(resumed) == STEPS
    for step, ((a, skipped_a, index_a), (b, skipped_b, index_b)) in enumerate(zip(straight, resumed)):
        assert (skipped_a, index_a) == (skipped_b, index_b), f"{what}, batch {step}"
        assert torch.equal(a, b), f"{what}, batch {step}: other pixels"


@pytest.fixture(scope="module")
def first_half_unreadable(tmp_path_factory):
    """The review's repro: the first 8 of 16 files are zero-byte JPEGs; with seed 0, rank 0's first batch (and
    later ones) hold none readable."""
    folder = tmp_path_factory.mktemp("first_half_unreadable")
    _write_jpegs(folder, unreadable=range(8))
    return folder


def test_train_loader__unreadable_first_batch_keeps_the_ranks_in_step(first_half_unreadable) -> None:
    ranks = [_loader(first_half_unreadable, r) for r in (0, 1)]
    streams = [_take(loader, STEPS) for loader in ranks]
    for step in range(STEPS):  # no rank reads ahead: rank 0's first batch is wholly unreadable
        assert streams[0][step][2] == streams[1][step][2] == (step + 1) % 4, step
        assert all(len(stream[step][0]) for stream in streams), step  # a stand-in, never an empty batch
    # Every unreadable image drawn is counted once: 8 per epoch, two epochs.
    assert sum(s for stream in streams for _, s, _ in stream) == 16
    assert sum(loader.num_skipped_total for loader in ranks) == 16
    # At the start of the run the stand-in is the rank's next readable batch, handed out again at its own position.
    assert streams[0][0][1] == 2 and torch.equal(streams[0][0][0], streams[0][1][0])


@pytest.mark.parametrize(("num_workers", "stops"), [(0, range(1, STEPS)), (2, (1, 4, 5))],
                         ids=["in_process", "workers"])
def test_train_loader__resume_before_an_unreadable_batch_equals_a_straight_run(first_half_unreadable, num_workers,
                                                                                stops) -> None:
    for rank in (0, 1):  # the review's cases: rank 0 resumed at step 4, rank 1 at step 1
        straight = _take(_loader(first_half_unreadable, rank, num_workers=num_workers), STEPS)
        for stop in stops:
            _assert_same(straight, _resumed(first_half_unreadable, rank, stop, num_workers=num_workers),
                         f"rank {rank} resumed at {stop}")


def _red(images_BCHW: torch.Tensor) -> list[int]:
    return images_BCHW[:, 0, 0, 0].tolist()


def test_train_loader__unreadable_batch_mid_epoch_repeats_the_previous_one_after_a_resume(tmp_path) -> None:
    # Solid PNGs whose red channel names them (5 i + 3): find rank 0's third batch, then make both its files unreadable.
    for i in range(NUM_IMAGES):
        Image.new("RGB", (40, 30), (5 * i + 3, 100, 200)).save(tmp_path / f"{i:03d}.png")
    bad = [(red - 3) // 5 for red in _red(_take(_loader(tmp_path, 0), 3)[2][0])]
    for i in bad:
        (tmp_path / f"{i:03d}.png").write_bytes(b"")
    straight = [_take(_loader(tmp_path, r), STEPS) for r in (0, 1)]
    assert [b[2] for b in straight[0]] == [b[2] for b in straight[1]]
    # Rank 0 trains on its second batch again, with the two skipped images counted there.
    assert straight[0][2][1] == 2 and torch.equal(straight[0][2][0], straight[0][1][0])
    # Resumed right before it (nothing in memory) or right after it: the same batches, decoded again.
    for stop in (2, 3):
        _assert_same(straight[0], _resumed(tmp_path, 0, stop), f"rank 0 resumed at {stop}")


def test_train_loader__one_process_folds_an_unreadable_batch_and_resumes_exactly(first_half_unreadable) -> None:
    # One process: nothing to keep in step, so a wholly unreadable batch is folded into the next one (unchanged).
    loader = _loader(first_half_unreadable, 0, world_size=1)
    straight = _take(loader, STEPS)
    assert all(len(images) for images, _, _ in straight)
    assert sum(s for _, s, _ in straight) == loader.num_skipped_total
    for stop in range(1, STEPS):
        _assert_same(straight, _resumed(first_half_unreadable, 0, stop, world_size=1), f"resumed at {stop}")


def test_train_loader__a_rank_with_nothing_readable_raises(tmp_path) -> None:
    _write_jpegs(tmp_path, unreadable=range(NUM_IMAGES))
    with pytest.raises(DataError, match="No readable image in a whole epoch for rank 1 of 2"):
        next(iter(_loader(tmp_path, 1)))
