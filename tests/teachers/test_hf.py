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
    assert "hf:facebook/dinov2-small" in str(err.value) and "'dinov2_s_hf=/path/to/folder'" in str(err.value)
    assert "HF_HUB_OFFLINE=1" in str(err.value)


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


def _copy_save_pretrained_file(folder, tmp_path, name="weights.safetensors"):
    """The weights file and config.json that save_pretrained wrote, in a folder of their own, file renamed."""
    import shutil

    target = tmp_path / "from_save_pretrained"
    target.mkdir()
    shutil.copy(folder / "config.json", target / "config.json")
    shutil.copy(folder / "model.safetensors", target / name)
    return target / name


@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg", "clip"])
def test_load_teacher__hf_save_pretrained_file_with_config_next_to_it(hf_dirs, tmp_path, name):
    # transformers 5 writes DINOv2's checkpoint names (attention.attention.query) and renames them when it
    # loads (attention.q_proj): the file must go through transformers' own loading, not a raw strict load
    path = _copy_save_pretrained_file(hf_dirs[name], tmp_path)
    a = load_teacher(f"hf:{hf_dirs[name]}", grid=(4, 4))
    b = load_teacher(f"hf:{hf_dirs[name]}={path}", grid=(4, 4))
    images = _images(64)
    torch.testing.assert_close(a(images).patch_BND, b(images).patch_BND)
    torch.testing.assert_close(a(images).summary_BD, b(images).summary_BD)


def test_load_teacher__hf_save_pretrained_file_missing_a_layer_is_refused(hf_dirs, tmp_path):
    from safetensors.torch import load_file

    path = _copy_save_pretrained_file(hf_dirs["dinov2"], tmp_path)
    state = load_file(path)
    save_file({k: v for k, v in state.items() if "layer.1." not in k}, path)
    with pytest.raises(WeightsError, match=r"(?s)weights.safetensors.* missing \d+ key\(s\): encoder.layer.1"):
        load_teacher(f"hf:{hf_dirs['dinov2']}={path}")


@pytest.mark.parametrize("weights", ["folder", "file"])
def test_resolve_card__hf_hub_id_with_local_weights_reads_the_local_config(hf_dirs, tmp_path, weights):
    # offline (HF_HUB_OFFLINE=1 in tests/conftest.py): the hub id names the model, the local files describe it
    local = hf_dirs["dinov2_reg"] if weights == "folder" else _copy_save_pretrained_file(hf_dirs["dinov2_reg"],
                                                                                         tmp_path)
    card = resolve_card(f"hf:facebook/dinov2-with-registers-small={local}")
    assert (card.model_id, card.patch_size, card.patch_dim, card.num_register_tokens) == (
        "facebook/dinov2-with-registers-small", 14, 32, 4)
    if weights == "folder":  # the folder also has the preprocessor config
        assert card.mean == pytest.approx(MEAN) and card.std == pytest.approx(STD)


@pytest.mark.parametrize("weights", ["folder", "file"])
def test_load_teacher__hf_random_init_builds_from_the_local_config_offline(hf_dirs, tmp_path, weights):
    # --random-init, `unic bench` and --random-init-teachers load no weights but still need the architecture
    local = hf_dirs["dinov2"] if weights == "folder" else _copy_save_pretrained_file(hf_dirs["dinov2"], tmp_path)
    teacher = load_teacher(f"hf:facebook/dinov2-small={local}", grid=(4, 4), pretrained=False)
    assert teacher(_images(64)).patch_BND.shape == (2, 16, 32)


def test_load_teacher__hf_offline_config_error_says_config_and_asks_for_what_is_missing(hf_dirs, tmp_path):
    with pytest.raises(WeightsError) as err:
        load_teacher("hf:facebook/dinov2-small", pretrained=False)
    assert str(err.value).startswith("cannot download the config of teacher 'hf:facebook/dinov2-small'")
    bare = tmp_path / "bare.safetensors"  # a weights file without config.json beside it
    save_file({"x": torch.zeros(1)}, bare)
    with pytest.raises(WeightsError) as err:
        load_teacher(f"dinov2_s_hf={bare}", pretrained=False)
    message = str(err.value)
    assert "cannot download the config" in message and f"no config.json next to '{bare}'" in message
    assert f"dinov2_s_hf={bare}" not in message  # never suggest what the user already passed


def test_teachers_show__hf_hub_id_with_local_folder_needs_no_network(hf_dirs):
    from click.testing import CliRunner

    from unic_cli.cli import unic

    result = CliRunner().invoke(unic, ["teachers", "show", f"hf:facebook/dinov2-small={hf_dirs['dinov2']}", "--json"])
    assert result.exit_code == 0, result.output
    card = json.loads(result.stdout)["card"]
    assert (card["model_id"], card["patch_dim"], card["mean"]) == ("facebook/dinov2-small", 32, pytest.approx(MEAN))
