"""Cosine k-NN on summary tokens with temperature-weighted votes (DINO's protocol).

Shape legend: N train samples, T train samples of one chunk, M test samples, D feature width, K neighbours,
J candidate neighbours (K so far + K of a chunk), C classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Largest test x train similarity block computed at once (float32: 1 GiB).
_SIM_ELEMENTS = 2**28


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
    train_chunk_size: int = 2**18,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Top-1 (and top-5 when there are more than 5 classes) accuracy for each k.

    Each test sample votes over its k most cosine-similar training samples, each vote weighted by
    exp(similarity / temperature), as in DINO (Caron et al. 2021, eval_knn.py). Top-5 counts only classes that
    got a vote (DINO's top-5 also counts zero-vote classes that its sort happens to put in the first five).
    Exact similarity ties at the k-th neighbour, and exact vote ties, are broken arbitrarily, as in DINO.

    The training features may stay on the host (ImageNet with a ViT-G: 7.4 GiB): they go to `device` (default:
    their own) `train_chunk_size` rows at a time, each chunk's k nearest are merged into a running top-k, and
    no similarity block exceeds 2**28 entries. With a single chunk this is the plain computation.
    """
    device = torch.device(device) if device is not None else train_ND.device
    test_MD = F.normalize(test_MD.float().to(device), dim=1)
    train_labels_N = train_labels_N.to(device)
    test_labels_M = test_labels_M.to(device)
    num_train, num_test = train_ND.shape[0], test_MD.shape[0]
    max_k = min(max(ks), num_train)
    top_sim_MK, top_idx_MK = _nearest_neighbours(train_ND, test_MD, max_k, chunk_size=chunk_size,
                                                 train_chunk_size=train_chunk_size, device=device)
    correct1 = {k: torch.zeros((), device=device) for k in ks}
    correct5 = {k: torch.zeros((), device=device) for k in ks}
    for start in range(0, num_test, chunk_size):  # votes per test chunk: [M, K, C] one-hots stay small
        sim_MK = top_sim_MK[start : start + chunk_size]
        # exp((sim - nearest) / T): DINO's exp(sim / T) times a per-row constant, so the same ranking of classes,
        # but it cannot overflow (exp(1 / 0.01) is inf in float32, and inf * 0 in the one-hot product is NaN)
        weight_MK = ((sim_MK - sim_MK[:, :1]) / temperature).exp()
        onehot_MKC = F.one_hot(train_labels_N[top_idx_MK[start : start + chunk_size]], num_classes).float()
        labels_M = test_labels_M[start : start + chunk_size]
        for k in ks:
            kk = min(k, max_k)
            votes_MC = (onehot_MKC[:, :kk] * weight_MK[:, :kk, None]).sum(dim=1)
            top_votes_MC, ranked_MC = votes_MC.topk(min(5, num_classes), dim=1)
            # a class no neighbour voted for is no guess: with fewer than 5 classes among the k neighbours,
            # topk would fill the top-5 with arbitrary zero-vote classes and inflate top-5 (k < 5 always)
            hits_MC = (ranked_MC == labels_M[:, None]) & (top_votes_MC > 0)
            correct1[k] += hits_MC[:, 0].sum()
            correct5[k] += hits_MC.any(dim=1).sum()
    metrics = {}
    for k in ks:
        metrics[f"top1_k{k}"] = float(correct1[k]) / num_test
        if num_classes > 5:
            metrics[f"top5_k{k}"] = float(correct5[k]) / num_test
    return metrics


def _nearest_neighbours(train_ND: torch.Tensor, test_MD: torch.Tensor, max_k: int, *, chunk_size: int,
                        train_chunk_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarity, training index) of each normalised test sample's `max_k` nearest training samples,
    nearest first, computed `train_chunk_size` training rows at a time (see `run_knn_probe`)."""
    num_train, num_test = train_ND.shape[0], test_MD.shape[0]
    test_chunk = max(1, min(chunk_size, _SIM_ELEMENTS // max(1, min(num_train, train_chunk_size))))
    top_sim_MK = top_idx_MK = None
    for t0 in range(0, num_train, train_chunk_size):
        train_TD = F.normalize(train_ND[t0 : t0 + train_chunk_size].to(device, non_blocking=True).float(), dim=1)
        sims, idxs = [], []
        for start in range(0, num_test, test_chunk):
            sim_MT = test_MD[start : start + test_chunk] @ train_TD.T
            sim_MK, idx_MK = sim_MT.topk(min(max_k, sim_MT.shape[1]), dim=1)  # sorted, nearest first
            sims.append(sim_MK)
            idxs.append(idx_MK + t0)
        sim_MK, idx_MK = torch.cat(sims), torch.cat(idxs)
        if top_sim_MK is None:
            top_sim_MK, top_idx_MK = sim_MK, idx_MK
        else:  # the k nearest of (k nearest so far + k nearest of this chunk) are the k nearest overall
            cand_sim_MJ, cand_idx_MJ = torch.cat([top_sim_MK, sim_MK], 1), torch.cat([top_idx_MK, idx_MK], 1)
            top_sim_MK, pos_MK = cand_sim_MJ.topk(min(max_k, cand_sim_MJ.shape[1]), dim=1)
            top_idx_MK = cand_idx_MJ.gather(1, pos_MK)
    return top_sim_MK, top_idx_MK
