"""py adapter: a user's own nn.Module from a file, card fields from `unic_card` and spec overrides."""

from __future__ import annotations

import re
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


MISTAKES = textwrap.dedent('''
    import torch
    from torch import nn

    CARD = {"image_size": 64, "patch_size": 16, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


    class Patches(nn.Module):
        unic_card = CARD

        def __init__(self, summary="ok", batch="ok"):
            super().__init__()
            self.proj = nn.Conv2d(3, 24, kernel_size=16, stride=16)
            self.summary, self.batch = summary, batch

        def forward(self, x):
            tokens = self.proj(x).flatten(2).transpose(1, 2)
            summary = tokens.mean(1, keepdim=self.summary == "3d")
            return {"summary": summary, "patch": tokens[:1] if self.batch == "drop" else tokens}


    class Pool(nn.Module):
        """No parameters at all: a 16x16 average pool as a feature map."""

        unic_card = CARD

        def forward(self, x):
            return torch.nn.functional.avg_pool2d(x, 16)


    class BadType(Patches):
        unic_card = {**CARD, "image_size": "64", "interpolation": "cubic"}


    class NotADict(Patches):
        unic_card = [("image_size", 64)]


    def needs_arg(depth):
        return Patches()


    def raises():
        raise ValueError("boom inside user code")


    def summary_3d():
        return Patches(summary="3d")


    def summary_3d_declared():
        module = Patches(summary="3d")
        module.unic_card = {**CARD, "patch_dim": 24, "summary_dim": 24}  # widths given: no test forward pass
        return module


    def drops_batch():
        module = Patches(batch="drop")
        module.unic_card = {**CARD, "patch_dim": 24, "summary_dim": 24}
        return module


    def bad_type():
        return BadType()


    def not_a_dict():
        return NotADict()


    def pool():
        return Pool()
''')


@pytest.fixture()
def mistakes_file(tmp_path):
    path = tmp_path / "mistakes.py"
    path.write_text(MISTAKES)
    return path


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("needs_arg", r"calling needs_arg\(\) failed: TypeError: .*'depth' \(the callable must take no arguments"),
        ("raises", r"calling raises\(\) failed: ValueError: boom inside user code"),
        ("bad_type", r"unic_card: image_size must be int, got '64' \(str\); interpolation must be one of"),
        ("not_a_dict", "unic_card must be a dict, got list"),
        ("summary_3d", r"summary \[1, 1, 24\], patch \[1, 16, 24\] for a batch of 1; the contract is summary "
                       r"\[B, Ds\]"),
    ],
)
def test_resolve_card__py_user_mistakes_give_one_message_with_the_spec(mistakes_file, target, message):
    spec = f"py:{mistakes_file}:{target}"
    with pytest.raises(RegistryError, match=message) as err:  # UnknownTeacherError is a RegistryError: exit 2
        resolve_card(spec)
    assert str(err.value).startswith(f"teacher spec {spec!r}") and err.value.exit_code == 2


@pytest.mark.parametrize(("source", "message"), [("def f(:\n    pass\n", r"SyntaxError: .*\(broken\.py, line 1\)"),
                                                 ("raise RuntimeError('no CUDA here')\n",
                                                  "RuntimeError: no CUDA here")])
def test_resolve_card__py_import_failures_give_one_message(tmp_path, source, message):
    path = tmp_path / "broken.py"
    path.write_text(source)
    where = re.escape(str(path))
    with pytest.raises(UnknownTeacherError, match=rf"spec 'py:{where}:f': importing '{where}' failed: {message}"):
        resolve_card(f"py:{path}:f")


@pytest.mark.parametrize(("target", "message"),
                         [("summary_3d_declared", r"summary \[2, 1, 24\].*for a batch of 2"),
                          ("drops_batch", r"patch \[1, 4, 24\] for a batch of 2")])
def test_load_teacher__py_forward_is_checked_against_the_contract(mistakes_file, target, message):
    teacher = load_teacher(f"py:{mistakes_file}:{target}", grid=(2, 2))  # the card is declared, not measured
    with pytest.raises(RegistryError, match=message):
        teacher(torch.rand(2, 3, 32, 32))


def test_load_teacher__py_module_without_parameters_runs_in_fp32(mistakes_file):
    teacher = load_teacher(f"py:{mistakes_file}:pool", grid=(2, 2))
    images = torch.rand(2, 3, 32, 32)  # a ViT-family card: fed grid * patch_size = 32 px
    tokens = teacher(images)
    assert teacher.card.tokens == ("patch",) and tokens.patch_BND.dtype == torch.float32
    expected = torch.nn.functional.avg_pool2d((images - 0.5) / 0.5, 16)  # [2, 3, 2, 2]
    torch.testing.assert_close(tokens.patch_BND, expected.flatten(2).transpose(1, 2))


def test_load_teacher__py_flat_tokens_of_a_convnet_whose_stem_floors(tmp_path):
    # 60 px through an unpadded stride-8 conv gives 7x7 tokens, not the ceil(60 / 8) = 8x8 the card estimates.
    path = tmp_path / "floor_teacher.py"
    path.write_text(textwrap.dedent('''
        from torch import nn


        class Floor(nn.Module):
            unic_card = {"family": "convnet", "image_size": 60, "patch_size": 8, "tokens": ["patch"],
                         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}

            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 12, kernel_size=8, stride=8)

            def forward(self, x):
                return self.conv(x).flatten(2).transpose(1, 2)


        def build():
            return Floor()
    '''))
    teacher = load_teacher(f"py:{path}:build", grid=None)
    tokens = teacher(torch.randint(0, 256, (2, 3, 60, 60), dtype=torch.uint8))
    assert tokens.patch_BND.shape == (2, 49, 12) and teacher.grid == (7, 7)
