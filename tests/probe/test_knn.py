"""k-NN probe: DINO's temperature-weighted cosine votes."""

from __future__ import annotations

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
