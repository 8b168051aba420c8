"""`unic distill` CLI: every bad input at once (exit 2), --teachers A B, dry-run JSON, exact resume after SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from click.testing import CliRunner

from unic_cli.cli import unic


def test_distill__reports_every_bad_input_at_once(tmp_path):
    args = ["distill", "--teachers", "dinov2_gg", "metaclip_h", "--teacher-drop-prob", "1.5",
            "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--steps", "0",
            "--crop-scale", "0.6", "0.3", "--compile", "--compile-mode", "max-autotun"]
    result = CliRunner().invoke(unic, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "6 problems" in result.output
    for message in ("Did you mean 'dinov2_g'", "--teacher-drop-prob must be in [0, 1), got 1.5",
                    "missing' does not exist", "--steps must be >= 1", "--crop-scale must be two fractions",
                    "--compile-mode must be one of default, max-autotune-no-cudagraphs, max-autotune, "
                    "reduce-overhead, got 'max-autotun'; did you mean 'max-autotune'?"):
        assert message in result.output
    assert not (tmp_path / "run").exists()


def test_distill__dry_run_json_takes_several_teachers_after_one_flag(tiny_teachers, tiny_images):
    args = ["distill", "--teachers", *tiny_teachers, "--data", str(tiny_images), "--student", "test_vit",
            "--image-size", "64", "--batch-size", "8", "--steps", "3", "--random-init-teachers", "--dry-run", "--json"]
    result = CliRunner().invoke(unic, args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert [t["alias"] for t in plan["teachers"]] == list(tiny_teachers)
    assert plan["student"]["grid"] == [4, 4] and all(t["grid"] == [4, 4] for t in plan["teachers"])
    assert plan["memory_bytes"]["peak_estimate"] > 0 and plan["data"]["num_images"] == 32


def _cli(args, **kwargs):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    return subprocess.Popen([sys.executable, "-m", "unic_cli", "distill", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _student(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["student"]["state_dict"]


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], {k: (t["loss"], t["coeff"]) for k, t in r["teachers"].items()}) for r in rows]


def test_distill__sigterm_then_resume_matches_a_straight_run(tiny_teachers, tiny_images, tmp_path):
    common = ["--teachers", *tiny_teachers, "--data", str(tiny_images), "--student", "test_vit", "--image-size",
              "64", "--batch-size", "4", "--grad-accum-steps", "2", "--steps", "8", "--num-workers", "0", "--augment",
              "none",
              "--log-every", "1", "--checkpoint-every", "100", "--random-init-teachers", "--device", "cpu",
              "--base-lr", "1e-2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = _cli([*common, "--out", str(straight)])
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    proc = _cli([*common, "--out", str(split)])
    metrics = split / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):  # mid-run, handler installed
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, out
    stopped = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < 8 and "--resume" in out

    proc = _cli(["--out", str(split), "--resume"])  # everything else comes from the run's config.toml
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    a, b = _student(straight), _student(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(split) == _losses(straight)


def test_distill__auto_resume_starts_then_continues_from_the_runs_own_settings(tiny_teachers, tiny_images, tmp_path):
    out = tmp_path / "run"
    first = ["distill", "--teachers", *tiny_teachers, "--data", str(tiny_images), "--student", "test_vit",
             "--image-size", "32", "--batch-size", "4", "--steps", "2", "--num-workers", "0", "--log-every", "1",
             "--random-init-teachers", "--device", "cpu", "--out", str(out), "--auto-resume"]
    result = CliRunner().invoke(unic, first)
    assert result.exit_code == 0, result.output
    # a checkpoint exists: the settings come from RUN/config.toml, as with --resume, and flags override them
    result = CliRunner().invoke(unic, ["distill", "--out", str(out), "--auto-resume", "--steps", "3"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    for flag in ("--resume", "--overwrite"):
        result = CliRunner().invoke(unic, ["distill", "--out", str(out), "--auto-resume", flag])
        assert result.exit_code == 2 and f"--auto-resume with {flag}" in result.output
        assert "Traceback" not in result.output
