"""Logistic regression on cached features, with a learning-rate x weight-decay sweep picked on held-out train data.

Shape legend: N samples, D feature width, C classes, G hyperparameter settings trained side by side.

Every (lr, wd) setting is its own linear classifier, but all G of them train in one batched matmul: the features
are cached, so the sweep costs seconds. The setting with the best accuracy on a held-out part of the training
split is retrained on the whole training split and evaluated once on the test split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _standardize(train_ND: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Zero mean, unit variance per channel from the training rows: one lr grid then fits every encoder."""
    mean_D = train_ND.mean(dim=0)
    std_D = train_ND.std(dim=0).clamp_min(1e-6)
    return [(x - mean_D) / std_D for x in (train_ND, *others)]


def stratified_holdout(labels_N: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A bool mask picking about `fraction` of each class (at least one sample per class with two or more)."""
    order_N = torch.randperm(labels_N.shape[0], generator=generator)
    shuffled_N = labels_N[order_N]
    # rank of each sample within its class, in shuffled order, without a per-sample Python loop
    sort_idx = torch.argsort(shuffled_N, stable=True)
    counts_C = torch.bincount(shuffled_N)
    starts_C = torch.cumsum(counts_C, 0) - counts_C
    rank = torch.empty_like(shuffled_N)
    rank[sort_idx] = torch.arange(labels_N.shape[0]) - starts_C[shuffled_N[sort_idx]]
    take_C = torch.where(counts_C >= 2, (counts_C * fraction).round().clamp_min(1), torch.zeros_like(counts_C))
    held = torch.zeros(labels_N.shape[0], dtype=torch.bool)
    held[order_N] = rank < take_C[shuffled_N]
    return held


def _train_grid(
    x_ND: torch.Tensor,
    y_N: torch.Tensor,
    *,
    num_classes: int,
    lrs_G: torch.Tensor,
    wds_G: torch.Tensor,
    num_steps: int,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on softmax cross-entropy + wd/2 * |W|^2, cosine-annealed, G settings at once -> (W_GDC, b_GC).

    Adam is written out because each setting needs its own learning rate on one stacked tensor; since Adam's
    update is elementwise, this equals G separate runs.
    """
    G, (N, D) = lrs_G.shape[0], x_ND.shape
    device = x_ND.device
    params = [torch.zeros(G, D, num_classes, device=device, requires_grad=True),
              torch.zeros(G, num_classes, device=device, requires_grad=True)]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    lrs_G, wds_G = lrs_G.to(device), wds_G.to(device)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(num_steps):
        if N <= batch_size:
            xb_ND, yb_N = x_ND, y_N
        else:
            idx = torch.randint(N, (batch_size,), generator=generator).to(device)
            xb_ND, yb_N = x_ND[idx], y_N[idx]
        W_GDC, b_GC = params
        logits_GNC = torch.baddbmm(b_GC[:, None, :], xb_ND.expand(G, -1, -1), W_GDC)
        ce_G = F.cross_entropy(logits_GNC.permute(0, 2, 1), yb_N.expand(G, -1), reduction="none").mean(dim=1)
        loss = ce_G.sum() + (wds_G * W_GDC.square().sum(dim=(1, 2))).sum() / 2
        grads = torch.autograd.grad(loss, params)
        lr_G = lrs_G * 0.5 * (1 + math.cos(math.pi * step / num_steps))
        with torch.no_grad():
            for p, g, (m, v) in zip(params, grads, moments):
                m.lerp_(g, 1 - beta1)
                v.lerp_(g.square(), 1 - beta2)
                m_hat = m / (1 - beta1 ** (step + 1))
                v_hat = v / (1 - beta2 ** (step + 1))
                p -= lr_G.view(G, *[1] * (p.dim() - 1)) * m_hat / (v_hat.sqrt() + eps)
    return params[0].detach(), params[1].detach()


def _accuracy_G(x_ND, y_N, W_GDC, b_GC, topk: int = 1, max_logits: int = 2**26) -> torch.Tensor:
    """Accuracy of each of the G heads; rows in chunks of at most `max_logits` logits (an ImageNet holdout of
    256k rows x 1000 classes x 10 settings would be a 10 GiB logit tensor)."""
    G, C = W_GDC.shape[0], W_GDC.shape[2]
    rows = max(1, max_logits // (G * C))
    hits_G = torch.zeros(G, device=x_ND.device)
    for start in range(0, x_ND.shape[0], rows):
        xb_ND, yb_N = x_ND[start : start + rows], y_N[start : start + rows]
        logits_GNC = torch.baddbmm(b_GC[:, None, :], xb_ND.expand(G, -1, -1), W_GDC)
        ranked_GNK = logits_GNC.topk(topk, dim=2).indices
        hits_G += (ranked_GNK == yb_N[None, :, None]).any(dim=2).float().sum(dim=1)
    return hits_G / x_ND.shape[0]


def run_linear_probe(
    train_ND: torch.Tensor,
    train_labels_N: torch.Tensor,
    test_MD: torch.Tensor,
    test_labels_M: torch.Tensor,
    *,
    num_classes: int,
    lrs: Sequence[float] = (1e-3, 1e-2),
    weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2),
    num_steps: int = 300,
    holdout_fraction: float = 0.2,
    batch_size: int = 16384,
    seed: int = 0,
) -> dict[str, float]:
    """Held-out sweep, retrain on all of train, then test top-1 (and top-5 with more than 5 classes).

    Returns the metrics plus the chosen `lr`, `weight_decay` and the held-out accuracy `holdout_top1`.
    """
    generator = torch.Generator().manual_seed(seed)
    device = train_ND.device
    train_ND, test_MD = train_ND.float(), test_MD.float().to(device)
    train_labels_N, test_labels_M = train_labels_N.to(device), test_labels_M.to(device)
    grid = list(itertools.product(lrs, weight_decays))
    lrs_G = torch.tensor([g[0] for g in grid])
    wds_G = torch.tensor([g[1] for g in grid])
    held_N = stratified_holdout(train_labels_N.cpu(), holdout_fraction, generator).to(device)
    if len(grid) > 1 and held_N.any() and (~held_N).any():
        fit_ND, val_ND = _standardize(train_ND[~held_N], train_ND[held_N])
        W_GDC, b_GC = _train_grid(fit_ND, train_labels_N[~held_N], num_classes=num_classes, lrs_G=lrs_G,
                                  wds_G=wds_G, num_steps=num_steps, batch_size=batch_size, generator=generator)
        holdout_G = _accuracy_G(val_ND, train_labels_N[held_N], W_GDC, b_GC).cpu()
        # ties go to the strongest regularisation, the safer choice on small held-out sets
        best = max(range(len(grid)), key=lambda g: (round(float(holdout_G[g]), 6), grid[g][1], -grid[g][0]))
        holdout = float(holdout_G[best])
    else:
        best, holdout = 0, None
    fit_ND, eval_MD = _standardize(train_ND, test_MD)
    W_1DC, b_1C = _train_grid(fit_ND, train_labels_N, num_classes=num_classes, lrs_G=lrs_G[best : best + 1],
                              wds_G=wds_G[best : best + 1], num_steps=num_steps, batch_size=batch_size,
                              generator=generator)
    metrics = {"top1": float(_accuracy_G(eval_MD, test_labels_M, W_1DC, b_1C)[0])}
    if num_classes > 5:
        metrics["top5"] = float(_accuracy_G(eval_MD, test_labels_M, W_1DC, b_1C, topk=5)[0])
    metrics.update(lr=grid[best][0], weight_decay=grid[best][1])
    if holdout is not None:
        metrics["holdout_top1"] = holdout
    return metrics
