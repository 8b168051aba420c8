"""Probe fixtures: generated datasets in every layout, local teacher weights, and one exported student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def make_class_data(root: Path, *, splits=(("train", 8), ("val", 4)), classes=tuple(COLOURS), size=(40, 48),
                    seed: int = 0) -> Path:
    """`root/<split>/<class>/<i>.png`: noisy solid colours, one colour per class (separable by any encoder)."""
    rng = np.random.default_rng(seed)
    for split, n in splits:
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array(COLOURS.get(name, (128, 128, 128)))
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 30, (*size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def make_dense_data(root: Path, *, splits=(("train", 6), ("test", 3)), size=(36, 48), seed: int = 0,
                    void: int = 255, sizes: dict[str, list[tuple[int, int]]] | None = None) -> Path:
    """`root/<split>/{images,masks,depth}/`: three colour bands (labels 0-2, a void corner), depth = 1 + label m.

    `sizes` gives a split's images (and targets) their own sizes, cycled; other splits are all `size`.
    """
    rng = np.random.default_rng(seed)
    colours = np.array(list(COLOURS.values()))
    for split, n in splits:
        for sub in ("images", "masks", "depth"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        split_sizes = (sizes or {}).get(split, [size])
        for i in range(n):
            height, width = split_sizes[i % len(split_sizes)]
            labels = (np.arange(width)[None, :].repeat(height, 0) * 3 // width).astype(np.uint8)
            labels = np.roll(labels, int(rng.integers(0, width)), axis=1)
            image = np.clip(colours[labels] + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
            depth_mm = ((1.0 + labels) * 1000).astype(np.uint16)
            labels[:4, :4] = void
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.jpg")
            Image.fromarray(labels).save(root / split / "masks" / f"{i:03d}.png")
            Image.fromarray(depth_mm).save(root / split / "depth" / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    """Probes run many tiny ops: on a busy 2-core machine, two threads spin on each other (10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def class_data(tmp_path) -> Path:
    return make_class_data(tmp_path / "cls")


@pytest.fixture
def dense_data(tmp_path) -> Path:
    return make_dense_data(tmp_path / "dense")


@pytest.fixture
def mixed_dense_data(tmp_path) -> Path:
    """Dense data whose images and targets differ in size within each split (as in ADE20K)."""
    sizes = {"train": [(36, 48), (40, 32)], "test": [(36, 48), (20, 30), (64, 16), (36, 48), (9, 70)]}
    return make_dense_data(tmp_path / "mixed", splits=(("train", 6), ("test", 5)), sizes=sizes)


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory) -> dict[str, Path]:
    """Seeded random weights of timm's test_vit / test_vit2 as local files, for `timm:test_vit=PATH` specs."""
    import timm
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("weights")
    out = {}
    for seed, name in enumerate(("test_vit", "test_vit2")):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=0)
        out[name] = root / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out[name])
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, pytestconfig) -> Path:
    """A real `unic export` folder (test_vit student at 64 px, heads kept for teacher tiny_a).

    The checkpoint comes from the shared hand-made checkpoint builder in tests/conftest.py (found through the
    plugin manager, since a session fixture cannot use the function-scoped `make_unic_checkpoint`).
    """
    from unic_cli.export import export_student

    build = next(getattr(p, "_handmade_unic_checkpoint") for p in pytestconfig.pluginmanager.get_plugins()
                 if hasattr(p, "_handmade_unic_checkpoint"))
    root = tmp_path_factory.mktemp("student")
    checkpoint = build(root / "run" / "checkpoints" / "last.pt")
    return export_student(checkpoint, root / "student", keep_heads=("tiny_a",))


TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 48, "patch_size": 16, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """`open_clip:unic-tiny-clip=WEIGHTS`: a registered 48-d OpenCLIP config with seeded random weights on disk."""
    import json

    import open_clip
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("clip")
    (root / "unic-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(root / "unic-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("unic-tiny-clip", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "tiny_clip.safetensors")
    return f"open_clip:unic-tiny-clip={root / 'tiny_clip.safetensors'}"
