"""bf16 teachers: weights converted to bf16 run natively (no autocast) and agree with fp32, for every source."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unic_cli.teachers import load_teacher


def _pair(spec: str, grid):
    torch.manual_seed(0)
    fp32 = load_teacher(spec, grid=grid, pretrained=True)
    bf16 = load_teacher(spec, grid=grid, pretrained=True)
    bf16.load_state_dict(fp32.state_dict())  # same random weights, whatever the source's init does
    bf16.backbone.to(torch.bfloat16)
    return fp32, bf16


def _check(fp32, bf16, images):
    ref, low = fp32(images), bf16(images)
    assert low.patch_BND.dtype == torch.bfloat16  # natively bf16: no autocast left an fp32 layer norm at the end
    for a, b in ((ref.patch_BND, low.patch_BND), (ref.summary_BD, low.summary_BD)):
        if a is None:
            continue
        cos = F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1)
        assert a.shape == b.shape and bool((cos > 0.99).all()), cos


@pytest.mark.parametrize("name", ["timm:test_vit2", "timm:test_efficientnet"])
def test_teacher__bf16_weights_match_fp32_timm(name):
    torch.manual_seed(0)
    fp32 = load_teacher(name, grid=(4, 4), pretrained=False)
    bf16 = load_teacher(name, grid=(4, 4), pretrained=False)
    bf16.load_state_dict(fp32.state_dict())
    bf16.backbone.to(torch.bfloat16)
    _check(fp32, bf16, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))


@pytest.mark.parametrize("name", ["dinov2_reg", "clip", "siglip"])
def test_teacher__bf16_weights_match_fp32_hf(hf_dirs, name):
    fp32, bf16 = _pair(f"hf:{hf_dirs[name]}", (4, 4))
    _check(fp32, bf16, torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))


def test_teacher__bf16_weights_match_fp32_open_clip(tiny_open_clip):
    torch.manual_seed(0)
    fp32 = load_teacher(f"open_clip:{tiny_open_clip['vit']}", grid=(4, 4), pretrained=False)
    bf16 = load_teacher(f"open_clip:{tiny_open_clip['vit']}", grid=(4, 4), pretrained=False)
    bf16.load_state_dict(fp32.state_dict())
    bf16.backbone.to(torch.bfloat16)
    _check(fp32, bf16, torch.randint(0, 256, (2, 3, 56, 56), dtype=torch.uint8))
