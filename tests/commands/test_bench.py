"""`unic bench`: the distill flags, one JSON line, errors without a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from unic_cli.cli import unic


def test_bench__json_is_one_parsable_line_with_the_timings_and_profile(tmp_path):
    args = [sys.executable, "-m", "unic_cli", "bench", "--teachers", "timm:test_vit", "timm:test_vit2", "--student",
            "test_vit", "--image-size", "64", "--batch-size", "2", "--steps", "1", "--warmup", "1", "--device", "cpu",
            "--ladder-hidden", "32", "--teacher-drop-prob", "0.25", "--json", "--profile", str(tmp_path / "prof")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    documented = ("sec_per_step", "images_per_sec", "split_sec_per_step", "peak_mem_bytes", "peak_host_mem_bytes",
                  "peak_device_mem_bytes", "flops_per_image", "flops_per_step", "achieved_flops_per_sec", "mfu",
                  "bf16_peak_flops", "compile_mode", "profile")  # docs/bench.md's table
    assert not [key for key in documented if key not in result]
    assert result["mfu"] is None and result["bf16_peak_flops"] is None  # on the CPU: null, not absent
    assert set(result["split_sec_per_step"]) == {"teachers", "student", "loss", "backward", "optimizer"}
    assert abs(result["images_per_sec"] - result["global_batch"] / result["sec_per_step"]) < 1e-9
    assert 0 < sum(result["split_sec_per_step"].values()) <= result["sec_per_step"]  # parts of the timed step
    assert result["flops_per_step"] == result["flops_per_image"]["train_step"] * result["global_batch"]
    # --profile: one more step, its timeline with the step's parts as ranges, and the op time by kind
    prof = result["profile"]
    assert prof["batch_size"] == 2 and prof["total_sec"] > 0
    assert prof["by_kind_sec"]["matmul"] > 0 and prof["by_kind_sec"]["attention"] > 0
    assert abs(sum(prof["by_kind_sec"].values()) - prof["total_sec"]) < 1e-6
    secs = [top["sec"] for top in prof["top"]]  # the costliest ops, costliest first (which ones: load-dependent)
    assert 0 < len(secs) <= 15 and secs == sorted(secs, reverse=True)
    names = {e.get("name") for e in json.loads((tmp_path / "prof" / "trace.json").read_text())["traceEvents"]}
    assert {"unic_step", "teachers", "student", "loss", "backward", "optimizer"} <= names
    assert "aten::addmm" in (tmp_path / "prof" / "ops.txt").read_text()
    by_shape = (tmp_path / "prof" / "ops_by_shape.txt").read_text()
    assert "aten::addmm" in by_shape and "Input Shapes" in by_shape


def test_bench__bad_flags_are_reported_together_without_traceback(tmp_path):
    (tmp_path / "a_file").write_text("")
    result = CliRunner().invoke(unic, ["bench", "--teachers", "dinov2_gg", "--batch-size", "0", "--warmup", "-1",
                                       "--try-batch-sizes", "64,0", "--compile-mode", "max-autotune",
                                       "--profile", str(tmp_path / "a_file")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    for message in ("Did you mean 'dinov2_g'", "--batch-size must be >= 1", "--warmup must be >= 0",
                    "--try-batch-sizes must all be >= 1", "--compile-mode max-autotune needs --compile",
                    "a_file' is a file, not a folder; give a folder for the trace"):
        assert message in result.output


def test_bench__takes_a_distill_command_line_and_a_runs_config_toml(tmp_path):
    from unic_cli.config import DistillConfig

    data = tmp_path / "images"
    data.mkdir()
    run_config = DistillConfig.from_sources(None, dict(teachers=("timm:test_vit",), student="test_vit",
                                                       image_size=32, batch_size=3, steps=100000, data_dir=data,
                                                       out_dir=tmp_path / "run", ladder_blocks="last"))
    (tmp_path / "config.toml").write_text(run_config.to_toml())  # as `unic distill` writes RUN/config.toml
    data.rmdir()  # the run's data is not on the benchmarking machine: bench does not need it

    distill_line = ["--teachers", "timm:test_vit", "--student", "test_vit", "--image-size", "32", "--out",
                    str(tmp_path / "run"), "--epochs", "100", "--overwrite", "--resume", "--auto-resume",
                    "--ladder-blocks", "last"]
    for args in (distill_line, ["--config", str(tmp_path / "config.toml")]):
        result = CliRunner().invoke(unic, ["bench", *args, "--dry-run", "--json"])
        assert result.exit_code == 0, result.output
        plan = json.loads(result.stdout.strip().splitlines()[-1])
        assert plan["dry_run"] is True and plan["flops_per_image"]["train_step"] > 0
    assert plan["batch_size"] == 3  # the run's settings, not its 100000 training steps or its data

    (tmp_path / "typo.toml").write_text('command = "distill"\nbatch_sise = 3\n')
    result = CliRunner().invoke(unic, ["bench", "--config", str(tmp_path / "typo.toml"), "--dry-run"])
    assert result.exit_code == 2 and "unknown key 'batch_sise'; did you mean 'batch_size'?" in result.output
