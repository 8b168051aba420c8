"""Cosine k-NN on summary tokens with temperature-weighted votes (DINO's protocol).

Shape legend: N train samples, M test samples, D feature width, K neighbours, C classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def run_knn_probe(
    train_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    test_MD: torch.Tensor,
    test_labels_M: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy for each k.

    Each test sample votes over its k most cosine-similar training samples, each vote weighted by
    exp(similarity / temperature), as in DINO (Caron et al. 2021, eval_knn.py).
    """
    device = train_ND.device
    train_ND = F.normalize(train_ND.float(), dim=1)
    test_MD = F.normalize(test_MD.float().to(device), dim=1)
    train_labels_N = train_labels_N.to(device)
    test_labels_M = test_labels_M.to(device)
    max_k = min(max(ks), train_ND.shape[0])
    correct1 = {k: torch.zeros((), device=device) for k in ks}
    correct5 = {k: torch.zeros((), device=device) for k in ks}
    for start in range(0, test_MD.shape[0], chunk_size):
        sim_MN = test_MD[start : start + chunk_size] @ train_ND.T
        top_sim_MK, top_idx_MK = sim_MN.topk(max_k, dim=1)  # sorted: the first k columns are the k nearest
        weight_MK = (top_sim_MK / temperature).exp()
        onehot_MKC = F.one_hot(train_labels_N[top_idx_MK], num_classes).float()
        labels_M = test_labels_M[start : start + chunk_size]
        for k in ks:
            kk = min(k, max_k)
            votes_MC = (onehot_MKC[:, :kk] * weight_MK[:, :kk, None]).sum(dim=1)
            ranked_MC = votes_MC.topk(min(5, num_classes), dim=1).indices
            hits_MC = ranked_MC == labels_M[:, None]
            correct1[k] += hits_MC[:, 0].sum()
            correct5[k] += hits_MC.any(dim=1).sum()
    total = test_MD.shape[0]
    metrics = {}
    for k in ks:
        metrics[f"top1_k{k}"] = float(correct1[k]) / total
        if num_classes > 5:
            metrics[f"top5_k{k}"] = float(correct5[k]) / total
    return metrics
