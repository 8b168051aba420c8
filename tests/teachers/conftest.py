"""Tiny real models for the teacher tests: HF models saved with save_pretrained, a tiny OpenCLIP config."""

from __future__ import annotations

import json

import pytest
import torch

MEAN = (0.2, 0.3, 0.4)  # deliberately not ImageNet's: tests check that each teacher applies its own
STD = (0.5, 0.6, 0.7)


def normalise(images_BCHW: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """What a teacher must do to uint8 pixels at its input size, written out by hand."""
    x = images_BCHW.float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict:
    """Tiny random HF models (DINOv2, DINOv2 with 4 registers, CLIP and SigLIP vision) saved to folders."""
    from transformers import (
        BitImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14,
                 image_size=56)
    models = {
        "dinov2": Dinov2Model(Dinov2Config(**small)),
        "dinov2_reg": Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **small)),
        "clip": CLIPVisionModel(CLIPVisionConfig(**small)),
        "siglip": SiglipVisionModel(SiglipVisionConfig(**small)),
    }
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, model in models.items():
        folder = root / name
        model.save_pretrained(folder)
        BitImageProcessor(image_mean=list(MEAN), image_std=list(STD)).save_pretrained(folder)
        dirs[name] = folder
    return dirs


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> dict:
    """Tiny OpenCLIP architectures registered with open_clip: a native ViT (patch 14, 56 px, 32-d) and a
    SigLIP-like timm trunk (timm's test_vit2: one register, no class token, attention-pool head)."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_configs")
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    configs = {
        "unic-test-ViT-14": {
            "embed_dim": 24,
            "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": text,
        },
        "unic-test-SigLIP": {
            "embed_dim": 64,
            "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit2", "timm_model_pretrained": False,
                           "timm_pool": "map", "timm_proj": "none"},
            "text_cfg": {**text, "width": 64},
        },
    }
    for name, config in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return {"vit": "unic-test-ViT-14", "siglip": "unic-test-SigLIP"}
