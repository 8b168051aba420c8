"""LadderProjector: Eq. 3 sums, head widths, shared vs dedicated heads, checkpoint key names."""

from __future__ import annotations

import pytest
import torch

from unic_cli.errors import ConfigError
from unic_cli.ladder import LadderProjector, parse_ladder_blocks


def _taps(num_blocks=4, B=2, N=9, D=16):
    return [(torch.randn(B, D), torch.randn(B, N, D)) for _ in range(num_blocks)]


def test_ladder__prediction_is_the_sum_of_per_block_heads():
    ladder = LadderProjector(in_dim=16, teacher_dims=[(24, 24), (None, 8)], blocks=(1, 3), num_blocks=4,
                             shared_heads=False, hidden_dim=16, last_hidden_dim=64)
    taps = _taps()
    preds = ladder([taps[1], taps[3]])
    heads = ladder.heads["t0"]["summary"]
    expected = heads["b1"](taps[1][0]) + heads["b3"](taps[3][0])
    torch.testing.assert_close(preds[0]["summary"], expected)
    assert preds[0]["patch"].shape == (2, 9, 24) and set(preds[1]) == {"patch"} and preds[1]["patch"].shape[-1] == 8
    assert ladder.heads["t0"]["patch"]["b1"].fc1.out_features == 16  # intermediate block: student width
    assert ladder.heads["t0"]["patch"]["b3"].fc1.out_features == 64  # last block: 4x


def test_ladder__state_dict_keys_follow_the_contract():
    ladder = LadderProjector(in_dim=16, teacher_dims=[(24, 24)], blocks=(3,), num_blocks=4, shared_heads=True,
                             hidden_dim=16, last_hidden_dim=64)
    assert sorted(ladder.state_dict()) == [f"heads.t0.shared.b3.fc{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    taps = _taps()
    pred = ladder([taps[3]])[0]
    both = ladder.heads["t0"]["shared"]["b3"](torch.cat([taps[3][0][:, None], taps[3][1]], dim=1))
    torch.testing.assert_close(pred["summary"], both[:, 0])


def test_ladder__shared_heads_need_equal_widths():
    with pytest.raises(ConfigError, match="shared heads need equal summary and patch widths"):
        LadderProjector(in_dim=16, teacher_dims=[(24, 32)], blocks=(3,), num_blocks=4, shared_heads=True,
                        hidden_dim=16, last_hidden_dim=64)


@pytest.mark.parametrize(("spec", "blocks"), [("all", (0, 1, 2, 3)), ("last", (3,)), ("0,2", (0, 2, 3)),
                                              ("-2", (2, 3))])
def test_parse_ladder_blocks__always_includes_the_last_block(spec, blocks):
    assert parse_ladder_blocks(spec, 4) == blocks


def test_parse_ladder_blocks__out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"block\(s\) \[7\] out of range"):
        parse_ladder_blocks("1,7", 4)


@pytest.mark.parametrize("shared", [False, True])
def test_ladder__fused_forward_equals_per_head_calls_with_gradients(shared):
    torch.manual_seed(0)
    dims = [(24, 24), (None, 8)] if not shared else [(24, 24), (None, 8), (12, 12)]
    ladder = LadderProjector(in_dim=16, teacher_dims=dims, blocks=(0, 1, 2, 3), num_blocks=4, shared_heads=shared,
                             hidden_dim=16, last_hidden_dim=64)
    taps = _taps()

    def run(fused):
        ladder.fused = fused
        ladder.zero_grad()
        preds = ladder(taps)
        sum(p.square().sum() for pred in preds for p in pred.values()).backward()
        return preds, {n: p.grad.clone() for n, p in ladder.named_parameters()}

    (fused, fused_grads), (plain, plain_grads) = run(True), run(False)
    assert [set(p) for p in fused] == [set(p) for p in plain]
    for a, b in zip(fused, plain):
        for kind in a:
            torch.testing.assert_close(a[kind], b[kind])
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name])
