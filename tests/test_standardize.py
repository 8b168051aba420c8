"""EmaStandardizer: first step uses the batch statistics, EMA blending, checkpoint keys."""

from __future__ import annotations

import torch

from unic_cli.standardize import EmaStandardizer, TeacherStandardizers


def test_standardizer__momentum_one_standardises_the_batch():
    y_BND = torch.randn(4, 10, 8) * 5 + 3
    out = EmaStandardizer(8)(y_BND, momentum=1.0)
    flat = out.reshape(-1, 8)
    torch.testing.assert_close(flat.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.var(0, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)


def test_standardizer__ema_blends_with_momentum_and_none_freezes():
    std = EmaStandardizer(2)
    std.update(torch.tensor([[1.0, 1.0], [3.0, 3.0]]), momentum=1.0)  # mean 2, var 1
    std.update(torch.tensor([[10.0, 10.0], [10.0, 10.0]]), momentum=0.25)  # mean 10, var 0
    torch.testing.assert_close(std.mean_D, torch.tensor([4.0, 4.0]))
    torch.testing.assert_close(std.var_D, torch.tensor([0.75, 0.75]))
    before = std.mean_D.clone()
    std(torch.randn(3, 2), momentum=None)
    torch.testing.assert_close(std.mean_D, before)


def test_teacher_standardizers__flat_checkpoint_keys_round_trip():
    stds = TeacherStandardizers([(4, 4), (None, 6)])
    keys = sorted(stds.state_dict())
    assert keys == ["t0.patch.mean_D", "t0.patch.var_D", "t0.summary.mean_D", "t0.summary.var_D",
                    "t1.patch.mean_D", "t1.patch.var_D"]
    state = {k: torch.rand_like(v) for k, v in stds.state_dict().items()}
    other = TeacherStandardizers([(4, 4), (None, 6)])
    other.load_state_dict(state)
    torch.testing.assert_close(other.state_dict()["t1.patch.var_D"], state["t1.patch.var_D"])
