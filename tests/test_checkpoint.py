"""Checkpoints: atomic files, last.pt, pruning, weights_only loading, clear errors."""

from __future__ import annotations

import pytest
import torch

from unic_cli.checkpoint import find_checkpoint, load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from unic_cli.errors import CheckpointError


def _payload(step):
    return {"format": "unic-checkpoint", "format_version": 1, "step": step, "w": torch.full((3,), float(step)),
            "config": {"teachers": ["a"]}, "rng": rng_states(torch.Generator().manual_seed(step))}


def test_save_checkpoint__last_points_at_newest_and_old_ones_are_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(_payload(step), tmp_path, keep=2)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    ckpt = load_checkpoint(tmp_path)  # a run folder resolves to last.pt, loaded with weights_only=True
    assert ckpt["step"] == 3 and torch.equal(ckpt["w"], torch.full((3,), 3.0))
    assert find_checkpoint(folder / "step_0000002.pt").name == "step_0000002.pt"


def test_rng_states__restore_redraws_the_same_numbers():
    gen = torch.Generator().manual_seed(5)
    state = rng_states(gen)
    first = (torch.rand(3), torch.rand(3, generator=gen))
    restore_rng_states(state, gen)
    assert torch.equal(first[0], torch.rand(3)) and torch.equal(first[1], torch.rand(3, generator=gen))


def test_load_checkpoint__foreign_or_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no unic checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a `unic distill` checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
