"""EmaStandardizer: per-channel teacher-feature statistics tracked by an EMA, all-reduced across processes.

Shape legend: B batch, N patch tokens, D a teacher's token width (`E` in losses.py), x any leading dims (B or
BN), M all rows of a batch pooled (B or B * N), P the micro-batches of one optimiser step.

UNIC paper Sec. 3.3, "feature standardization": every teacher output (summary and patch tokens separately) is
standardised to zero mean and unit variance per channel before the loss, with statistics learned on the fly.
The momentum follows `schedule.ema_momentum` (cosine 1.0 -> 0.001, the official defaults): the first step's
statistics are that batch's own, later steps move them ever more slowly.

Under gradient accumulation the statistics are updated once per optimiser step, with the moments of all its
micro-batches, before any of them is standardised: k micro-batches of b images train like one batch of k*b.

One deliberate difference from the official code: the statistics are updated with the current batch before they
standardise it (the official code standardises with the previous statistics, so its first step sees raw,
unstandardised features). Moments are computed in fp32 and averaged across processes, so every rank holds
identical statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from unic_cli.distributed import all_reduce_mean_


class EmaStandardizer(nn.Module):
    """Per-channel EMA mean/variance of one teacher token type; `forward` updates, then standardises."""

    def __init__(self, dim: int, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("mean_D", torch.zeros(dim))
        self.register_buffer("var_D", torch.ones(dim))

    @torch.no_grad()
    def update(self, y_xD: torch.Tensor | Sequence[torch.Tensor], momentum: float) -> None:
        """Blend one step's moments (all leading dims pooled, averaged over processes) into the statistics.

        `y_xD` is the step's batch, or its micro-batches under gradient accumulation: their moments are pooled
        (weighted by rows), so k micro-batches update the statistics exactly as the one batch of k*b would.
        """
        parts_MD = [y.float().reshape(-1, y.shape[-1]) for y in ([y_xD] if isinstance(y_xD, torch.Tensor) else y_xD)]
        moments_P2D = [torch.stack([y_MD.mean(dim=0), y_MD.square().mean(dim=0)]) for y_MD in parts_MD]
        if len(parts_MD) == 1:  # as is: no weighting, so a step without accumulation is exactly the batch's moments
            moments_2D = moments_P2D[0]
        else:
            total = sum(len(y_MD) for y_MD in parts_MD)
            moments_2D = sum(m_2D * (len(y_MD) / total) for m_2D, y_MD in zip(moments_P2D, parts_MD))
        all_reduce_mean_(moments_2D)  # equal batch sizes per rank, so the mean of means is the global mean
        mean_D, sq_D = moments_2D
        # A non-finite batch (a teacher overflowing in bf16) must leave no trace: its step is skipped or stops the
        # run, and the statistics keep their values (a device-side select, no host sync).
        finite = torch.isfinite(moments_2D).all()
        self.mean_D.copy_(torch.where(finite, self.mean_D.lerp(mean_D, momentum), self.mean_D))
        self.var_D.copy_(torch.where(finite, self.var_D.lerp((sq_D - mean_D.square()).clamp_(min=0), momentum),
                                     self.var_D))

    def standardize(self, y_xD: torch.Tensor) -> torch.Tensor:
        """Zero mean, unit variance per channel with the current statistics (fp32); no update."""
        return (y_xD.float() - self.mean_D) * torch.rsqrt(self.var_D + self.eps)

    def forward(self, y_xD: torch.Tensor, momentum: float | None) -> torch.Tensor:
        """Update with `momentum` (None: frozen statistics, e.g. evaluation), then standardise."""
        if momentum is not None:
            self.update(y_xD, momentum)
        return self.standardize(y_xD)


class TeacherStandardizers(nn.Module):
    """One EmaStandardizer per teacher and token type; keys `t{i}.{summary|patch}.{mean_D,var_D}`."""

    def __init__(self, teacher_dims: Sequence[tuple[int | None, int]], *, eps: float = 1e-6) -> None:
        super().__init__()
        self.stats = nn.ModuleDict()
        for i, (summary_dim, patch_dim) in enumerate(teacher_dims):
            kinds = {"patch": EmaStandardizer(patch_dim, eps=eps)}
            if summary_dim is not None:
                kinds = {"summary": EmaStandardizer(summary_dim, eps=eps), **kinds}
            self.stats[f"t{i}"] = nn.ModuleDict(kinds)

    def state_dict(self, *args, **kwargs):  # flat `t0.summary.mean_D` keys, as the checkpoint contract says
        return {k.removeprefix("stats."): v for k, v in super().state_dict(*args, **kwargs).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return super().load_state_dict({f"stats.{k}": v for k, v in state_dict.items()}, strict=strict, assign=assign)

    def forward(self, i: int, kind: str, y_xD: torch.Tensor, momentum: float | None) -> torch.Tensor:
        """Update (unless `momentum` is None) and apply teacher `i`'s `kind` ("summary" or "patch") standardiser."""
        return self.stats[f"t{i}"][kind](y_xD, momentum)
