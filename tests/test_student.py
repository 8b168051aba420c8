"""Student: per-block taps of a timm ViT, registers removed, final norm trained, clear errors."""

from __future__ import annotations

import pytest
import torch

from unic_cli.errors import ConfigError
from unic_cli.student import build_student


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])  # test_vit2 has a register token
def test_build_student__taps_every_requested_block(name):
    student = build_student(name, image_size=64)
    assert student.grid == (4, 4) and student.patch_size == 16 and student.embed_dim == 64
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    taps = student(student.normalize(images), blocks=(0, student.num_blocks - 1))
    assert len(taps) == 2
    for summary_BD, patch_BND in taps:
        assert summary_BD.shape == (2, 64) and patch_BND.shape == (2, 16, 64)


@pytest.mark.parametrize("name", ["test_vit", "test_vit2"])  # class token; one register and no class token
def test_student__own_block_loop_matches_timm_forward_intermediates(name):
    """A VisionTransformer's taps come from unic's own block loop (so `tap` can be compiled): the same values
    and gradients as timm's `forward_intermediates` with the final norm."""
    torch.manual_seed(0)
    student = build_student(name, image_size=64)
    x_BCHW = torch.randn(2, 3, 64, 64)
    blocks = (1, 3, student.num_blocks - 1)

    def run(own: bool):
        student.zero_grad(set_to_none=True)
        if own:
            taps = student(x_BCHW, blocks=blocks)
        else:
            outs = student.model.forward_intermediates(x_BCHW, indices=list(blocks), norm=True, output_fmt="NLC",
                                                       return_prefix_tokens=True, intermediates_only=True)
            taps = [(prefix[:, 0] if student.has_cls_token else patch.mean(1), patch) for patch, prefix in outs]
        sum(s.square().sum() + 0.5 * p.sum() for s, p in taps).backward()
        return taps, [p.grad.clone() for p in student.parameters() if p.requires_grad]

    own_taps, own_grads = run(True)
    timm_taps, timm_grads = run(False)
    for (s1, p1), (s2, p2) in zip(own_taps, timm_taps, strict=True):
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)
    for g1, g2 in zip(own_grads, timm_grads, strict=True):  # summation order differs: rounding only
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_student__out_of_range_blocks_raise_and_checkpointing_keeps_the_values():
    student = build_student("test_vit", image_size=64)
    with pytest.raises(IndexError, match=r"blocks \[6\] out of range for a 6-block student"):
        student(torch.randn(1, 3, 64, 64), blocks=(6,))
    x_BCHW = torch.randn(2, 3, 64, 64)
    own = student(x_BCHW, blocks=(-1, 2))
    student.model.set_grad_checkpointing(True)  # timm's own loop (it checkpoints each block)
    for (s1, p1), (s2, p2) in zip(own, student(x_BCHW, blocks=(-1, 2)), strict=True):
        torch.testing.assert_close(s1, s2, rtol=0, atol=0)
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_build_student__eva_taps_through_timm_forward_intermediates():
    """An Eva student (rotary embeddings) keeps timm's own block loop: a 4x4 grid of patch-14 tokens per tap."""
    student = build_student("eva02_tiny_patch14_224", image_size=56)
    assert type(student.model).__name__ == "Eva" and student.grid == (4, 4) and student.has_cls_token
    taps = student(torch.randn(2, 3, 56, 56), blocks=(0, student.num_blocks - 1))
    assert [(s.shape, p.shape) for s, p in taps] == [((2, 192), (2, 16, 192))] * 2
    (taps[0][0].sum() + taps[0][1].sum()).backward()
    assert student.model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert student.model.blocks[-1].attn.qkv.weight.grad is None  # the loss reads block 0's tap only


def test_student__final_norm_gets_gradient():
    student = build_student("test_vit", image_size=64)
    summary_BD, patch_BND = student(torch.randn(2, 3, 64, 64), blocks=(2, 5))[0]
    (summary_BD.sum() + patch_BND.sum()).backward()
    assert student.model.norm.weight.grad is not None and student.model.norm.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "size", "moved"), [("test_vit2", 64, {"fc_norm": False}),
                                                     ("eva02_tiny_patch14_224", 56, {"use_fc_norm": False})])
def test_build_student__norm_after_pool_moves_before_it_so_taps_are_normalised(name, size, moved):
    """timm builds these with no final norm and a post-pooling fc_norm: taps would be unnormalised residuals."""
    import timm

    default = timm.create_model(name, num_classes=0, img_size=size)
    assert isinstance(default.norm, torch.nn.Identity) and not isinstance(default.fc_norm, torch.nn.Identity)
    student = build_student(name, image_size=size)
    assert student.model_args == {"img_size": size, "num_classes": 0, **moved}
    assert isinstance(student.model.fc_norm, torch.nn.Identity)
    assert student.model.norm.weight.shape == (student.embed_dim,)
    summary_BD, patch_BND = student(torch.randn(2, 3, size, size) * 3, blocks=(1,))[0]
    torch.testing.assert_close(patch_BND.mean(-1), torch.zeros(patch_BND.shape[:2]), rtol=0, atol=1e-5)
    torch.testing.assert_close(patch_BND.std(-1, unbiased=False), torch.ones(patch_BND.shape[:2]), rtol=0, atol=1e-3)
    (summary_BD.sum() + patch_BND.pow(2).mul(torch.linspace(0, 1, student.embed_dim)).sum()).backward()
    assert student.model.norm.weight.grad.abs().sum() > 0
    # a saved run's model_args are built as they are: a run started before the move resumes with its layout
    old = build_student(name, image_size=size, model_args={"img_size": size, "num_classes": 0})
    assert old.model.state_dict().keys() == default.state_dict().keys()


def test_student__state_dict_is_plain_timm():
    import timm

    student = build_student("test_vit", image_size=64)
    plain = timm.create_model("test_vit", num_classes=0, img_size=64)
    assert student.model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize(("name", "size", "message"), [
    ("resnet18", 64, "unic students must be a timm ViT"),
    ("swin_tiny_patch4_window7_224", 224, "is a timm SwinTransformer; unic students must be"),
    ("vit_smal_patch16_224", 224, "Did you mean 'vit_small_patch16_224'"),
    ("test_vit", 70, "not a multiple of test_vit's patch size 16; use 64 or 80."),
])
def test_build_student__clear_errors(name, size, message):
    with pytest.raises(ConfigError, match=message):
        with torch.device("meta"):
            build_student(name, image_size=size)


def test_student__normalize_resizes_larger_batches_to_its_input():
    student = build_student("test_vit", image_size=64)
    images = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    x = student.normalize(images)
    assert x.shape == (2, 3, 64, 64)
    flat = torch.full((1, 3, 96, 96), 255, dtype=torch.uint8)  # resizing keeps a flat image flat
    torch.testing.assert_close(student.normalize(flat), ((1 - student.mean_C) / student.std_C).expand(1, 3, 64, 64))


def test_uniform_drop_path__swaps_only_when_some_rate_is_positive():
    from unic_cli.student import _TensorDropPath, build_student, uniform_drop_path

    plain = build_student("test_vit", image_size=32, drop_path_rate=0.0).model
    uniform_drop_path(plain)  # nothing to drop: no module that would draw a mask per block
    assert not any(isinstance(m, _TensorDropPath) for m in plain.modules())
    dropping = build_student("test_vit", image_size=32, drop_path_rate=0.1).model
    uniform_drop_path(dropping)
    assert sum(isinstance(m, _TensorDropPath) for m in dropping.modules()) > 0


def test_build_trainer__resume_builds_the_checkpoints_student_layout(tiny_teachers):
    """A run saved before post-pooling norms moved (timm's layout: fc_norm, no final norm) resumes with that layout
    and its weights; a new run gets the norm before the pooling."""
    import contextlib

    from unic_cli import train_step
    from unic_cli.bench import _synthetic_batches
    from unic_cli.config import BenchConfig
    from unic_cli.distributed import dist_info
    from unic_cli.plan import build_model

    config = BenchConfig.from_sources(None, dict(teachers=tiny_teachers, student="test_vit2", image_size=64,
                                                 batch_size=2, device="cpu", random_init_teachers=True))
    fresh = train_step.build_trainer(config, torch.device("cpu"), dist_info())
    assert fresh.core.student.model_args["fc_norm"] is False
    old_args = {"img_size": 64, "num_classes": 0}
    old = build_student("test_vit2", image_size=64, model_args=old_args)
    torch.nn.init.normal_(old.model.fc_norm.weight)  # weights that a fresh build would not have
    # the optimiser state such a run saved: its trainable parameters (fc_norm frozen, no final norm)
    old_core = build_model(config, fresh.teachers, old)
    old_optimizer = torch.optim.AdamW(train_step.param_groups(old_core, config.weight_decay))
    ckpt = {"student": {"model_args": old_args, "state_dict": old.model.state_dict()},
            "ladder": fresh.core.ladder.state_dict(), "standardizers": fresh.core.standardizers.state_dict(),
            "teachers": [t.card.to_dict() for t in fresh.teachers], "optimizer": old_optimizer.state_dict()}
    resumed = train_step.build_trainer(config, torch.device("cpu"), dist_info(), ckpt)
    model = resumed.core.student.model
    assert resumed.core.student.model_args == old_args and isinstance(model.norm, torch.nn.Identity)
    torch.testing.assert_close(model.fc_norm.weight, old.model.fc_norm.weight, rtol=0, atol=0)
    stats = train_step.forward_backward(resumed, _synthetic_batches(2, 64, 0), 0.5,
                                        lambda name: contextlib.nullcontext())
    assert torch.isfinite(stats.loss)
