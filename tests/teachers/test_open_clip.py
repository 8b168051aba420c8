"""open_clip adapter: tiny OpenCLIP models (a native ViT and a SigLIP-like timm trunk) through the contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from unic_cli.errors import WeightsError
from unic_cli.teachers import load_teacher, resolve_card
from unic_cli.teachers.open_clip import OPENAI_MEAN, OPENAI_STD


def _images(size, batch=2):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def _normalise(images, mean=OPENAI_MEAN, std=OPENAI_STD):
    return (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_resolve_card__open_clip_spec_reads_the_trunk_not_the_joint_space(tiny_open_clip):
    card = resolve_card(f"open_clip:{tiny_open_clip['vit']}")
    assert (card.image_size, card.patch_size, card.patch_dim, card.summary_from) == (56, 14, 32, "cls")
    assert card.mean == pytest.approx(OPENAI_MEAN)


def test_open_clip_teacher__summary_projects_to_encode_image(tiny_open_clip):
    torch.manual_seed(0)
    teacher = load_teacher(f"open_clip:{tiny_open_clip['vit']}", grid=(4, 4), pretrained=False)
    images = _images(56)
    tokens = teacher(images)
    assert tokens.summary_BD.shape == (2, 32) and tokens.patch_BND.shape == (2, 16, 32)
    clip = teacher.backbone._clip[0]
    with torch.no_grad():
        expected = F.normalize(clip.encode_image(_normalise(images)), dim=-1)
        clip.visual.output_tokens = True
        _, patch = clip.visual(_normalise(images))  # open_clip's own ln_post'ed patch tokens
        clip.visual.output_tokens = False
    torch.testing.assert_close(teacher.backbone.summary_to_embedding(tokens.summary_BD), expected)
    torch.testing.assert_close(tokens.patch_BND, patch)


def test_open_clip_teacher__positions_resampled_for_a_patch16_student(tiny_open_clip):
    teacher = load_teacher(f"open_clip:{tiny_open_clip['vit']}", grid=(3, 3), pretrained=False)
    assert teacher.input_size == (42, 42) and teacher(_images(48)).patch_BND.shape == (2, 9, 32)


def test_open_clip_teacher__encode_text_is_normalised_joint_space(tiny_open_clip):
    teacher = load_teacher(f"open_clip:{tiny_open_clip['vit']}", grid=(4, 4), pretrained=False)
    text_BE = teacher.backbone.encode_text(["a photo of a cat", "a photo of a dog"])
    assert text_BE.shape == (2, 24) and torch.allclose(text_BE.norm(dim=-1), torch.ones(2))
    assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in teacher.backbone.visual.parameters())


def test_open_clip_teacher__timm_trunk_summary_is_the_attention_pool(tiny_open_clip):
    torch.manual_seed(0)
    teacher = load_teacher(f"open_clip:{tiny_open_clip['siglip']}", grid=(10, 10), pretrained=False)
    assert teacher.card.summary_from == "pool" and teacher.card.num_register_tokens == 1
    images = _images(160)
    tokens = teacher(images)
    assert tokens.patch_BND.shape == (2, 100, 64)
    clip = teacher.backbone._clip[0]
    with torch.no_grad():
        expected = F.normalize(clip.encode_image(_normalise(images)), dim=-1)
    torch.testing.assert_close(teacher.backbone.summary_to_embedding(tokens.summary_BD), expected)


def test_load_teacher__open_clip_local_weights_full_and_visual_only(tiny_open_clip, tmp_path):
    import open_clip

    torch.manual_seed(3)
    source = open_clip.create_model(tiny_open_clip["vit"])
    save_file(source.state_dict(), tmp_path / "full.safetensors")
    save_file(source.visual.state_dict(), tmp_path / "visual.safetensors")
    images = _images(56)
    with torch.no_grad():
        expected = F.normalize(source.eval().encode_image(_normalise(images)), dim=-1)
    for name in ("full", "visual"):
        teacher = load_teacher(f"open_clip:{tiny_open_clip['vit']}={tmp_path / name}.safetensors", grid=(4, 4))
        embed = teacher.backbone.summary_to_embedding(teacher(images).summary_BD)
        torch.testing.assert_close(embed, expected)
    with pytest.raises(WeightsError, match="visual tower only"):
        teacher.backbone.encode_text(["a cat"])


def test_load_teacher__open_clip_visual_tower_with_its_prefix_kept(tiny_open_clip, tmp_path, caplog):
    import open_clip

    torch.manual_seed(4)
    source = open_clip.create_model(tiny_open_clip["vit"])
    # the natural way to keep only the tower: filter the whole state dict, prefix and all
    path = tmp_path / "visual_prefixed.safetensors"
    save_file({k: v for k, v in source.state_dict().items() if k.startswith("visual.")}, path)
    images = _images(56)
    with torch.no_grad():
        expected = F.normalize(source.eval().encode_image(_normalise(images)), dim=-1)
    teacher = load_teacher(f"open_clip:{tiny_open_clip['vit']}={path}", grid=(4, 4))
    torch.testing.assert_close(teacher.backbone.summary_to_embedding(teacher(images).summary_BD), expected)
    assert "holds the visual tower only" in caplog.text
    with pytest.raises(WeightsError, match="visual tower only"):
        teacher.backbone.encode_text(["a cat"])


def test_load_teacher__open_clip_offline_hub_names_the_weights():
    with pytest.raises(WeightsError) as err:
        load_teacher("clip_b16")
    assert "ViT-B-16-quickgelu/openai" in str(err.value) and "'clip_b16=/path/to/weights'" in str(err.value)
