"""Linear probe: batched (lr, wd) sweep, held-out selection, retrain and test."""

from __future__ import annotations

import torch

from unic_cli.probe.linear import _train_grid, run_linear_probe, stratified_holdout


def _blobs(n_per_class: int, num_classes: int, dim: int, seed: int, noise: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    labels = torch.arange(num_classes).repeat(n_per_class)
    return centres[labels] + noise * torch.randn(len(labels), dim, generator=gen), labels


def test_stratified_holdout__takes_the_fraction_of_every_class():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 1)
    held = stratified_holdout(labels, 0.2, torch.Generator().manual_seed(0))
    assert torch.bincount(labels[held], minlength=3).tolist() == [2, 4, 0]  # a singleton class stays in training


def test_train_grid__batched_settings_equal_separate_runs():
    x, y = _blobs(10, 3, 8, seed=0)
    lrs, wds = torch.tensor([1e-3, 1e-1]), torch.tensor([0.0, 1e-2])
    W, b = _train_grid(x, y, num_classes=3, lrs_G=lrs, wds_G=wds, num_steps=20, batch_size=10_000,
                       generator=torch.Generator())
    for g in range(2):
        W1, b1 = _train_grid(x, y, num_classes=3, lrs_G=lrs[g : g + 1], wds_G=wds[g : g + 1], num_steps=20,
                             batch_size=10_000, generator=torch.Generator())
        torch.testing.assert_close(W[g], W1[0])
        torch.testing.assert_close(b[g], b1[0])


def test_run_linear_probe__learns_separable_classes_and_reports_the_choice():
    x_train, y_train = _blobs(30, 7, 32, seed=1)
    x_test, y_test = _blobs(10, 7, 32, seed=2)
    metrics = run_linear_probe(x_train, y_train, x_test, y_test, num_classes=7, lrs=(1e-2,),
                               weight_decays=(0.0, 1e-2), num_steps=100)
    assert metrics["top1"] >= 0.95 and metrics["top5"] == 1.0
    assert metrics["lr"] == 1e-2 and metrics["weight_decay"] in (0.0, 1e-2) and "holdout_top1" in metrics


def test_run_linear_probe__is_deterministic_for_a_seed():
    x, y = _blobs(8, 3, 16, seed=3, noise=3.0)
    one = run_linear_probe(x, y, x, y, num_classes=3, num_steps=30, seed=5)
    two = run_linear_probe(x, y, x, y, num_classes=3, num_steps=30, seed=5)
    assert one == two


def test_accuracy_g__row_chunks_give_the_same_accuracy():
    from unic_cli.probe.linear import _accuracy_G

    gen = torch.Generator().manual_seed(0)
    x_ND, y_N = torch.randn(101, 8, generator=gen), torch.randint(0, 7, (101,), generator=gen)
    W_GDC, b_GC = torch.randn(3, 8, 7, generator=gen), torch.randn(3, 7, generator=gen)
    for topk in (1, 5):
        want = _accuracy_G(x_ND, y_N, W_GDC, b_GC, topk=topk)
        assert torch.equal(_accuracy_G(x_ND, y_N, W_GDC, b_GC, topk=topk, max_logits=3 * 7 * 10), want)
