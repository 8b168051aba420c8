"""run_probe end to end on generated data: every task, several models in one call, the cache, --run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from unic_cli.config import ProbeConfig
from unic_cli.errors import ProbeError
from unic_cli.probe import report as rep
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


def test_run_probe__seg_then_depth_merge_into_the_run(tmp_path, dense_data, teacher_weights, make_unic_checkpoint):
    run_dir = _run_folder(tmp_path / "run", make_unic_checkpoint)
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

    from unic_cli.probe.encoder import load_encoder, resolve_model

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


def _knn(models, data, **extra) -> ProbeConfig:
    return ProbeConfig.from_sources(None, {**FAST, "models": models, "tasks": ("knn",), "data_dir": data, **extra})


def _run_folder(path, make_unic_checkpoint):
    """A `unic distill` run folder as probe checks it: config.toml plus checkpoints/ (a hand-built last.pt)."""
    make_unic_checkpoint(path / "checkpoints" / "last.pt")
    (path / "config.toml").write_text('teachers = ["timm:test_vit"]\n')
    return path


def test_run_probe__random_init_is_a_baseline_next_to_the_pretrained_model(tmp_path, class_data, teacher_weights,
                                                                          make_unic_checkpoint):
    model = _teachers(teacher_weights)[0]
    run_dir = _run_folder(tmp_path / "run", make_unic_checkpoint)
    run_probe(_knn((model,), class_data, run_dir=run_dir))
    # mark the stored real scores (on these colours, random weights score 1.0 too)
    for path in (run_dir / "probe.json", run_dir / "probe" / "probe.json"):
        saved = json.loads(path.read_text())
        saved["results"][model]["knn/cls"] = pretrained = {"top1_k10": 0.125, "top1_k20": 0.25}
        path.write_text(json.dumps(saved))
    merged = run_probe(_knn((model,), class_data, run_dir=run_dir, random_init=True, seed=3)).merged
    baseline = f"{model} (random init)"
    assert merged["results"][model]["knn/cls"] == pretrained  # the real score survives the baseline
    assert json.loads((run_dir / "probe.json").read_text())["results"][model]["knn/cls"] == pretrained
    assert merged["results"][baseline]["knn/cls"]["top1_k20"] == 1.0
    assert merged["models"][model] == {"kind": "teacher"}
    assert merged["models"][baseline] == {"kind": "baseline", "random_init_of": "teacher", "seed": 3}
    assert json.loads((run_dir / "probe.json").read_text())["models"] == merged["models"]
    assert f"| {baseline} | baseline |" in (run_dir / "probe" / "probe.md").read_text()
    # a baseline is no teacher: the gain is still measured against the real teacher, even when it scores higher
    assert rep.relative_scores(merged)["knn/cls"] == pytest.approx({model: 0.0, baseline: 300.0})


def test_run_probe__same_folder_name_on_other_data_drops_the_stale_results(tmp_path, class_data, teacher_weights,
                                                                         caplog):
    first, other = class_data, shutil.copytree(class_data, tmp_path / "elsewhere" / "cls")
    a, b = _teachers(teacher_weights)
    out = {"out_dir": tmp_path / "out"}
    run_probe(_knn((a, b), first, **out))
    caplog.set_level("WARNING", logger="unic_cli")
    merged = run_probe(_knn((a,), other, **out)).merged
    assert merged["tasks"]["knn/cls"]["data"] == str(other.resolve())
    assert list(merged["results"]) == [a] and list(merged["models"]) == [a]  # b was measured on the other data
    assert "knn/cls" in caplog.text and str(other.resolve()) in caplog.text and f"results of {b}" in caplog.text
    assert b not in (tmp_path / "out" / "probe.md").read_text()
    # the same data again keeps everything; only another split counts as other data too
    run_probe(_knn((b,), other, **out))
    caplog.clear()
    shutil.copytree(other / "val", other / "test")
    merged = run_probe(_knn((a,), other, eval_split="test", **out)).merged
    assert list(merged["results"]) == [a] and f"results of {b}" in caplog.text


def test_run_probe__damaged_student_folder_is_one_message(tmp_path, class_data, student_dir):
    damaged = shutil.copytree(student_dir, tmp_path / "student")
    (damaged / "model.safetensors").unlink()
    with pytest.raises(ProbeError, match=r"model\.safetensors' is missing.*re-run `unic export`"):
        run_probe(_knn((str(damaged),), class_data, out_dir=tmp_path / "o"))
    (damaged / "model.safetensors").write_text("junk\n")
    with pytest.raises(ProbeError, match=r"model\.safetensors' is not a readable safetensors file.*re-run `unic "):
        run_probe(_knn((str(damaged),), class_data, out_dir=tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # refused before any extraction


def test_run_probe__an_unreadable_run_report_is_moved_aside(tmp_path, class_data, teacher_weights,
                                                           make_unic_checkpoint, caplog):
    run_dir = _run_folder(tmp_path / "run", make_unic_checkpoint)
    (run_dir / "probe.json").write_text("{broken")
    caplog.set_level("WARNING", logger="unic_cli")
    run_probe(_knn((_teachers(teacher_weights)[0],), class_data, run_dir=run_dir))
    assert (run_dir / "probe.json.bak").read_text() == "{broken"
    assert json.loads((run_dir / "probe.json").read_text())["format"] == "unic-probe"
    assert f"{run_dir / 'probe.json'} is not a readable" in caplog.text
    assert f"moved it to {run_dir / 'probe.json.bak'}" in caplog.text


def test_run_probe__a_student_folder_typed_with_a_slash_is_the_same_model(tmp_path, class_data, student_dir):
    # shell completion types `students/a/`: one model in probe.json, not two rows for one student
    out = {"out_dir": tmp_path / "out"}
    run_probe(_knn((f"{student_dir}/",), class_data, **out))
    merged = run_probe(_knn((f"{student_dir}/./",), class_data, **out)).merged
    assert list(merged["results"]) == [str(student_dir)]
    with pytest.raises(ProbeError, match=r"given more than once \(as '.*student', '.*student/'\)"):
        run_probe(_knn((str(student_dir), str(student_dir) + "/"), class_data, **out))


def test_run_probe__k_above_the_training_set_size_is_warned(tmp_path, class_data, teacher_weights, caplog):
    caplog.set_level("WARNING", logger="unic_cli")
    run_probe(_knn((_teachers(teacher_weights)[0],), class_data, out_dir=tmp_path / "out", knn_ks=(10, 30)))
    assert "k = [30] exceed(s) the 24 training images" in caplog.text and "knn_ks <= 24" in caplog.text


def _seg_config(data, model, tmp_path, **extra):
    return ProbeConfig.from_sources(None, {**FAST, "models": (model,), "tasks": ("seg",), "data_dir": data,
                                           "out_dir": tmp_path / "out", **extra})


def test_run_probe__seg_classes_include_labels_only_the_evaluation_masks_hold(tmp_path, dense_data, teacher_weights,
                                                                             caplog):
    import numpy as np
    from PIL import Image

    for path in (dense_data / "train" / "masks").iterdir():  # label 2 never appears in training
        mask = np.asarray(Image.open(path)).copy()
        mask[mask == 2] = 255
        Image.fromarray(mask).save(path)
    model = _teachers(teacher_weights)[0]
    caplog.set_level("WARNING", logger="unic_cli")
    seg = run_probe(_seg_config(dense_data, model, tmp_path)).report["results"][model]["seg/dense"]
    # a third of the test pixels are label 2: unlearnable, so they must count as errors, not vanish from the score
    assert seg["num_classes"] == 3 and seg["pixel_acc"] < 0.7
    assert "label(s) [2] that no training mask holds" in caplog.text
    with pytest.raises(ProbeError, match=r"--num-classes 2: the masks hold label\(s\) 2, which need "
                                         r"--num-classes 3 or more"):
        run_probe(_seg_config(dense_data, model, tmp_path, num_classes=2))


def test_run_probe__depth_without_valid_pixels_is_refused_and_seg_results_are_kept(tmp_path, dense_data,
                                                                                   teacher_weights):
    import numpy as np
    from PIL import Image

    for path in (dense_data / "train" / "depth").iterdir():
        Image.fromarray(np.zeros((36, 48), np.uint16)).save(path)
    model = _teachers(teacher_weights)[0]
    config = ProbeConfig.from_sources(None, {**FAST, "models": (model,), "tasks": ("seg", "depth"),
                                             "data_dir": dense_data, "out_dir": tmp_path / "out"})
    with pytest.raises(ProbeError, match=r"depth maps in '.*train/depth' hold no valid pixel"):
        run_probe(config)
    # the seg probe of the same call finished first: its numbers are in probe.json
    saved = json.loads((tmp_path / "out" / "probe.json").read_text())
    assert list(saved["results"][model]) == ["seg/dense"] and (tmp_path / "out" / "probe.md").is_file()


def test_run_probe__saved_config_reruns_from_another_folder(tmp_path, class_data, teacher_weights, monkeypatch):
    monkeypatch.chdir(class_data.parent)
    run_probe(_knn((_teachers(teacher_weights)[0],), Path(class_data.name), out_dir=tmp_path / "out"))
    monkeypatch.chdir(tmp_path)
    again = ProbeConfig.from_sources(tmp_path / "out" / "config.toml", {})
    assert again.data_dir == class_data.resolve() and run_probe(again).merged["results"]


def test_run_probe__validates_a_directly_built_config_and_keeps_the_callers_rng(tmp_path, class_data,
                                                                                 teacher_weights):
    import torch

    from unic_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="knnn"):
        run_probe(ProbeConfig(models=(_teachers(teacher_weights)[1],), tasks=("knnn",), data_dir=class_data,
                              out_dir=tmp_path / "bad"))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_probe(ProbeConfig.from_sources(None, {**FAST, "models": (_teachers(teacher_weights)[1],), "tasks": ("knn",),
                                              "data_dir": class_data, "out_dir": tmp_path / "out"}))
    assert torch.equal(torch.rand(3), expected)  # the probe's seeding did not move the caller's stream


def test_run_probe__dense_tasks_score_each_test_image_at_its_own_target_size(tmp_path, mixed_dense_data,
                                                                             teacher_weights):
    model = _teachers(teacher_weights)[0]
    config = ProbeConfig.from_sources(None, {**FAST, "models": (model,), "tasks": ("seg", "depth"),
                                             "data_dir": mixed_dense_data, "out_dir": tmp_path / "out"})
    results = run_probe(config).report["results"][model]
    assert results["seg/mixed"]["num_classes"] == 3 and 0 < results["seg/mixed"]["miou"] <= 1
    assert results["depth/mixed"]["rmse"] > 0 and 0 <= results["depth/mixed"]["delta1"] <= 1
    # training targets resized to one size, test targets at their own sizes (ragged)
    targets = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "out" / "cache").glob("targets-*"))
    assert targets == ["targets-test-depth-native", "targets-test-mask-native", "targets-train-depth",
                       "targets-train-mask"]
