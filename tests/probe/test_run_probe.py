"""run_probe end to end on generated data: every task, several models in one call, the cache, --run."""

from __future__ import annotations

import json

import pytest

from unic_cli.config import ProbeConfig
from unic_cli.errors import ProbeError
from unic_cli.probe import run_probe

FAST = {"num_workers": 0, "batch_size": 8, "linear_steps": 40, "dense_steps": 20, "dense_batch_size": 4,
        "dense_image_size": 32, "depth_bins": 8}


def _teachers(weights) -> tuple[str, str]:
    return f"timm:test_vit?image_size=48&weights={weights['test_vit']}", f"timm:test_vit2={weights['test_vit2']}"


def test_run_probe__student_and_two_teachers_share_one_report(tmp_path, class_data, student_dir, teacher_weights,
                                                               caplog):
    models = (str(student_dir), *_teachers(teacher_weights))
    config = ProbeConfig.from_sources(None, {**FAST, "models": models, "tasks": ("knn", "linear"),
                                             "data_dir": class_data, "out_dir": tmp_path / "out"})
    outcome = run_probe(config)
    assert list(outcome.report["results"]) == list(models)
    assert outcome.report["models"][str(student_dir)]["kind"] == "student"
    assert {outcome.report["models"][m]["kind"] for m in models[1:]} == {"teacher"}
    for model in models:
        assert set(outcome.report["results"][model]) == {"knn/cls", "linear/cls"}
        assert outcome.report["results"][model]["linear/cls"]["top1"] > 0.9  # colours: separable by any encoder
    assert {f.name for f in outcome.files} == {"probe.json", "probe.md", "probe.png"}
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert saved["tasks"]["knn/cls"]["primary"] == "top1_k20" and len(saved["rows"]) == 6

    # other probe settings reuse every cached feature: no encoder runs again
    cache = sorted((tmp_path / "out" / "cache").iterdir())
    stamps = [p.stat().st_mtime_ns for p in cache]
    caplog.set_level("INFO", logger="unic_cli")
    again = ProbeConfig.from_sources(None, {**FAST, "models": models, "tasks": ("knn",), "knn_ks": (5,),
                                            "data_dir": class_data, "out_dir": tmp_path / "out"})
    merged = run_probe(again).merged
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "out" / "cache").iterdir())] == stamps
    assert caplog.text.count("from the cache") == 6
    assert "top1_k5" in merged["results"][models[0]]["knn/cls"] and "linear/cls" in merged["results"][models[0]]


def test_run_probe__seg_then_depth_merge_into_the_run(tmp_path, dense_data, teacher_weights):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    model = _teachers(teacher_weights)[0]
    for task in ("seg", "depth"):
        config = ProbeConfig.from_sources(None, {**FAST, "models": (model,), "tasks": (task,), "data_dir": dense_data,
                                                 "run_dir": run_dir})
        outcome = run_probe(config)
    assert config.resolved_out_dir == run_dir / "probe" and (run_dir / "probe" / "probe.png").is_file()
    saved = json.loads((run_dir / "probe.json").read_text())
    seg, depth = saved["results"][model]["seg/dense"], saved["results"][model]["depth/dense"]
    assert seg["num_classes"] == 3 and 0 <= seg["miou"] <= 1 and 0 <= seg["pixel_acc"] <= 1
    assert depth["rmse"] > 0 and 0 <= depth["delta1"] <= 1 and saved["tasks"]["seg/dense"]["split"] == "test"
    assert outcome.report["tasks"]["depth/dense"]["primary"] == "rmse"


def test_encoder__dense_levels_of_a_vit_and_a_convnet(teacher_weights, student_dir):
    import torch

    from unic_cli.probe.features import load_encoder, resolve_model

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    vit = load_encoder(resolve_model(_teachers(teacher_weights)[0], image_size=64))
    one, grid = vit.dense_tokens(images, 1)
    two, grid2 = vit.dense_tokens(images, 2)
    assert grid == grid2 == (4, 4) and one.shape == (2, 16, 64) and two.shape == (2, 16, 128)
    torch.testing.assert_close(two[..., 64:], one)  # the last level is the output tokens; the other comes first
    student = load_encoder(resolve_model(str(student_dir), image_size=64))
    assert student.dense_tokens(images, 3)[0].shape == (2, 16, 3 * 64)  # exported students are timm ViTs too
    # a ConvNet: the last 3 stages (stride 8, 16, 32) pooled/upsampled onto the stride-16 grid of a 128-px input
    torch.manual_seed(0)
    convnet = load_encoder(resolve_model("timm:test_efficientnet", image_size=128, pretrained=False))
    model = convnet.module.backbone.model
    widths = [info["num_chs"] for info in model.feature_info][-3:]
    tokens, grid = convnet.dense_tokens(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8), 3)
    assert grid == (8, 8) and tokens.shape == (2, 64, sum(widths))


def test_run_probe__dense_layers_refuses_non_timm_models_before_loading(tmp_path, dense_data, tiny_clip):
    config = ProbeConfig.from_sources(None, {**FAST, "models": (tiny_clip,), "tasks": ("seg",),
                                             "data_dir": dense_data, "dense_layers": 2, "out_dir": tmp_path / "o"})
    with pytest.raises(ProbeError, match="--dense-layers 1"):
        run_probe(config)
    assert not (tmp_path / "o").exists()


def test_run_probe__zeroshot_needs_a_clip_head(tmp_path, class_data, student_dir, teacher_weights):
    config = ProbeConfig.from_sources(None, {**FAST, "models": (str(student_dir), _teachers(teacher_weights)[0]),
                                             "tasks": ("zeroshot",), "data_dir": class_data,
                                             "out_dir": tmp_path / "out"})
    with pytest.raises(ProbeError) as err:
        run_probe(config)
    assert "has no CLIP head" in str(err.value) and "--keep-heads" in str(err.value)
    assert "is not a CLIP model" in str(err.value) and not (tmp_path / "out").exists()


def test_probe_package__imports_no_training_code_and_no_ui():
    import subprocess
    import sys

    code = ("import sys, unic_cli.probe; bad = [m for m in ('unic_cli.distill', 'unic_cli.ladder', "
            "'unic_cli.checkpoint', 'click', 'rich') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
