"""Per-teacher cosine + smooth-L1 distillation losses and vectorised teacher dropping.

Shape legend: B batch, N patch tokens, E a teacher's token width, T teachers, M metric columns, G the global
batch (all processes, all micro-batches of an optimiser step), x any leading dims.

UNIC paper Eq. 1-2: per token, 0.5 * (1 - cos) + 0.5 * smooth-L1 (beta 1, averaged over channels); patch losses
are averaged over tokens, and the summary and patch losses of a teacher are averaged (as the official code does)
into one loss per (teacher, image). Eq. 4, teacher dropping: per image the teacher with the largest loss is kept
and every other teacher is dropped with probability p; every kept (teacher, image) pair weighs the same in the
batch loss (Eq. 2 with alpha in {0, 1}).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

METRIC_COLUMNS = ("loss", "summary", "patch", "summary_cos", "summary_sl1", "patch_cos", "patch_sl1")


class TeacherLosses(NamedTuple):
    loss_TB: torch.Tensor  # per (teacher, image), differentiable
    metrics_TM: torch.Tensor  # batch means of METRIC_COLUMNS, detached; NaN where a teacher has no summary


def token_losses(pred_xE: torch.Tensor, target_xE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 - cosine, smooth-L1 mean over channels), each of shape `x` (every leading dim kept), in fp32."""
    pred_xE, target_xE = pred_xE.float(), target_xE.float()
    cos_x = 1.0 - F.cosine_similarity(pred_xE, target_xE, dim=-1)
    sl1_x = F.smooth_l1_loss(pred_xE, target_xE, reduction="none", beta=1.0).mean(dim=-1)
    return cos_x, sl1_x


def teacher_losses(preds: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]
                   ) -> TeacherLosses:
    """Per-teacher losses from predictions and (standardised) targets, both `{"summary": BE, "patch": BNE}`."""
    losses, metrics = [], []
    for pred, target in zip(preds, targets):
        per_kind, row = [], []
        for kind in ("summary", "patch"):
            if kind not in target:
                row.append(None)
                continue
            cos_x, sl1_x = token_losses(pred[kind], target[kind])  # x: B for the summary, BN for patch tokens
            if kind == "patch":  # average over the patch tokens of each image
                cos_B, sl1_B = cos_x.mean(dim=1), sl1_x.mean(dim=1)
            else:
                cos_B, sl1_B = cos_x, sl1_x
            loss_B = 0.5 * cos_B + 0.5 * sl1_B
            per_kind.append(loss_B)
            row.append(torch.stack([loss_B, cos_B, sl1_B]).detach().mean(dim=1))  # (loss, cos, sl1) batch means
        losses.append(torch.stack(per_kind).mean(dim=0))
        nan = torch.full((3,), float("nan"), device=losses[-1].device)
        s, p = (r if r is not None else nan for r in row)
        metrics.append(torch.stack([losses[-1].detach().mean(), s[0], p[0], s[1], s[2], p[1], p[2]]))
    return TeacherLosses(torch.stack(losses), torch.stack(metrics))


def teacher_drop_coefficients(loss_TB: torch.Tensor, drop_prob: float, generator: torch.Generator | None, *,
                              global_batch: int | None = None, offset: int = 0,
                              draws_TG: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4's binary coefficients alpha_TB: the max-loss teacher of each image is kept, others kept w.p. 1 - p.

    Vectorised over images and teachers, no host sync; randomness comes only from `generator` (which must live
    on the loss's device), so a resumed run redraws exactly the same coefficients. Data-parallel processes
    share one generator state, draw for the whole `global_batch` and keep their own columns from `offset`: N
    processes then drop exactly what one process with an N-times larger batch drops, and a run resumes onto any
    number of processes. `draws_TG`: uniform draws made earlier for a larger batch (the training step draws once
    per optimiser step for all its micro-batches), used from `offset` instead of drawing from `generator`.
    """
    if drop_prob <= 0.0:
        return torch.ones_like(loss_TB)
    T, B = loss_TB.shape
    if draws_TG is None:
        draws_TG = torch.rand((T, max(global_batch or B, offset + B)), generator=generator, device=loss_TB.device)
    keep_TB = draws_TG[:, offset:offset + B] >= drop_prob
    hardest_1B = loss_TB.detach().argmax(dim=0, keepdim=True)
    keep_TB.scatter_(0, hardest_1B, True)
    return keep_TB.to(loss_TB.dtype)


def weighted_loss(loss_TB: torch.Tensor, alpha_TB: torch.Tensor) -> torch.Tensor:
    """Eq. 2 with Eq. 4's coefficients: sum over teachers of alpha * loss, per image, averaged with a constant
    normaliser (teachers x images), so a kept teacher weighs 1 and a dropped one 0, whatever else the image kept.

    The constant normaliser keeps Eq. 4's balance (for T=2, p=0.5 the hardest teacher gets twice the expected
    weight of the other, not three times as a per-image normaliser would give) and makes N processes sum to
    exactly what one process with an N-times batch computes. With dropping the value reads lower than the
    kept-pair mean (dropped pairs count as 0); without it, it is the mean over teachers and images.
    """
    return (alpha_TB * loss_TB).mean()
