"""`unic probe` from the command line: one real end-to-end subprocess, and every layout error as exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from unic_cli.cli import unic


def _class_data(root: Path, classes=("red", "green")) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(n):
                pixels = np.clip(rng.normal(60 + 120 * i, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{j}.png")
    return root


def _dense_data(root: Path) -> Path:
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for j in range(8):
            Image.fromarray(np.full((16, 16, 3), 30 * j, np.uint8)).save(root / split / "images" / f"img{j}.jpg")
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(root / split / "masks" / f"img{j}.png")
    return root


def _run(args: list[str]):
    result = CliRunner().invoke(unic, ["probe", *args])
    assert "Traceback" not in result.output, result.output
    return result


def test_probe__student_and_two_teachers_in_one_call(tmp_path, make_unic_checkpoint):
    import timm
    import torch
    from safetensors.torch import save_file

    from unic_cli.export import export_student

    student_dir = export_student(make_unic_checkpoint(), tmp_path / "student")
    teachers = []
    for name in ("test_vit", "test_vit2"):  # local weights: no download, and the ALIAS=PATH path is exercised
        torch.manual_seed(0)
        weights = tmp_path / f"{name}.safetensors"
        save_file(timm.create_model(name, pretrained=False, num_classes=0).state_dict(), weights)
        teachers.append(f"timm:{name}?image_size=32&weights={weights}")
    data = _class_data(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    args = [sys.executable, "-m", "unic_cli", "probe", str(student_dir), *teachers, "--task", "knn",
            "--data", str(data), "--out", str(out), "--num-workers", "0", "--device", "cpu"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "knn/data" in proc.stdout and "student" in proc.stdout and proc.stdout.count("teacher") >= 2
    report = json.loads((out / "probe.json").read_text())
    assert list(report["results"]) == [str(student_dir), *teachers]
    assert "| student |" in (out / "probe.md").read_text() and (out / "probe.png").stat().st_size > 1000


@pytest.fixture
def class_data_cli(tmp_path) -> Path:
    return _class_data(tmp_path / "data")


def test_probe__masks_missing_for_some_images(tmp_path):
    data = _dense_data(tmp_path / "data")
    for j in (2, 5, 6):
        (data / "val" / "masks" / f"img{j}.png").unlink()
    result = _run(["timm:test_vit", "--task", "seg", "--data", str(data)])
    assert result.exit_code == 2
    assert "3 of 8 images" in result.output and "img2.jpg, img5.jpg, img6.jpg" in result.output


def test_probe__class_folders_differ_between_splits(class_data_cli):
    shutil.move(class_data_cli / "val" / "green", class_data_cli / "val" / "grean")
    result = _run(["timm:test_vit", "--task", "knn", "--data", str(class_data_cli)])
    assert result.exit_code == 2
    assert "only in train/: green" in result.output and "only in val/: grean" in result.output


def test_probe__zeroshot_on_a_model_without_clip_head(class_data_cli, tmp_path):
    result = _run(["timm:test_vit", "--task", "zeroshot", "--data", str(class_data_cli), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "is not a CLIP model" in result.output


def test_probe__missing_splits_and_bad_flags_are_reported_together(class_data_cli):
    shutil.rmtree(class_data_cli / "train")
    result = _run(["timm:test_vit", "--task", "knn", "--data", str(class_data_cli)])
    assert result.exit_code == 2 and "has no train/ split" in result.output
    result = _run(["timm:test_vit", "--task", "kn", "--task", "seg", "--data", str(class_data_cli / "nope"),
                   "--knn-ks", "3"])
    assert result.exit_code == 2  # an unknown flag is click's usage error
    result = _run(["timm:test_vit", "--task", "kn", "--data", str(class_data_cli / "nope")])
    assert result.exit_code == 2 and "did you mean 'knn'?" in result.output and "does not exist" in result.output


@pytest.mark.parametrize(("target", "task"), [("masks", "seg"), ("depth", "depth")])
def test_probe__classification_task_on_a_dense_layout(tmp_path, target, task):
    data = _dense_data(tmp_path / "data")
    if target == "depth":
        for split in ("train", "val"):
            (data / split / "masks").rename(data / split / "depth")
    result = _run(["timm:test_vit", "--task", "knn", "--data", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"holds images/ + {target}/ (the seg/depth layout)" in result.output
    assert f"use --task {task}" in result.output and not (tmp_path / "o").exists()


def test_probe__damaged_student_folder_and_a_run_that_is_no_run(tmp_path, class_data_cli, make_unic_checkpoint):
    from unic_cli.export import export_student

    student = export_student(make_unic_checkpoint(), tmp_path / "student")
    # an export folder passed as --run is refused before anything is written into it
    result = _run([str(student), "--task", "knn", "--data", str(class_data_cli), "--run", str(student)])
    assert result.exit_code == 2 and "is not a `unic distill` run folder" in result.output
    assert "config.toml" in result.output and not (student / "probe.json").exists()
    (student / "model.safetensors").write_bytes(b"junk")
    result = _run([str(student), "--task", "knn", "--data", str(class_data_cli), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model.safetensors' is not a readable safetensors file" in result.output
    assert "re-run `unic export`" in result.output
    (student / "model.safetensors").unlink()
    result = _run([str(student), "--task", "knn", "--data", str(class_data_cli), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model.safetensors' is missing" in result.output


def test_probe__table_compares_with_teachers_probed_in_an_earlier_call(tmp_path, class_data_cli, monkeypatch):
    import timm
    import torch
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)  # short model names: the table fits the terminal without folding them
    specs = []
    for seed, name in enumerate(("test_vit", "test_vit2")):
        torch.manual_seed(seed)
        save_file(timm.create_model(name, pretrained=False, num_classes=0).state_dict(), f"w{seed}.safetensors")
        specs.append(f"timm:{name}=w{seed}.safetensors")
    common = ["--task", "knn", "--data", str(class_data_cli), "--out", str(tmp_path / "o"), "--num-workers", "0"]
    assert _run([specs[0], *common]).exit_code == 0
    result = _run([specs[1], *common])
    assert result.exit_code == 0, result.output
    # the earlier teacher is a row (marked *) and the gains are against the best of both, as in probe.md
    from unic_cli.probe.report import best_reference

    report = json.loads((tmp_path / "o" / "probe.json").read_text())
    best, value, _ = best_reference(report)["knn/data"]
    assert f"{specs[0]} *" in result.output and "* measured in an earlier call" in result.output
    assert f"best teacher on knn/data: {best} ({value:.4f})" in " ".join(result.output.split())  # caption wraps
    assert f"Best teacher: `{best}` ({value:.4f})." in (tmp_path / "o" / "probe.md").read_text()


@pytest.mark.parametrize("model", ["./students/nothere/", "students/a/model.safetensors"])
def test_probe__a_student_path_that_is_no_folder(tmp_path, class_data_cli, model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "students" / "a").mkdir(parents=True)
    (tmp_path / "students" / "a" / "model.safetensors").write_bytes(b"")
    result = _run([model, "--task", "knn", "--data", str(class_data_cli)])
    assert result.exit_code == 2 and f"MODEL {model!r} looks like a student folder, but it" in result.output
    assert "written by `unic export`" in result.output
