"""LadderProjector: teacher x {summary, patch} x tapped-block MLPs, summed (UNIC paper Sec. 3.4, Eq. 3).

Shape legend: B batch, N patch tokens, D student width, E a teacher's token width, T teachers.

For teacher t and token type k the prediction is `sum_b head[t][k][b](tokens of block b)`. Each head is an MLP
(Linear, GELU, Linear) whose hidden width is the student width on intermediate blocks and 4x on the last block
(paper: d_h = d for l < L, 4d on the last), both configurable. With `shared_heads` one head per block serves both
token types (Table 1 rows 4-5); dedicated heads (rows 6-8) give summary and patch tokens their own. Tapping only
the last block is the basic setup; tapping all blocks is the ladder. The heads are expendable: `unic export`
drops them.

Speed: the parameters stay one small `ProjectorMlp` per (teacher, token type, block) (the checkpoint contract),
but `forward` computes them fused (`fused=True`): for each token type, the first layers of every teacher's heads
on blocks of equal hidden width are one batched matrix product (`baddbmm` over blocks, teachers concatenated
along the output), and each teacher's sum over blocks of second layers is ONE matrix product over the
concatenated hidden units (sum_b h_b W_b = [h_1 .. h_L] [W_1; ..; W_L]). Measured on 2 CPU threads for the
ViT-S/two ViT-B/ladder-768/3072 reference: forward + backward 6.2 s vs 9.5 s per-head in bf16, 10.1 vs 11.3 s
in fp32 (benchmarks/SPEED.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unic_cli.errors import ConfigError


class ProjectorMlp(nn.Module):
    """Linear -> GELU -> Linear (submodule names are part of the checkpoint contract)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def parse_ladder_blocks(spec: str, num_blocks: int) -> tuple[int, ...]:
    """`all`, `last`, or comma-separated block indices (negative counts from the end) -> sorted indices.

    The last block is always tapped: the summed ladder is the teacher-space prediction (Eq. 3) and the last
    block is what the exported encoder outputs, so it must be trained toward the teachers directly.
    """
    spec = spec.strip().lower()
    if spec == "all":
        return tuple(range(num_blocks))
    if spec == "last":
        return (num_blocks - 1,)
    try:
        raw = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--ladder-blocks {spec!r} must be 'all', 'last' or block indices like '3,7,11'") from None
    bad = [b for b in raw if not -num_blocks <= b < num_blocks]
    if bad:
        raise ConfigError(f"--ladder-blocks {spec!r}: block(s) {bad} out of range for a {num_blocks}-block student "
                          f"(valid: 0..{num_blocks - 1}, or negative from the end)")
    return tuple(sorted({b % num_blocks for b in raw} | {num_blocks - 1}))


class LadderProjector(nn.Module):
    """Per-teacher ladders of projector heads on the student's tapped blocks.

    Args:
        in_dim: student width D.
        teacher_dims: per teacher (in `--teachers` order), (summary width or None, patch width).
        blocks: tapped block indices, sorted; the last must be `num_blocks - 1`.
        num_blocks: student depth (decides which block gets `last_hidden_dim`).
        shared_heads: one head for both token types instead of dedicated summary/patch heads.
        hidden_dim: hidden width on intermediate blocks.
        last_hidden_dim: hidden width on the last block.
        init_std: truncated-normal std of the Linear weights (biases start at 0), as in the official code.
        fused: compute the heads as a few large matrix products (same result; False: one call per head).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        teacher_dims: Sequence[tuple[int | None, int]],
        blocks: Sequence[int],
        num_blocks: int,
        shared_heads: bool,
        hidden_dim: int,
        last_hidden_dim: int,
        init_std: float = 0.02,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.blocks = tuple(blocks)
        self.fused = fused
        self.shared_heads = shared_heads
        self.teacher_dims = [tuple(d) for d in teacher_dims]
        if shared_heads:
            mixed = [f"t{i} ({s} vs {p})" for i, (s, p) in enumerate(self.teacher_dims) if s is not None and s != p]
            if mixed:
                raise ConfigError(f"shared heads need equal summary and patch widths; {', '.join(mixed)} differ. "
                                  "Use dedicated heads (drop --shared-heads).")

        def ladder(out_dim: int) -> nn.ModuleDict:
            return nn.ModuleDict({
                f"b{b}": ProjectorMlp(in_dim, last_hidden_dim if b == num_blocks - 1 else hidden_dim, out_dim)
                for b in self.blocks
            })

        heads = {}
        for i, (summary_dim, patch_dim) in enumerate(self.teacher_dims):
            if shared_heads:
                heads[f"t{i}"] = nn.ModuleDict({"shared": ladder(patch_dim)})
            else:
                kinds = {"patch": ladder(patch_dim)}
                if summary_dim is not None:
                    kinds = {"summary": ladder(summary_dim), **kinds}
                heads[f"t{i}"] = nn.ModuleDict(kinds)
        self.heads = nn.ModuleDict(heads)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=init_std)
                nn.init.zeros_(module.bias)

    def forward(self, taps: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        """[(summary_BD, patch_BND)] per tapped block -> per teacher {"summary": pred_BE, "patch": pred_BNE}."""
        if self.fused:
            return self._forward_fused(taps)
        if self.shared_heads:  # one matmul over [summary; patches] per block, shared by all teachers' heads
            tokens = [torch.cat([s_BD[:, None], p_BND], dim=1) for s_BD, p_BND in taps]
        preds = []
        for i, (summary_dim, _) in enumerate(self.teacher_dims):
            heads = self.heads[f"t{i}"]
            if self.shared_heads:
                both = sum(heads["shared"][f"b{b}"](x) for b, x in zip(self.blocks, tokens))
                out = {"patch": both[:, 1:]}
                if summary_dim is not None:
                    out["summary"] = both[:, 0]
            else:
                out = {"patch": sum(heads["patch"][f"b{b}"](p_BND) for b, (_, p_BND) in zip(self.blocks, taps))}
                if summary_dim is not None:
                    out["summary"] = sum(heads["summary"][f"b{b}"](s_BD) for b, (s_BD, _) in zip(self.blocks, taps))
            preds.append(out)
        return preds

    def _forward_fused(self, taps: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
        preds: list[dict[str, torch.Tensor]] = [{} for _ in self.teacher_dims]
        with_summary = [i for i, (s, _) in enumerate(self.teacher_dims) if s is not None]
        if self.shared_heads:  # one head over [summary; patches]
            tokens = [torch.cat([s_BD[:, None], p_BND], dim=1) for s_BD, p_BND in taps]
            for i, both in _fused_heads(self._mlps("shared", range(len(self.teacher_dims))), tokens).items():
                preds[i]["patch"] = both[:, 1:]
                if i in with_summary:
                    preds[i]["summary"] = both[:, 0]
            return preds
        for i, pred in _fused_heads(self._mlps("patch", range(len(self.teacher_dims))), [p for _, p in taps]).items():
            preds[i]["patch"] = pred
        if with_summary:
            for i, pred in _fused_heads(self._mlps("summary", with_summary), [s for s, _ in taps]).items():
                preds[i]["summary"] = pred
        return preds

    def _mlps(self, kind: str, teachers) -> dict[int, list[ProjectorMlp]]:
        return {i: [self.heads[f"t{i}"][kind][f"b{b}"] for b in self.blocks] for i in teachers}


def _fused_heads(mlps: dict[int, list[ProjectorMlp]], xs: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """sum_b mlps[i][b](xs[b]) for every teacher i, as few large matrix products.

    Shape legend: M tokens, D student width, G blocks of one hidden width, T teachers, H that width, K = G * H,
    E a teacher's width. Per group of blocks of
    equal width: one `baddbmm` for every teacher's first layer (teachers side by side along H), then the
    hidden units are laid out per teacher ([T, M, G*H], one copy; `unbind`, whose backward is a stack: no
    zero-filled gradient per slice) so that each teacher's sum over the group's second layers is one matrix
    product over the concatenated hidden units; the groups' products are added.
    """
    lead, D = xs[0].shape[:-1], xs[0].shape[-1]
    x_MD = [x.reshape(-1, D) for x in xs]
    teachers = list(mlps)
    T = len(teachers)
    widths = [m.fc1.out_features for m in mlps[teachers[0]]]
    out: dict[int, torch.Tensor] = {}
    for width in dict.fromkeys(widths):  # intermediate blocks share one width, the last block has its own
        js = [j for j, w in enumerate(widths) if w == width]
        G, M = len(js), x_MD[0].shape[0]
        w_GHD = torch.stack([torch.cat([mlps[i][j].fc1.weight for i in teachers]) for j in js])
        b_GH = torch.stack([torch.cat([mlps[i][j].fc1.bias for i in teachers]) for j in js])
        if G == 1:
            h_GMH = F.linear(x_MD[js[0]], w_GHD[0], b_GH[0])[None]
        else:
            h_GMH = torch.baddbmm(b_GH[:, None], torch.stack([x_MD[j] for j in js]), w_GHD.transpose(1, 2))
        h_GMH = F.gelu(h_GMH)  # ProjectorMlp's nn.GELU() (exact erf form)
        per_teacher = h_GMH.view(G, M, T, width).permute(2, 1, 0, 3).reshape(T, M, G * width).unbind(0)
        for k, i in enumerate(teachers):
            w_EK = torch.cat([mlps[i][j].fc2.weight for j in js], dim=1)
            # Not stack(...).sum(0): its backward gives every bias the same expanded (stride-0) gradient, which
            # autograd keeps as each bias's .grad without a copy; the G biases' .grad then alias one buffer, and
            # gradient accumulation (or clip_grad_norm_'s in-place scaling) hits it G times. The reshape in this
            # backward copies, so each bias gets its own slice.
            b_E = torch.cat([mlps[i][j].fc2.bias for j in js]).view(G, -1).sum(dim=0)
            y_ME = F.linear(per_teacher[k], w_EK, b_E)
            out[i] = y_ME if i not in out else out[i] + y_ME
    return {i: y_ME.reshape(*lead, -1) for i, y_ME in out.items()}
