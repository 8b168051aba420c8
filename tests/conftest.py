"""Shared fixtures: tiny real models, the shared real data folder, CPU-only and offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` (real images and weights); tests that need it skip cleanly without it."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep each test to the CI machine's two cores, and deterministic."""
    import sys

    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(2)
    yield


def _handmade_unic_checkpoint(path: Path, *, student: str = "test_vit", image_size: int = 64,
                              blocks: tuple[int, ...] = (3, 5), shared_heads: bool = False, seed: int = 0,
                              student_args: dict | None = None) -> Path:
    """A `unic distill` checkpoint in the layout `unic_cli.checkpoint` writes, built by hand (no training): a
    random timm student (timm's default layout, plus `student_args`), random ladder heads, random standardiser
    statistics and a fake optimiser state. Teachers: t0 `tiny_a` (summary + patch, apache-2.0), t1 `tiny_nc` (patch
    only, cc-by-nc-4.0)."""
    import timm
    import torch

    from unic_cli import __version__
    from unic_cli.ladder import LadderProjector
    from unic_cli.registry import TeacherCard

    torch.manual_seed(seed)
    student_args = dict(student_args or {})
    model = timm.create_model(student, pretrained=False, num_classes=0, img_size=image_size, **student_args)
    cards = [
        TeacherCard(alias="tiny_a", source="timm", model_id="test_vit", image_size=64, patch_size=16,
                    summary_dim=48, patch_dim=48, mean=(0.5,) * 3, std=(0.5,) * 3, license="apache-2.0"),
        TeacherCard(alias="tiny_nc", source="timm", model_id="test_vit", image_size=64, patch_size=16,
                    patch_dim=40, tokens=("patch",), mean=(0.5,) * 3, std=(0.5,) * 3, license="cc-by-nc-4.0"),
    ]
    dims = [(c.summary_dim if c.has_summary else None, c.patch_dim) for c in cards]
    ladder = LadderProjector(in_dim=model.embed_dim, teacher_dims=dims, blocks=blocks, num_blocks=len(model.blocks),
                             shared_heads=shared_heads and all(s in (None, p) for s, p in dims), hidden_dim=32,
                             last_hidden_dim=96, init_std=0.2)
    standardizers = {}
    for i, (summary_dim, patch_dim) in enumerate(dims):
        for kind, dim in (("summary", summary_dim), ("patch", patch_dim)):
            if dim is not None:
                standardizers[f"t{i}.{kind}.mean_D"] = torch.randn(dim)
                standardizers[f"t{i}.{kind}.var_D"] = torch.rand(dim) * 4 + 0.1
    params = list(ladder.parameters())
    ckpt = {
        "format": "unic-checkpoint", "format_version": 1, "unic_version": __version__, "step": 7,
        "config": {"teachers": [c.alias for c in cards], "student": student, "image_size": image_size,
                   "data_dir": "/nowhere", "out_dir": str(path.parent), "num_steps": 10, "lr": 1e-3},
        "teachers": [c.to_dict() for c in cards],
        "teacher_specs": [c.alias for c in cards],
        "student": {"name": student,
                    "model_args": {"img_size": image_size, "num_classes": 0, "drop_path_rate": 0.1, **student_args},
                    "state_dict": model.state_dict(), "image_size": image_size, "patch_size": 16,
                    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"},
        "ladder": ladder.state_dict(),
        "ladder_meta": {"blocks": list(blocks), "shared_heads": ladder.shared_heads, "hidden_dim": 32,
                        "last_hidden_dim": 96, "std_eps": 1e-6, "standardize": True},
        "standardizers": standardizers,
        "optimizer": {"state": {i: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                                for i, p in enumerate(params)},
                      "param_groups": [{"lr": 1e-3, "params": list(range(len(params)))}]},
        "scheduler": {"step": 7}, "rng": {"torch": torch.get_rng_state()}, "data": {"epoch": 0, "batch_index": 7},
        "last_metrics": {"loss": 1.5, "teachers": {"t0": {"summary_cos": 0.5, "patch_cos": 0.4},
                                                   "t1": {"patch_cos": 0.3}}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def make_unic_checkpoint(tmp_path):
    """Factory: `make_unic_checkpoint(path=None, **kw)` writes a hand-built unic checkpoint (see above)."""

    def make(path: Path | None = None, **kwargs) -> Path:
        return _handmade_unic_checkpoint(path or tmp_path / "run" / "checkpoints" / "last.pt", **kwargs)

    return make


_TINY_CARD = """source = "timm"
model_id = "{model}"
image_size = 160
patch_size = 16
summary_dim = 64
patch_dim = 64
num_register_tokens = {registers}
summary_from = "{summary_from}"
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
license = "apache-2.0"
"""


@pytest.fixture
def tiny_teachers(tmp_path_factory, monkeypatch) -> tuple[str, str]:
    """Two tiny random timm teachers as registry cards (`tiny_a` = test_vit, `tiny_b` = test_vit2: one
    register, no class token, pooled summary), in a tmp registry folder that is also exported as
    UNIC_REGISTRY_PATH for subprocesses."""
    from unic_cli import registry

    folder = tmp_path_factory.mktemp("registry")
    (folder / "tiny_a.toml").write_text(_TINY_CARD.format(model="test_vit", registers=0, summary_from="cls"))
    (folder / "tiny_b.toml").write_text(_TINY_CARD.format(model="test_vit2", registers=1, summary_from="pool"))
    monkeypatch.setattr(registry, "_user_dirs", [])
    registry.all_cards.cache_clear()
    registry.add_registry_dir(folder)
    monkeypatch.setenv("UNIC_REGISTRY_PATH", str(folder))
    yield "tiny_a", "tiny_b"
    registry.all_cards.cache_clear()


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    """32 random RGB JPEGs of mixed sizes in two class folders (a stand-in for a real image folder)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(32):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        size = (int(rng.integers(64, 96)), int(rng.integers(64, 96)), 3)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(sub / f"{i:03d}.jpg")
    return folder


def _conv_teacher_module(first_in_forward: str, *, image_size: int = 32) -> str:
    """The source of a `py:` teacher module (`build`): a tiny ConvNet (a stride-8 map and its pooled summary)
    whose forward first runs `first_in_forward` (code on `x`, the normalised batch), e.g. to fail on cue."""
    body = "\n".join("        " + line for line in first_in_forward.strip().splitlines())
    return f'''
import os
from pathlib import Path

import torch
from torch import nn


class ConvTeacher(nn.Module):
    unic_card = {{"family": "convnet", "image_size": {image_size}, "patch_size": 8, "mean": [0.5, 0.5, 0.5],
                 "std": [0.25, 0.25, 0.25], "summary_from": "pool", "license": "mit"}}

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)

    def forward(self, x):
{body}
        fmap = self.conv(x)
        return {{"summary": fmap.mean(dim=(2, 3)), "patch": fmap}}


def build(pretrained=False):
    return ConvTeacher()
'''


@pytest.fixture()
def conv_teacher_module():
    """`conv_teacher_module(code, image_size=32)`: the source of a tiny `py:` ConvNet teacher module whose forward
    first runs `code`."""
    return _conv_teacher_module


@pytest.fixture()
def greedy_teacher(tmp_path) -> str:
    """A `py:` teacher spec whose forward runs out of memory at batch 4 or more (and works below): it asks the
    allocator for 40 TB, a real allocation failure (the CPU allocator's error; CUDA raises OutOfMemoryError)."""
    path = tmp_path / "greedy_teacher.py"
    path.write_text(_conv_teacher_module("if x.shape[0] >= 4:\n    torch.empty(10**13)"))
    return f"py:{path}:build"
