"""`unic demo`: its package-only data, its error paths, and (slow) the whole quickstart in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from unic_cli.cli import unic
from unic_cli.demo import CROP_PHOTOS, DISTILL_PHOTOS, prepare_demo_data


def test_prepare_demo_data__builds_every_folder_from_installed_packages(tmp_path):
    from PIL import Image

    folders = prepare_demo_data(tmp_path / "data", seed=0)
    assert len(list(folders["distill"].glob("*.png"))) == 5 * len(DISTILL_PHOTOS)
    for split in ("train", "test"):
        assert {p.name: len(list(p.iterdir())) for p in (folders["faces"] / split).iterdir()} == {
            "face": 50, "non-face": 50}
        crops = folders["photo-crops"] / split
        assert sorted(p.name for p in crops.iterdir()) == sorted(name.rsplit(".", 1)[0] for name in CROP_PHOTOS)
        assert all(len(list(p.iterdir())) == 12 for p in crops.iterdir())
    with Image.open(folders["photo-crops"] / "test" / "astronaut" / "00.png") as img:
        assert img.size == (96, 96) and img.mode == "RGB"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
        ([], "pass --overwrite"),
    ],
)
def test_demo__bad_input_is_one_message_and_exit_2(tmp_path, args, message):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier demo")
    result = CliRunner().invoke(unic, ["demo", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert (out / "earlier.txt").exists()


@pytest.mark.slow
def test_demo__quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    result = subprocess.run([sys.executable, "-m", "unic_cli", "demo", "--out", str(out), "--steps", "3",
                             "--device", "cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "efficientnet_lite1 (128 px)" in result.stdout and "random init" in result.stdout
    assert "VisionTransformer, 96-d features" in result.stdout
    report = json.loads((out / "probe" / "probe.json").read_text())
    assert set(report["tasks"]) == {"knn/faces", "linear/faces", "knn/photo-crops", "linear/photo-crops"}
    assert (out / "student" / "model.safetensors").is_file()
