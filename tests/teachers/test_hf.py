"""HF adapter: tiny random transformers models saved with save_pretrained, loaded as `hf:/folder`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.teachers.conftest import MEAN, STD
from unic_cli.errors import UnknownTeacherError, WeightsError
from unic_cli.teachers import load_teacher, resolve_card


def _images(size=64, batch=2):
    return torch.randint(0, 256, (batch, 3, size, size), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def test_resolve_card__hf_folder_reads_config_and_preprocessor(hf_dirs):
    card = resolve_card(f"hf:{hf_dirs['dinov2_reg']}")
    assert (card.source, card.image_size, card.patch_size, card.patch_dim) == ("hf", 56, 14, 32)
    assert card.num_register_tokens == 4 and card.summary_from == "cls"
    assert card.mean == pytest.approx(MEAN) and card.std == pytest.approx(STD)


@pytest.mark.parametrize(("name", "num_prefix"), [("dinov2", 1), ("dinov2_reg", 5), ("clip", 1), ("siglip", 0)])
def test_hf_teacher__registers_dropped_on_the_student_grid(hf_dirs, name, num_prefix):
    # a patch-14 teacher under a patch-16 student at 64 px: grid 4x4, the teacher sees 56 px
    teacher = load_teacher(f"hf:{hf_dirs[name]}", grid=(4, 4), pretrained=True)
    images = _images(64)
    tokens = teacher(images)
    assert teacher.input_size == (56, 56) and tokens.patch_BND.shape == (2, 16, 32)
    x = torch.nn.functional.interpolate(images.float() / 255, size=(56, 56), mode="bicubic", align_corners=False,
                                        antialias=True)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = teacher.backbone.vision(pixel_values=(x - mean) / std)
    hidden = out.last_hidden_state
    if name == "clip":  # HF leaves CLIP's post_layernorm off the tokens; unic applies it to all of them
        hidden = teacher.backbone.vision.post_layernorm(hidden)
        torch.testing.assert_close(tokens.summary_BD, out.pooler_output)
    assert hidden.shape[1] == num_prefix + 16
    torch.testing.assert_close(tokens.patch_BND, hidden[:, num_prefix:])
    if name == "siglip":  # no class token: the summary is the attention-pool head
        torch.testing.assert_close(tokens.summary_BD, out.pooler_output)
    elif name != "clip":
        torch.testing.assert_close(tokens.summary_BD, hidden[:, 0])


def test_hf_teacher__interpolates_positions_off_the_native_grid(hf_dirs):
    teacher = load_teacher(f"hf:{hf_dirs['clip']}", grid=(6, 6), pretrained=True)  # 84 px, native 56
    assert teacher(_images(96)).patch_BND.shape == (2, 36, 32)


def test_load_teacher__hf_local_weights_file_with_config_next_to_it(hf_dirs, tmp_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(hf_dirs["dinov2"])
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "config.json").write_text((hf_dirs["dinov2"] / "config.json").read_text())
    torch.save({"state_dict": model.state_dict()}, folder / "weights.pth")
    a = load_teacher(f"hf:{hf_dirs['dinov2']}", grid=(4, 4))
    b = load_teacher(f"hf:{hf_dirs['dinov2']}={folder / 'weights.pth'}", grid=(4, 4))
    images = _images(64)
    torch.testing.assert_close(a(images).patch_BND, b(images).patch_BND)


def test_load_teacher__hf_mismatched_weights_name_the_keys(hf_dirs, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsError, match=r"(?s)missing \d+ key\(s\).*unexpected 1 key\(s\): encoder.layer.0.weight"):
        load_teacher(f"hf:{hf_dirs['dinov2']}={path}")


def test_load_teacher__hf_offline_hub_names_the_repo_and_the_fix():
    with pytest.raises(WeightsError) as err:
        load_teacher("dinov2_s_hf")
    assert "hf:facebook/dinov2-small" in str(err.value) and "'dinov2_s_hf=/path/to/weights'" in str(err.value)


def test_resolve_card__remote_code_stays_off_unless_asked(tmp_path):
    config = {"model_type": "unic-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                         "AutoModel": "modeling_custom.CustomModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_custom.py").write_text("raise RuntimeError('remote code ran')\n")
    with pytest.raises(UnknownTeacherError, match=r"\?trust_remote_code=true"):
        resolve_card(f"hf:{tmp_path}")


def test_load_teacher__hf_folder_with_missing_weights_is_refused(hf_dirs, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "partial"
    shutil.copytree(hf_dirs["dinov2"], folder)
    state = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layer.1." not in k}, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"missing \d+ key\(s\).*layer\.1\."):
        load_teacher(f"hf:{folder}")
