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


def test_student__final_norm_gets_gradient():
    student = build_student("test_vit", image_size=64)
    summary_BD, patch_BND = student(torch.randn(2, 3, 64, 64), blocks=(2, 5))[0]
    (summary_BD.sum() + patch_BND.sum()).backward()
    assert student.model.norm.weight.grad is not None and student.model.norm.weight.grad.abs().sum() > 0


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
