"""Losses (Eq. 1-2) and teacher dropping (Eq. 4): values, statistics, seeding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unic_cli.losses import teacher_drop_coefficients, teacher_losses, token_losses, weighted_loss


def test_token_losses__cosine_and_smooth_l1_per_token():
    pred, target = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    cos, sl1 = token_losses(pred, target)
    torch.testing.assert_close(cos, 1 - F.cosine_similarity(pred, target, dim=-1))
    torch.testing.assert_close(sl1[1, 2], F.smooth_l1_loss(pred[1, 2], target[1, 2], beta=1.0))


def test_teacher_losses__average_patches_then_token_types():
    pred = {"summary": torch.randn(2, 4), "patch": torch.randn(2, 6, 4)}
    target = {"summary": torch.randn(2, 4), "patch": torch.randn(2, 6, 4)}
    out = teacher_losses([pred, {"patch": pred["patch"]}], [target, {"patch": target["patch"]}])
    s_cos, s_sl1 = token_losses(pred["summary"], target["summary"])
    p_cos, p_sl1 = token_losses(pred["patch"], target["patch"])
    summary_B, patch_B = 0.5 * (s_cos + s_sl1), 0.5 * (p_cos.mean(1) + p_sl1.mean(1))
    torch.testing.assert_close(out.loss_TB[0], (summary_B + patch_B) / 2)
    torch.testing.assert_close(out.loss_TB[1], patch_B)  # a patch-only teacher
    assert out.metrics_TM.shape == (2, 7) and torch.isnan(out.metrics_TM[1, 1])
    torch.testing.assert_close(out.metrics_TM[:, 0], out.loss_TB.mean(dim=1))


@pytest.mark.parametrize("drop_prob", [0.25, 0.5])
def test_teacher_drop_coefficients__match_eq4_statistics(drop_prob):
    T, B = 3, 20000
    loss_TB = torch.rand(T, B)
    gen = torch.Generator().manual_seed(0)
    alpha_TB = teacher_drop_coefficients(loss_TB, drop_prob, gen)
    hardest = loss_TB.argmax(0)
    assert alpha_TB[hardest, torch.arange(B)].eq(1).all()  # the max-loss teacher is always kept
    others = torch.ones(T, B, dtype=torch.bool)
    others[hardest, torch.arange(B)] = False
    assert alpha_TB[others].mean().item() == pytest.approx(1 - drop_prob, abs=0.015)  # 2*B samples
    assert set(alpha_TB.unique().tolist()) <= {0.0, 1.0}


def test_teacher_drop_coefficients__seeded_and_off_at_zero():
    loss_TB = torch.rand(2, 64)
    a = teacher_drop_coefficients(loss_TB, 0.5, torch.Generator().manual_seed(3))
    b = teacher_drop_coefficients(loss_TB, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert teacher_drop_coefficients(loss_TB, 0.0, None).eq(1).all()


def test_weighted_loss__eq4_a_kept_teacher_weighs_one_whatever_else_the_image_kept():
    loss_TB = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    assert weighted_loss(loss_TB, torch.ones(2, 2)).item() == pytest.approx(2.5)
    alpha_TB = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # image 0 keeps both, image 1 keeps t1 only
    loss = weighted_loss(loss_TB, alpha_TB)
    assert loss.item() == pytest.approx((1.0 + 3.0 + 4.0) / 4)  # Eq. 2 summed per image, / (T x B)
    loss.backward()
    # every kept pair has the same weight: image 1's lone teacher is not up-weighted (a per-image mean would
    # give it 1/2 against 1/4 for each of image 0's)
    torch.testing.assert_close(loss_TB.grad, alpha_TB / 4)


def test_weighted_loss__expected_weight_of_the_hardest_teacher_is_eq4s():
    # T=2, p=0.5: the hardest teacher is always kept, the other half of the time -> expected weights 1 : 0.5
    g = torch.Generator().manual_seed(0)
    loss_TB = torch.stack([torch.full((20000,), 2.0), torch.ones(20000)]).requires_grad_()
    weighted_loss(loss_TB, teacher_drop_coefficients(loss_TB, 0.5, g)).backward()
    ratio = loss_TB.grad[0].mean() / loss_TB.grad[1].mean()
    assert ratio.item() == pytest.approx(2.0, rel=0.03)
