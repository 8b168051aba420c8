"""k-NN probe: DINO's temperature-weighted cosine votes."""

from __future__ import annotations

import pytest
import torch

from unic_cli.probe.knn import run_knn_probe


def test_run_knn_probe__separable_clusters_are_classified_perfectly():
    gen = torch.Generator().manual_seed(0)
    centres_CD = torch.randn(6, 16, generator=gen) * 5
    train_labels = torch.arange(6).repeat(20)
    test_labels = torch.arange(6).repeat(5)
    train = centres_CD[train_labels] + torch.randn(120, 16, generator=gen) * 0.3
    test = centres_CD[test_labels] + torch.randn(30, 16, generator=gen) * 0.3
    metrics = run_knn_probe(train, train_labels, test, test_labels, num_classes=6, ks=(10, 20))
    assert metrics == {"top1_k10": 1.0, "top5_k10": 1.0, "top1_k20": 1.0, "top5_k20": 1.0}


def test_run_knn_probe__one_close_neighbour_outvotes_several_far_ones():
    # class 1 has one nearly identical neighbour; class 0 has two at ~60 degrees. Unweighted majority would say
    # class 0; exp(cos / 0.07) weights say class 1, as in DINO.
    train = torch.tensor([[1.0, 0.02], [0.5, 0.87], [0.5, -0.87]])
    labels = torch.tensor([1, 0, 0])
    metrics = run_knn_probe(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), num_classes=2, ks=(3,))
    assert metrics == {"top1_k3": 1.0}
    hot = run_knn_probe(train, labels, torch.tensor([[1.0, 0.0]]), torch.tensor([1]), num_classes=2, ks=(3,),
                        temperature=100.0)
    assert hot == {"top1_k3": 0.0}  # a flat temperature falls back to majority voting


def test_run_knn_probe__k_larger_than_train_set_uses_all_samples():
    train = torch.eye(3)
    metrics = run_knn_probe(train, torch.tensor([0, 1, 2]), train, torch.tensor([0, 1, 2]), num_classes=3, ks=(20,))
    assert metrics == {"top1_k20": 1.0}


def test_run_knn_probe__train_chunks_merged_top_k_equals_the_plain_probe():
    # ImageNet-size train sets go to the device in chunks; the merged top-k must give the same votes
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(500, 16, generator=gen), torch.randn(70, 16, generator=gen)
    train_labels, test_labels = torch.randint(0, 12, (500,), generator=gen), torch.randint(0, 12, (70,), generator=gen)
    args = dict(num_classes=12, ks=(1, 10, 20))
    plain = run_knn_probe(train, train_labels, test, test_labels, **args)
    for train_chunk_size, chunk_size in ((64, 7), (7, 1024), (499, 3)):
        chunked = run_knn_probe(train, train_labels, test, test_labels, train_chunk_size=train_chunk_size,
                                chunk_size=chunk_size, **args)
        assert chunked == plain, (train_chunk_size, chunk_size)
    assert 0 < plain["top1_k10"] < 1


def _dino_knn_reference(train, train_labels, test, num_classes, k, temperature=0.07):
    """DINO's eval_knn.py written out in numpy float64: (predicted class, votes [M, C])."""
    import numpy as np

    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sim = test @ train.T
    idx = np.argsort(-sim, axis=1, kind="stable")[:, : min(k, len(train))]
    votes = np.zeros((len(test), num_classes))
    for i in range(len(test)):  # a reference: clarity over speed
        np.add.at(votes[i], train_labels[idx[i]], np.exp(sim[i, idx[i]] / temperature))
    return votes.argmax(axis=1), votes


def test_run_knn_probe__matches_a_dino_reference_with_absent_classes_large_k_and_odd_chunks():
    import numpy as np

    rng = np.random.default_rng(0)
    for trial in range(6):
        num_train, num_test, dim, num_classes = (int(rng.integers(5, 150)), int(rng.integers(1, 40)),
                                                 int(rng.integers(2, 17)), int(rng.integers(7, 12)))
        train, test = rng.normal(size=(num_train, dim)), rng.normal(size=(num_test, dim))
        train_labels = rng.integers(0, num_classes - 2, num_train)  # the last two classes never in train
        test_labels = rng.integers(0, num_classes, num_test)
        ks = (1, 3, 20, 1000)  # 1000 > any train size here: votes over all of them
        want = {}
        for k in ks:
            pred, votes = _dino_knn_reference(train, train_labels, test, num_classes, k)
            want[f"top1_k{k}"] = float((pred == test_labels).mean())
            top5 = np.argsort(-votes, axis=1, kind="stable")[:, :5]
            voted = np.take_along_axis(votes, top5, 1) > 0
            want[f"top5_k{k}"] = float(((top5 == test_labels[:, None]) & voted).any(axis=1).mean())
        arrays = (train.astype(np.float32), train_labels, test.astype(np.float32), test_labels)
        t = [torch.from_numpy(a) for a in arrays]
        for train_chunk_size, chunk_size in ((2**18, 1024), (7, 5), (max(1, num_train - 1), 3)):
            got = run_knn_probe(*t, num_classes=num_classes, ks=ks, train_chunk_size=train_chunk_size,
                                chunk_size=chunk_size)
            assert got == pytest.approx(want, abs=1e-12), (trial, train_chunk_size, chunk_size)


def test_run_knn_probe__top5_counts_only_classes_that_got_a_vote():
    # k = 1: one class gets a vote, so top-5 is top-1; zero-vote classes used to fill the top-5 and count as hits
    train = torch.eye(8)
    test = torch.eye(8)[:4] + 0.01
    metrics = run_knn_probe(train, torch.arange(8), test, torch.tensor([1, 2, 3, 0]), num_classes=8, ks=(1,))
    assert metrics == {"top1_k1": 0.0, "top5_k1": 0.0}


def test_run_knn_probe__a_small_temperature_does_not_overflow():
    # exp(1 / 0.01) is inf in float32 and inf * 0 is NaN: votes are computed relative to the nearest neighbour
    gen = torch.Generator().manual_seed(0)
    train, labels = torch.randn(60, 8, generator=gen), torch.randint(0, 3, (60,), generator=gen)
    test = train[:20] + 0.01 * torch.randn(20, 8, generator=gen)
    for temperature in (0.07, 0.01, 0.001):
        metrics = run_knn_probe(train, labels, test, labels[:20], num_classes=3, ks=(1, 20), temperature=temperature)
        assert metrics["top1_k1"] == 1.0 and metrics["top1_k20"] > 0.5, (temperature, metrics)


def test_knn_primary_k__is_dino_s_k_20_when_probed():
    from unic_cli.probe import knn_primary_k

    assert knn_primary_k((10, 20, 100, 200)) == 20 and knn_primary_k((5, 10)) == 10 and knn_primary_k((20,)) == 20
