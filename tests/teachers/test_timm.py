"""timm adapter: tiny random timm ViTs (timm's test_vit, test_vit2) through the token contract."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.teachers.conftest import normalise
from unic_cli.errors import DataError, RegistryError, WeightsError
from unic_cli.registry import TeacherCard
from unic_cli.teachers import Teacher, load_teacher, resolve_card
from unic_cli.teachers.timm import TimmTeacher, card_from_model


def _images(size=224, batch=2, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def test_resolve_card__timm_spec_reads_timm_config():
    card = resolve_card("timm:test_vit2")
    assert (card.image_size, card.patch_size, card.patch_dim, card.num_register_tokens) == (160, 16, 64, 1)
    assert card.summary_from == "pool" and card.mean == (0.5, 0.5, 0.5) and card.license == "apache-2.0"


def test_load_teacher__contract_shapes_and_dtype():
    teacher = load_teacher("timm:test_vit", grid=(14, 14), pretrained=False)
    tokens = teacher(_images())
    assert teacher.input_size == (224, 224) and teacher.grid == (14, 14)
    assert tokens.summary_BD.shape == (2, 64) and tokens.patch_BND.shape == (2, 196, 64)
    assert tokens.patch_BND.dtype == torch.float32 and not tokens.patch_BND.requires_grad


def test_load_teacher__native_grid_when_grid_is_none():
    teacher = load_teacher("timm:test_vit", grid=None, pretrained=False)
    assert teacher.input_size == (160, 160) and teacher(_images(96)).patch_BND.shape == (2, 100, 64)


def test_timm_teacher__register_removed_and_pooled_summary():
    torch.manual_seed(0)
    teacher = load_teacher("timm:test_vit2", grid=(10, 10), pretrained=False)  # 1 register, no class token
    images = _images(160)
    tokens = teacher(images)
    model = teacher.backbone.model
    with torch.no_grad():
        feats = model.forward_features(normalise(images, (0.5,) * 3, (0.5,) * 3))
        pooled = model.forward_head(feats, pre_logits=True)
    assert model.num_prefix_tokens == 1 and feats.shape[1] == 101
    # test_vit2 normalises after pooling (fc_norm), so the patch tokens get the same fc_norm
    torch.testing.assert_close(tokens.patch_BND, model.fc_norm(feats[:, 1:]))
    torch.testing.assert_close(tokens.summary_BD, pooled)


def test_timm_teacher__patch14_with_registers_on_a_patch16_student_grid():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=56,
                              embed_dim=32, depth=1, num_heads=2)
    card = card_from_model(model, alias="tiny_dinov2_reg4", model_id="vit_small_patch14_reg4_dinov2",
                           pretrained_tag=None)
    assert card.num_register_tokens == 4 and card.patch_size == 14
    teacher = Teacher(card, TimmTeacher(card, model), grid=(4, 4))  # a patch-16 student at 64 px
    images = _images(64)
    tokens = teacher(images)
    assert teacher.input_size == (56, 56) and tokens.patch_BND.shape == (2, 16, 32)
    resized = torch.nn.functional.interpolate(images.float() / 255, size=(56, 56), mode="bicubic",
                                              align_corners=False, antialias=True)
    mean, std = torch.tensor(card.mean).view(1, 3, 1, 1), torch.tensor(card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = model.forward_features((resized - mean) / std)  # [cls, 4 registers, 16 patches]
    torch.testing.assert_close(tokens.patch_BND, feats[:, 5:])
    torch.testing.assert_close(tokens.summary_BD, feats[:, 0])


def test_timm_teacher__card_register_count_is_checked_against_the_model():
    card = resolve_card("timm:test_vit")
    wrong = TeacherCard.from_dict({**card.to_dict(), "num_register_tokens": 4})
    import timm

    with pytest.raises(RegistryError, match="num_register_tokens is 4, the model has 0"):
        TimmTeacher(wrong, timm.create_model("test_vit", num_classes=0))


def test_teacher__applies_its_own_normalisation():
    torch.manual_seed(0)
    images = _images(160)
    a = load_teacher("timm:test_vit?mean=0.2,0.3,0.4&std=0.5,0.6,0.7", grid=(10, 10), pretrained=False)
    with torch.no_grad():
        expected = a.backbone.model.forward_features(normalise(images))[:, 1:]
    torch.testing.assert_close(a(images).patch_BND, expected)
    b = Teacher(resolve_card("timm:test_vit"), a.backbone, grid=(10, 10))  # same weights, mean = std = 0.5
    assert not torch.allclose(b(images).patch_BND, expected)


def test_teacher__uint8_and_float_inputs_agree():
    teacher = load_teacher("timm:test_vit", grid=(10, 10), pretrained=False)
    images = _images(160)
    torch.testing.assert_close(teacher(images).patch_BND, teacher(images.float() / 255).patch_BND)


@pytest.mark.parametrize("layout", ["safetensors", "nested_torch"])
def test_load_teacher__local_weights_give_the_saved_model(tmp_path, layout):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("test_vit")  # with its classifier, as a training script saves it
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(source.state_dict(), path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    teacher = load_teacher(f"timm:test_vit={path}", grid=(10, 10))
    images = _images(160)
    source.reset_classifier(0)
    with torch.no_grad():
        expected = source.eval().forward_features(normalise(images, (0.5,) * 3, (0.5,) * 3))
    torch.testing.assert_close(teacher(images).summary_BD, expected[:, 0])


def test_load_teacher__mismatched_weights_name_the_keys(tmp_path):
    import timm

    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_vit2").state_dict(), path)
    with pytest.raises(WeightsError, match=r"(?s)do not match.*(missing|unexpected).*(cls_token|reg_token)"):
        load_teacher(f"timm:test_vit={path}")


def test_load_teacher__offline_hub_names_the_id_and_the_local_weights_fix():
    with pytest.raises(WeightsError) as err:
        load_teacher("timm:test_vit", pretrained=True)
    assert "timm/test_vit.r160_in1k" in str(err.value) and "'timm:test_vit=/path/to/weights'" in str(err.value)


_UNREACHABLE_HUB_SCRIPT = """
import time
import torch
from unic_cli.errors import WeightsError
from unic_cli.teachers import load_teacher
start = time.monotonic()
teacher = load_teacher("timm:test_vit.r160_in1k", grid=None, pretrained=True)
print("cached", teacher.backbone.model.cls_token.flatten()[0].item(), time.monotonic() - start)
start = time.monotonic()
try:
    load_teacher("timm:test_vit2.r160_in1k", grid=None, pretrained=True)
except WeightsError as err:
    print("missing", time.monotonic() - start, str(err).splitlines()[-1])
"""


def test_load_teacher__unreachable_hub_uses_the_cache_at_once(tmp_path):
    """Without HF_HUB_OFFLINE, a hub that does not answer costs no retries: cached weights load, others fail fast."""
    import os
    import subprocess
    import sys

    import timm

    snapshot = tmp_path / "models--timm--test_vit.r160_in1k" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--test_vit.r160_in1k" / "refs" / "main").write_text("a" * 40)
    state = timm.create_model("test_vit", pretrained=False).state_dict()
    state["cls_token"] = torch.full_like(state["cls_token"], 0.125)
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens on port 9
    result = subprocess.run([sys.executable, "-c", _UNREACHABLE_HUB_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    cached, missing = result.stdout.splitlines()
    assert cached.split()[1] == "0.125" and float(cached.split()[2]) < 20  # before: about a minute of retries
    assert float(missing.split()[1]) < 20 and "did not answer" in missing
    assert "Retrying" not in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teacher__bf16_tokens_on_cuda():
    teacher = load_teacher("timm:test_vit", grid=(14, 14), pretrained=False, device="cuda")
    tokens = teacher(_images().cuda())
    assert tokens.patch_BND.dtype == torch.bfloat16 and tokens.summary_BD.dtype == torch.bfloat16


@pytest.mark.parametrize(("spec", "message"), [("timm:vit_smal_patch16_224", "Did you mean 'vit_small_patch16_224'"),
                                               ("timm:test_vit.nope", "tags: r160_in1k")])
def test_resolve_card__unknown_timm_names_suggest(spec, message):
    from unic_cli.errors import UnknownTeacherError

    with pytest.raises(UnknownTeacherError, match=message):
        resolve_card(spec)


def test_load_teacher__native_resolution_feeds_image_size_and_averages_the_map_onto_the_grid():
    torch.manual_seed(0)
    teacher = load_teacher("timm:test_vit?resolution=native", grid=(4, 4), pretrained=False)
    assert teacher.input_size == (160, 160)  # not 4 x 16 = 64 px
    images = _images(64)
    tokens = teacher(images)
    native = Teacher(teacher.card, teacher.backbone, grid=None)(images).patch_BND  # the 10x10 map at 160 px
    assert tokens.patch_BND.shape == (2, 16, 64) and native.shape == (2, 100, 64)
    fmap = native.transpose(1, 2).reshape(2, 64, 10, 10)
    shrunk = torch.nn.functional.interpolate(fmap, size=(4, 4), mode="bilinear", antialias=True)
    torch.testing.assert_close(tokens.patch_BND, shrunk.flatten(2).transpose(1, 2))


def test_resolve_card__resolution_must_be_student_or_native():
    with pytest.raises(RegistryError, match=r"resolution must be one of \['student', 'native'\], got 'full'"):
        resolve_card("timm:test_vit?resolution=full")


def test_teacher__refuses_a_non_rgb_batch_with_its_shape():
    teacher = load_teacher("timm:test_vit", grid=(4, 4), pretrained=False)
    with pytest.raises(DataError, match=r"takes RGB images \[B, 3, H, W\], got a tensor of shape \[2, 1, 64, 64\]"):
        teacher(torch.zeros(2, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(DataError, match=r"shape \[3, 64, 64\]"):
        teacher(torch.zeros(3, 64, 64, dtype=torch.uint8))
