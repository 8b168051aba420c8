"""py adapter: a user's own nn.Module from a file, card fields from `unic_card` and spec overrides."""

from __future__ import annotations

import textwrap

import pytest
import torch

from unic_cli.errors import RegistryError, UnknownTeacherError
from unic_cli.teachers import load_teacher, resolve_card

MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    class ConvTeacher(nn.Module):
        """A tiny ConvNet: a stride-8 feature map plus a pooled summary, as a dict."""

        unic_card = {"family": "convnet", "image_size": 64, "patch_size": 8, "mean": [0.5, 0.5, 0.5],
                     "std": [0.25, 0.25, 0.25], "summary_from": "pool", "license": "mit"}

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, kernel_size=8, stride=8)

        def forward(self, x):
            fmap = self.conv(x)
            return {"summary": fmap.mean(dim=(2, 3)), "patch": fmap}


    class TokenTeacher(nn.Module):
        """Patch tokens only, as a [B, N, D] tensor; no unic_card (the spec gives the fields)."""

        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 16, kernel_size=16, stride=16)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)


    def build_conv(pretrained=False):
        return ConvTeacher()


    def build_tokens():
        return TokenTeacher()


    def build_wrong():
        return "not a module"
''')


@pytest.fixture()
def module_file(tmp_path):
    path = tmp_path / "my_teacher.py"
    path.write_text(MODULE)
    return path


def test_resolve_card__py_card_from_unic_card_and_a_measured_width(module_file):
    card = resolve_card(f"py:{module_file}:build_conv")
    assert (card.family, card.patch_size, card.patch_dim, card.summary_dim, card.license) == ("convnet", 8, 12, 12,
                                                                                               "mit")


def test_load_teacher__py_feature_map_resized_to_the_student_grid(module_file):
    teacher = load_teacher(f"py:{module_file}:build_conv", grid=(14, 14))
    images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    tokens = teacher(images)
    assert teacher.input_size == (64, 64) and tokens.patch_BND.shape == (2, 196, 12)
    assert tokens.summary_BD.shape == (2, 12)


def test_load_teacher__py_tokens_with_spec_overrides(module_file):
    spec = f"py:{module_file}:build_tokens?image_size=64&patch_size=16&mean=0.5,0.5,0.5&std=0.5,0.5,0.5"
    teacher = load_teacher(spec, grid=(4, 4))
    assert teacher.card.tokens == ("patch",) and teacher.card.patch_dim == 16
    assert teacher(torch.rand(2, 3, 64, 64)).patch_BND.shape == (2, 16, 16)


def test_resolve_card__py_missing_fields_are_named_with_the_fix(module_file):
    with pytest.raises(RegistryError, match=r"needs image_size, patch_size, mean, std.*unic_card"):
        resolve_card(f"py:{module_file}:build_tokens")


@pytest.mark.parametrize(("target", "message"), [("build_wrong", "not an nn.Module"), ("nope", "no callable 'nope'")])
def test_resolve_card__py_bad_callables(module_file, target, message):
    with pytest.raises(UnknownTeacherError, match=message):
        resolve_card(f"py:{module_file}:{target}")


def test_load_teacher__py_local_weights_load_strictly(module_file, tmp_path):
    torch.manual_seed(0)
    source = load_teacher(f"py:{module_file}:build_conv", grid=None, pretrained=False)
    path = tmp_path / "w.pt"
    torch.save(source.backbone.module.state_dict(), path)
    teacher = load_teacher(f"py:{module_file}:build_conv={path}", grid=None)
    images = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(teacher(images).patch_BND, source(images).patch_BND)
