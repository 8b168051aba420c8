"""Registry: card loading, validation, spec parsing, close-name suggestions."""

from __future__ import annotations

import pytest

from unic_cli import registry
from unic_cli.errors import RegistryError, UnknownTeacherError
from unic_cli.registry import TeacherCard, get_card, load_card, parse_teacher_spec


def _write(tmp_path, name, text):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


VALID = """
source = "timm"
model_id = "vit_small_patch16_224"
image_size = 224
patch_size = 16
summary_dim = 384
patch_dim = 384
mean = [0.5, 0.5, 0.5]
std = [0.5, 0.5, 0.5]
license = "apache-2.0"
"""


def test_load_card__valid_card_gets_its_alias_from_the_file(tmp_path):
    card = load_card(_write(tmp_path, "my_vit", VALID))
    assert card.alias == "my_vit" and card.tokens == ("summary", "patch") and card.native_grid == (14, 14)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('colour = "red"\n', "unknown field(s) 'colour'"),
        ('paatch_size = 16\n', "did you mean 'patch_size'?"),
        ('family = "mlp"\n', "family must be one of"),
        ('tokens = ["cls"]\n', "tokens must be a non-empty list"),
        ('num_register_tokens = "4"\n', "num_register_tokens must be int"),
    ],
)
def test_load_card__rejects_bad_fields_naming_file_and_field(tmp_path, extra, message):
    path = _write(tmp_path, "bad", VALID + extra)
    with pytest.raises(RegistryError) as err:
        load_card(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_load_card__rejects_inconsistent_sizes(tmp_path):
    path = _write(tmp_path, "bad", VALID.replace("image_size = 224", "image_size = 225"))
    with pytest.raises(RegistryError, match="not a multiple of patch_size"):
        load_card(path)


def test_load_card__missing_required_field(tmp_path):
    path = _write(tmp_path, "bad", VALID.replace('license = "apache-2.0"\n', ""))
    with pytest.raises(RegistryError, match=r"missing required field\(s\) \['license'\]"):
        load_card(path)


def test_get_card__unknown_alias_suggests_close_names():
    with pytest.raises(UnknownTeacherError, match="Did you mean 'dinov2_g'"):
        get_card("dinov2_gg")


def test_add_registry_dir__user_cards_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_user_dirs", [])
    registry.all_cards.cache_clear()
    _write(tmp_path, "my_vit", VALID)
    registry.add_registry_dir(tmp_path)
    try:
        assert get_card("my_vit").model_id == "vit_small_patch16_224"
    finally:
        registry.all_cards.cache_clear()


@pytest.mark.parametrize(
    ("text", "source", "target", "weights", "overrides"),
    [
        ("dinov2_g", "alias", "dinov2_g", None, {}),
        ("dinov2_g=/w/dino.safetensors", "alias", "dinov2_g", "/w/dino.safetensors", {}),
        ("timm:vit_base_patch16_224.augreg_in21k", "timm", "vit_base_patch16_224.augreg_in21k", None, {}),
        ("hf:facebook/dinov2-small", "hf", "facebook/dinov2-small", None, {}),
        ("open_clip:ViT-B-16/openai", "open_clip", "ViT-B-16/openai", None, {}),
        ("py:pkg.mod:build?image_size=32&weights=/w.pt", "py", "pkg.mod:build", "/w.pt", {"image_size": "32"}),
    ],
)
def test_parse_teacher_spec__grammar(text, source, target, weights, overrides):
    spec = parse_teacher_spec(text)
    assert (spec.source, spec.target, spec.overrides) == (source, target, overrides)
    assert (str(spec.weights) if spec.weights else None) == weights


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("timn:vit_small", "Did you mean 'timm:'"),
        ("dinov2_g?image_sise=448", "did you mean 'image_size'"),
        ("dinov2_g=", "empty weights path"),
        ("timm:", "nothing after 'timm:'"),
    ],
)
def test_parse_teacher_spec__clear_errors(text, message):
    with pytest.raises(UnknownTeacherError, match=message):
        parse_teacher_spec(text)


def test_apply_overrides__converts_and_revalidates():
    card = registry.apply_overrides(get_card("dinov2_g"), {"image_size": "448", "tokens": "patch"}, origin="t")
    assert card.image_size == 448 and card.tokens == ("patch",)
    with pytest.raises(RegistryError, match="not a multiple"):
        registry.apply_overrides(get_card("dinov2_g"), {"image_size": "450"}, origin="t")


def test_card__dict_round_trip():
    card = get_card("metaclip_h")
    assert TeacherCard.from_dict(card.to_dict()) == card
