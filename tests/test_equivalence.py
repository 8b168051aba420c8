"""Equivalence audit of the training step: settings that arrange the same training differently give the same
numbers (gradient accumulation vs a bigger batch, the fused vs the per-head ladder, --compile vs eager, bf16 vs
fp32 students, FSDP vs DDP), and the ablation flags of Table 1 do exactly what docs/distill.md says.

Where an arrangement cannot give the same numbers (the standardisation statistics under accumulation) the test
pins the documented behaviour instead. Steps run through `unic_cli.train_step` directly (no data loader, no run
folder) with fp32 teachers and no stochastic depth unless a test says otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unic_cli import train_step
from unic_cli.config import DistillConfig
from unic_cli.data import Batch
from unic_cli.distributed import DistInfo
from unic_cli.schedule import ema_momentum, learning_rate

BASE = dict(student="test_vit", image_size=64, batch_size=8, base_lr=1e-2, device="cpu", random_init_teachers=True,
            teacher_dtype="fp32", drop_path_rate=0.0, warmup_steps=1, num_workers=0)


def _no_timer(name: str):  # the step's timing hook, off
    return contextlib.nullcontext()


def _images(num: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (num, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _batches(images_BCHW: torch.Tensor, batch_size: int):
    """Consecutive batches of `images_BCHW`, wrapping around: micro-batches of b are the big batch's images."""
    start = 0
    while True:
        yield Batch(images_BCHW[start:start + batch_size], 0)
        start = (start + batch_size) % len(images_BCHW)


def _config(teachers, **fields) -> DistillConfig:
    return DistillConfig(teachers=tuple(teachers), data_dir=Path("."), out_dir=Path("unused"), **{**BASE, **fields})


def _train(teachers, steps: int = 3, **fields) -> dict:
    """`steps` optimiser steps as `distill.run` takes them (same LR and EMA schedules); everything a user sees."""
    config = _config(teachers, steps=steps, **fields)
    tr = train_step.build_trainer(config, torch.device("cpu"), DistInfo())
    batches = _batches(_images(), config.batch_size)
    tr.model.train()
    out = {"loss": [], "metrics_TM": [], "coeff_T": [], "grads": [], "peak_lr": tr.peak_lr}
    for step in range(steps):
        for group in tr.optimizer.param_groups:
            group["lr"] = learning_rate(step, peak_lr=tr.peak_lr, min_lr=config.min_lr, warmup_steps=1,
                                        total_steps=steps)
        tr.optimizer.zero_grad(set_to_none=True)
        stats = train_step.forward_backward(tr, batches, ema_momentum(step, total_steps=steps), _no_timer)
        out["grads"].append({n: p.grad.clone() for n, p in tr.core.named_parameters() if p.grad is not None})
        train_step.optimizer_step(tr, _no_timer)
        out["loss"].append(stats.loss)
        out["metrics_TM"].append(stats.metrics_TM)
        out["coeff_T"].append(stats.coeff_T)
    out["weights"] = {n: p.detach().clone() for n, p in tr.core.named_parameters()}
    out["stats"] = tr.core.standardizers.state_dict() if tr.core.standardizers is not None else {}
    return out


def _assert_same_training(a: dict, b: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert a["peak_lr"] == b["peak_lr"]
    for key in ("loss", "metrics_TM", "coeff_T"):
        torch.testing.assert_close(torch.stack(a[key]), torch.stack(b[key]), rtol=rtol, atol=atol, equal_nan=True,
                                   msg=key)
    for step, (ga, gb) in enumerate(zip(a["grads"], b["grads"])):
        for name in ga:
            torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6, msg=f"step {step} grad {name}")
    for name in a["weights"]:
        wa, wb = a["weights"][name], b["weights"][name]
        if name.endswith("attn.qkv.bias"):
            # The key bias adds a constant to every score of a query, which softmax ignores: its gradient is zero
            # up to rounding (~1e-11), and AdamW scales that noise to steps of the learning rate's size.
            width = wa.shape[0] // 3
            wa, wb = torch.cat([wa[:width], wa[2 * width:]]), torch.cat([wb[:width], wb[2 * width:]])
        torch.testing.assert_close(wa, wb, rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------
# 1. Gradient accumulation


@pytest.mark.parametrize("standardize", [False, True])
def test_grad_accum__two_micro_batches_train_like_the_doubled_batch(tiny_teachers, standardize):
    # Teacher dropping on (p = 0.5): the coefficients must come from one draw per optimiser step, and the fused
    # ladder's gradients must accumulate. Standardisation on: the statistics must see the whole step's moments
    # once, before any micro-batch is standardised (per-micro-batch updates differed by 0.3-2.9% in loss).
    big = _train(tiny_teachers, batch_size=8, grad_accum_steps=1, standardize=standardize)
    accum = _train(tiny_teachers, batch_size=4, grad_accum_steps=2, standardize=standardize)
    assert not torch.stack(big["coeff_T"]).eq(1).all()  # some teachers were dropped
    _assert_same_training(big, accum)
    for key in big["stats"]:
        torch.testing.assert_close(big["stats"][key], accum["stats"][key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("fields", [{}, {"ladder_blocks": "last", "shared_heads": True}, {"standardize": False}],
                         ids=["ladder", "last-shared", "raw"])
def test_step__every_trainable_parameter_gets_a_gradient(tiny_teachers, fields):
    """Every trainable parameter takes part in the loss: what lets DDP run without `find_unused_parameters`, and
    what makes the zero gradients allocated for CUDA graphs with accumulation (`_grads_outside_cuda_graphs`)
    harmless (an unused parameter would otherwise get weight decay and momentum from a zero gradient)."""
    grads = _train(tiny_teachers, steps=1, **fields)["grads"][0]
    tr = train_step.build_trainer(_config(tiny_teachers, **fields), torch.device("cpu"), DistInfo())
    trainable = {n for n, p in tr.core.named_parameters() if p.requires_grad}
    assert trainable and trainable == set(grads)


def test_grad_accum__statistics_take_the_whole_steps_moments_once(tiny_teachers):
    """k micro-batches: one EMA update with momentum m and the moments of all k*b images, as one batch would."""
    config = _config(tiny_teachers, batch_size=4, grad_accum_steps=2, steps=1, teacher_drop_prob=0.0)
    tr = train_step.build_trainer(config, torch.device("cpu"), DistInfo())
    images = _images(8)
    momentum = 0.7
    train_step.forward_backward(tr, _batches(images, 4), momentum, _no_timer)
    for i, teacher in enumerate(tr.teachers):
        y = teacher(images).patch_BND.float().flatten(0, 1)
        mu_D = y.mean(dim=0)
        mean_D = torch.zeros_like(mu_D).lerp(mu_D, momentum)
        var_D = torch.ones_like(mu_D).lerp(y.square().mean(dim=0) - mu_D.square(), momentum)
        stats = tr.core.standardizers.stats[f"t{i}"]["patch"]
        torch.testing.assert_close(stats.mean_D, mean_D, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.var_D, var_D, rtol=1e-5, atol=1e-6)


def test_grad_accum__schedules_count_optimiser_steps_of_the_global_batch(tiny_teachers):
    from unic_cli.distill import total_steps

    big = _config(tiny_teachers, batch_size=12, epochs=3)
    accum = _config(tiny_teachers, batch_size=4, grad_accum_steps=3, epochs=3)
    assert train_step.global_batch_size(big, 2) == train_step.global_batch_size(accum, 2) == 24  # peak lr too
    for num_images in (36, 40, 47):  # the loader's steps per epoch count micro-batches (of 4 x 2 processes)
        assert total_steps(accum, num_images // 8) == total_steps(big, num_images // 24)


def test_grad_accum__an_epoch_holds_whole_optimiser_steps(tiny_images):
    # 32 images, micro-batches of 4, k = 3: an epoch holds 8 micro-batches, 2 optimiser steps and 2 left over.
    # The big batch (12) drops the epoch's last 8 images and starts epoch 1 at step 3; accumulation must too.
    from unic_cli.data import build_train_loader

    def steps(batch_size: int, accum: int) -> list[torch.Tensor]:
        loader = build_train_loader(tiny_images, image_size=32, batch_size=batch_size, num_workers=0, seed=0,
                                    augment="none", accum_steps=accum)
        assert loader.steps_per_epoch == 2 * accum  # whole optimiser steps: 32 images hold 2 steps of 12
        batches = iter(loader)
        return [torch.cat([next(batches).images_BCHW for _ in range(accum)]) for _ in range(3)]

    for step, (a, b) in enumerate(zip(steps(4, 3), steps(12, 1))):
        assert torch.equal(a, b), f"optimiser step {step} sees other images"


# ---------------------------------------------------------------------------------------------
# 2. The fused ladder


@pytest.mark.parametrize(("num_micro", "clip"), [(2, False), (1, True)], ids=["accumulate", "clip"])
def test_ladder__fused_gradients_accumulate_and_clip_like_per_head_calls(num_micro, clip):
    # Two backward passes (gradient accumulation), or clip_grad_norm_ (in-place scaling) after one: the fused
    # heads' biases must own their gradients, as the per-head modules' do.
    from unic_cli.ladder import LadderProjector

    torch.manual_seed(0)
    ladder = LadderProjector(in_dim=16, teacher_dims=[(24, 24), (None, 8)], blocks=(0, 1, 2, 3), num_blocks=4,
                             shared_heads=False, hidden_dim=16, last_hidden_dim=64)
    micro_batches = [[(torch.randn(2, 16), torch.randn(2, 9, 16)) for _ in range(4)] for _ in range(num_micro)]

    def grads(fused: bool) -> dict[str, torch.Tensor]:
        ladder.fused = fused
        ladder.zero_grad(set_to_none=True)
        for taps in micro_batches:
            sum(p.square().mean() for pred in ladder(taps) for p in pred.values()).backward()
        if clip:
            assert torch.nn.utils.clip_grad_norm_(ladder.parameters(), 1e-3) > 1e-3  # it clips
        return {n: p.grad.clone() for n, p in ladder.named_parameters()}

    fused, plain = grads(True), grads(False)
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], msg=name)


# ---------------------------------------------------------------------------------------------
# 4. bf16 student vs fp32


def test_student_dtype__bf16_trains_like_fp32_within_bf16_rounding(tiny_teachers):
    fp32 = _train(tiny_teachers, student_dtype="fp32", teacher_drop_prob=0.0)
    bf16 = _train(tiny_teachers, student_dtype="bf16", teacher_drop_prob=0.0)
    loss32, loss16 = torch.stack(fp32["loss"]), torch.stack(bf16["loss"])
    assert torch.isfinite(loss16).all() and all(torch.isfinite(w).all() for w in bf16["weights"].values())
    # measured 1e-4 apart (relative) over 3 steps on this CPU; bf16 rounding differs between CPUs and GPUs
    torch.testing.assert_close(loss16, loss32, rtol=2e-3, atol=0)
    assert all(w.dtype == torch.float32 for w in bf16["weights"].values())  # autocast: fp32 master weights


# ---------------------------------------------------------------------------------------------
# 5. Table 1's ablation flags


def test_teacher_drop_prob__zero_equals_a_vanishing_drop_probability(tiny_teachers):
    # p = 0 skips the draws; p = 1e-9 draws and keeps (almost surely) every teacher: the same training
    off = _train(tiny_teachers, steps=2, teacher_drop_prob=0.0)
    tiny = _train(tiny_teachers, steps=2, teacher_drop_prob=1e-9)
    assert torch.stack(off["coeff_T"]).eq(1).all()
    _assert_same_training(off, tiny, rtol=0, atol=0)
    # without dropping, the loss is the plain mean of the per-teacher losses
    torch.testing.assert_close(off["loss"][0], off["metrics_TM"][0][:, 0].mean())


@pytest.mark.parametrize("shared_heads", [True, False], ids=["row4-shared", "row6-dedicated"])
def test_ladder_blocks_last__is_a_plain_head_on_the_encoder_output(tiny_teachers, shared_heads):
    """Table 1 row 4 (`--no-standardize --shared-heads --ladder-blocks last --teacher-drop-prob 0`) and row 6
    (dedicated heads): the loss is Eq. 1-2 on one MLP head over timm's own `forward_features` output (the
    encoder users export) against the raw teacher tokens, recomputed here without unic's loss code."""
    config = _config(tiny_teachers, standardize=False, shared_heads=shared_heads, ladder_blocks="last",
                     teacher_drop_prob=0.0, steps=1)
    tr = train_step.build_trainer(config, torch.device("cpu"), DistInfo())
    assert tr.core.ladder.blocks == (tr.core.student.num_blocks - 1,) and tr.core.standardizers is None
    images = _images(8)
    stats = train_step.forward_backward(tr, _batches(images, 8), 1.0, _no_timer)

    model = tr.core.student.model
    tokens_BLD = model.forward_features(tr.core.student.normalize(images))
    cls_BD, patch_BND = tokens_BLD[:, 0], tokens_BLD[:, model.num_prefix_tokens:]
    last = f"b{tr.core.student.num_blocks - 1}"

    def eq1(pred, target):  # 0.5 (1 - cos) + 0.5 smooth-L1 per token, averaged over channels
        return 0.5 * (1 - F.cosine_similarity(pred, target, dim=-1)) + 0.5 * F.smooth_l1_loss(
            pred, target, reduction="none").mean(dim=-1)

    per_teacher = []
    with torch.no_grad():
        for i, teacher in enumerate(tr.teachers):
            heads = tr.core.ladder.heads[f"t{i}"]
            summary_head, patch_head = (heads["shared"][last],) * 2 if shared_heads else (
                heads["summary"][last], heads["patch"][last])
            target = teacher(images)
            losses = [eq1(patch_head(patch_BND), target.patch_BND).mean(dim=1)]
            if target.summary_BD is not None:
                losses.insert(0, eq1(summary_head(cls_BD), target.summary_BD))
            per_teacher.append(torch.stack(losses).mean(dim=0).mean())
    torch.testing.assert_close(stats.loss, torch.stack(per_teacher).mean(), rtol=1e-5, atol=1e-6)


def test_standardize__off_feeds_raw_targets_and_fresh_frozen_statistics_are_the_identity(tiny_teachers):
    from unic_cli.losses import teacher_losses

    images = _images(8)
    for standardize in (False, True):
        tr = train_step.build_trainer(_config(tiny_teachers, standardize=standardize, steps=1), torch.device("cpu"),
                                      DistInfo())
        with torch.no_grad():
            preds, targets = tr.core(images), [t(images) for t in tr.teachers]
            raw = [{"patch": t.patch_BND, **({"summary": t.summary_BD} if t.summary_BD is not None else {})}
                   for t in targets]
            # on: the initial statistics (mean 0, variance 1) are applied without an update; off: even a step's
            # update leaves the targets raw
            if not standardize:
                tr.core.update_standardizers([targets], 0.5)
            got = tr.core.losses(preds, targets)
            torch.testing.assert_close(got.loss_TB, teacher_losses(preds, raw).loss_TB, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 3. --compile vs eager


@pytest.mark.slow  # inductor compiles the student's block, two teachers' blocks and the ladder: ~40 s on 2 cores
def test_compile__three_steps_train_like_eager(tiny_teachers):
    torch._dynamo.reset()
    eager = _train(tiny_teachers, teacher_drop_prob=0.5)
    compiled = _train(tiny_teachers, teacher_drop_prob=0.5, compile=True)
    # inductor fuses and reorders fp32 sums: the same training up to rounding, which AdamW amplifies on
    # parameters with near-zero gradients (attention key biases), so weights are compared as one vector
    torch.testing.assert_close(torch.stack(compiled["loss"]), torch.stack(eager["loss"]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(compiled["coeff_T"]), torch.stack(eager["coeff_T"]), rtol=0, atol=0)
    flat = [torch.cat([w.flatten() for w in run["weights"].values()]) for run in (eager, compiled)]
    assert (flat[1] - flat[0]).norm() / flat[0].norm() < 1e-4


# ---------------------------------------------------------------------------------------------
# 6. FSDP vs DDP, with accumulation across processes


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _last_student(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["student"]["state_dict"]


@pytest.mark.slow  # two torchrun launches of two processes: about 50 s on 2 busy cores
def test_fsdp_and_ddp__two_processes_with_accumulation_train_like_one(tiny_teachers, tiny_images, tmp_path):
    """2 gloo processes x 2 micro-batches of 2 images, under DDP and under FSDP2, against 1 process x 2
    micro-batches of 4: the same global batches, teacher-dropping draws, statistics (the step's moments, averaged
    over processes) and gradients, with the defaults' standardisation and teacher dropping."""
    from unic_cli.distill import run

    flags = dict(student="test_vit", image_size=64, steps=3, base_lr=1e-2, num_workers=0, augment="none",
                 log_every=1, checkpoint_every=3, random_init_teachers=True, device="cpu", teacher_dtype="fp32",
                 drop_path_rate=0.0, grad_accum_steps=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"])):
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "unic_cli", "distill", "--teachers", *tiny_teachers, "--data", str(tiny_images), "--out",
                str(tmp_path / name), "--batch-size", "2", *extra,
                *(x for k, v in flags.items() for x in ("--" + k.replace("_", "-"), str(v)) if v is not True),
                *("--" + k.replace("_", "-") for k, v in flags.items() if v is True)]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run(DistillConfig.from_sources(None, dict(teachers=tiny_teachers, data_dir=tiny_images,
                                              out_dir=tmp_path / "single", batch_size=4, **flags)))
    single = _rows(tmp_path / "single")
    for name in ("ddp", "fsdp"):
        rows = _rows(tmp_path / name)
        assert [r["step"] for r in rows] == [r["step"] for r in single] == [1, 2, 3]
        for a, b in zip(rows, single):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6), (name, a["step"])
            for key in a["teachers"]:
                assert a["teachers"][key]["coeff"] == b["teachers"][key]["coeff"], (name, a["step"], key)
                assert a["teachers"][key]["loss"] == pytest.approx(b["teachers"][key]["loss"], rel=1e-4, abs=1e-6)
        weights, reference = _last_student(tmp_path / name), _last_student(tmp_path / "single")
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
