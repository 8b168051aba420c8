"""timm models that are not plain ViTs or ConvNets: Swin (NHWC, hierarchical), hybrid stems, XCiT, CaiT, and the
models unic refuses (LeViT, PiT, Mixer, CrossViT) with one message. Tiny configs built from timm's own classes."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from unic_cli import registry
from unic_cli.cli import unic
from unic_cli.errors import RegistryError, UnknownTeacherError
from unic_cli.teachers import Teacher, TeacherTokens, resolve_card, token_shape_problem
from unic_cli.teachers.timm import TimmTeacher, card_from_model


def _images(size, batch=2, seed=0):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _card(model, name, image_size):
    """The card unic derives for a tiny model built at `image_size` (timm's pretrained cfg says 224)."""
    cfg = {**model.pretrained_cfg, "input_size": (3, image_size, image_size)}
    return card_from_model(model, alias=f"tiny_{name}", model_id=name, pretrained_tag=None, pretrained_cfg=cfg)


def _normalised(teacher, images):
    x = F.interpolate(images.float() / 255, size=teacher.input_size, mode="bicubic", align_corners=False,
                      antialias=True)
    return (x - teacher.mean_C) / teacher.std_C


def test_resolve_card__swin_is_a_feature_map_teacher_at_its_final_stride():
    card = resolve_card("timm:swin_tiny_patch4_window7_224")  # built on the meta device
    assert (card.family, card.patch_size, card.image_size, card.native_grid) == ("convnet", 32, 224, (7, 7))
    assert (card.patch_dim, card.summary_dim, card.summary_from) == (768, 768, "pool")
    assert card.input_size_for((14, 14)) == (224, 224)  # fed its native size, not 14 * 4 = 56 px


def test_timm_teacher__swin_nhwc_map_is_permuted_and_resized_to_the_student_grid():
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64,
                              embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
    card = _card(model, "swin_tiny_patch4_window7_224", 64)
    assert (card.family, card.patch_size, card.patch_dim) == ("convnet", 8, 32)
    teacher = Teacher(card, TimmTeacher(card, model), grid=(4, 4))
    images = _images(64)
    tokens = teacher(images)
    with torch.no_grad():
        feats_BhwD = model.forward_features(_normalised(teacher, images))
        pooled = model.forward_head(feats_BhwD, pre_logits=True)
    assert feats_BhwD.shape == (2, 8, 8, 32)  # NHWC
    expected = F.interpolate(feats_BhwD.permute(0, 3, 1, 2), size=(4, 4), mode="bilinear", align_corners=False,
                             antialias=True)  # shrinking 8x8 -> 4x4 averages, not samples
    assert tokens.patch_BND.shape == (2, 16, 32)
    torch.testing.assert_close(tokens.patch_BND, expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens.summary_BD, pooled)


def test_timm_teacher__hybrid_stem_counts_its_total_stride():
    card = resolve_card("timm:vit_tiny_r_s16_p8_224")  # ResNet stem (stride 16) + 2x2 patches: stride 32
    assert (card.family, card.patch_size, card.num_register_tokens) == ("vit", 32, 0)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, num_classes=0, depth=1)
    card = _card(model, "vit_tiny_r_s16_p8_224", 224)
    teacher = Teacher(card, TimmTeacher(card, model), grid=(2, 2))
    images = _images(64)
    tokens = teacher(images)
    assert teacher.input_size == (64, 64) and tokens.patch_BND.shape == (2, 4, 192)
    with torch.no_grad():
        feats = model.forward_features(_normalised(teacher, images))
    torch.testing.assert_close(tokens.patch_BND, feats[:, 1:])
    torch.testing.assert_close(tokens.summary_BD, feats[:, 0])


def test_timm_teacher__xcit_int_patch_size_on_another_grid():
    assert resolve_card("timm:xcit_nano_12_p16_224").patch_size == 16  # XCiT stores an int, not a tuple
    torch.manual_seed(0)
    model = timm.create_model("xcit_nano_12_p16_224", pretrained=False, num_classes=0, depth=1, embed_dim=32,
                              num_heads=2, cls_attn_layers=1)
    card = _card(model, "xcit_nano_12_p16_224", 224)
    teacher = Teacher(card, TimmTeacher(card, model), grid=(3, 3))
    images = _images(48)
    tokens = teacher(images)
    with torch.no_grad():
        feats = model.forward_features(_normalised(teacher, images))
    assert feats.shape == (2, 10, 32)
    torch.testing.assert_close(tokens.patch_BND, feats[:, 1:])


def test_timm_teacher__fixed_size_vit_is_refused_under_another_grid():
    torch.manual_seed(0)
    model = timm.create_model("cait_xxs24_224", pretrained=False, num_classes=0, img_size=32, embed_dim=32, depth=1,
                              num_heads=2, depth_token_only=1)
    card = _card(model, "cait_xxs24_224", 32)
    assert Teacher(card, TimmTeacher(card, model), grid=(2, 2))(_images(32)).patch_BND.shape == (2, 4, 32)
    with pytest.raises(UnknownTeacherError, match=r"only takes 32x32 px \(a 2x2 grid\).*needs 48x48 px.*py:MODULE"):
        Teacher(card, TimmTeacher(card, model), grid=(3, 3))


@pytest.mark.parametrize(("name", "why"), [("levit_128s", "token sequence"), ("pit_ti_224", "token sequence"),
                                           ("mixer_s32_224", "token sequence"),
                                           ("crossvit_tiny_240", "returns a list")])
def test_resolve_card__pooled_or_multi_branch_models_are_refused_with_one_message(name, why):
    with pytest.raises(UnknownTeacherError) as err:
        resolve_card(f"timm:{name}")
    message = str(err.value)
    assert f"timm model {name!r} cannot be used as a teacher" in message and why in message
    assert "py:MODULE:CALLABLE" in message and "num_register_tokens" not in message


def test_timm_teacher__a_user_card_for_a_pooling_model_fails_at_the_first_forward():
    model = timm.create_model("levit_128s", pretrained=False, num_classes=0)
    card = registry.TeacherCard(alias="my_levit", source="timm", model_id="levit_128s", family="convnet",
                                image_size=224, patch_size=64, summary_dim=384, patch_dim=384, summary_from="pool",
                                mean=(0.5,) * 3, std=(0.5,) * 3, license="apache-2.0")
    teacher = Teacher(card, TimmTeacher(card, model), grid=(2, 2))  # the card matches the model's widths
    with pytest.raises(UnknownTeacherError, match=r"token sequence \[1, 16, 384\]"):
        teacher(_images(224, batch=1))


def test_token_shape_problem__names_returned_and_promised_shapes():
    card = resolve_card("timm:test_vit")
    good = TeacherTokens(torch.zeros(2, 64), torch.zeros(2, 4, 64))
    shapes = {"summary": list(good.summary_BD.shape), "patch": list(good.patch_BND.shape)}
    assert token_shape_problem(card, (2, 2), shapes, 2) is None
    problem = token_shape_problem(card, (2, 2), {"summary": [2, 64], "patch": [2, 4, 2]}, 2)
    assert "patch [2, 4, 2]" in problem and "promises summary [2, 64], patch [2, 4, 64]" in problem


def _run(*args):
    result = CliRunner().invoke(unic, list(args))
    return result, result.output


def test_cli__show_gives_swin_its_native_input_and_feature_grid():
    result, out = _run("teachers", "show", "timm:swin_tiny_patch4_window7_224", "--json")
    assert result.exit_code == 0, out
    resolved = json.loads(result.stdout)["resolved"]
    assert resolved["teacher_input_size"] == [224, 224] and resolved["teacher_feature_grid"] == [7, 7]


def test_cli__check_refuses_a_pooling_model_with_exit_2_and_no_traceback():
    result, out = _run("teachers", "check", "timm:levit_128s", "--random-init")
    assert result.exit_code == 2 and "Traceback" not in out and " ok:" not in out
    assert "'levit_128s' cannot be used as a teacher" in out and isinstance(result.exception, SystemExit)


def test_check_teacher__shapes_are_compared_with_the_card():
    from unic_cli.teachers import check_teacher

    report = check_teacher("timm:test_vit", grid=(2, 2), pretrained=False)
    assert report["tokens"] == {"summary": [2, 64], "patch": [2, 4, 64]}
    with pytest.raises(RegistryError, match="patch_dim is 32"):  # the adapter refuses a card that lies first
        check_teacher("timm:test_vit?patch_dim=32", grid=(2, 2), pretrained=False)


def test_teacher__native_grid_of_a_patchify_convnet_is_what_the_backbone_produces():
    # A ConvNeXt stem floors (60 px: 15 -> 7 -> 3 -> 1), so the card's ceil(60 / 32) = 2 is only an estimate; in
    # native mode (the probe's) the tokens must be the real 1x1 map, not that map stretched onto a 2x2 grid.
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    card = _card(model, "test_convnext", 60)
    assert (card.family, card.patch_size, card.native_grid) == ("convnet", 32, (2, 2))
    teacher = Teacher(card, TimmTeacher(card, model), grid=None)
    tokens = teacher(_images(60))
    assert tokens.patch_BND.shape == (2, 1, 64) and teacher.grid == (1, 1)
