"""Data parallelism on CPU (gloo): torchrun with 2 processes == 1 process with the doubled batch, resume onto 1
process, FSDP2, and the process-group helpers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from unic_cli.config import DistillConfig
from unic_cli.distill import run

# fp32 teachers and no stochastic depth: the only differences left are summation orders
COMMON = dict(student="test_vit", image_size=64, steps=4, base_lr=1e-2, num_workers=0, augment="none", log_every=1,
              checkpoint_every=2, random_init_teachers=True, device="cpu", teacher_dtype="fp32", drop_path_rate=0.0)


def _flags(**values) -> list[str]:
    out = []
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [flag, str(value)]
    return out


def _rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6), (ra["step"], ra["loss"], rb["loss"])
        for key in ra["teachers"]:
            ta, tb = ra["teachers"][key], rb["teachers"][key]
            assert ta["loss"] == pytest.approx(tb["loss"], rel=1e-4, abs=1e-6) and ta["coeff"] == tb["coeff"]


def _student(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["student"]["state_dict"]


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_torchrun__two_processes_match_one_with_the_doubled_batch_and_resume_on_one(tiny_teachers, tiny_images,
                                                                                     tmp_path):
    ddp = tmp_path / "ddp"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unic_cli",
            "distill", "--teachers", *tiny_teachers, "--data", str(tiny_images), "--out", str(ddp),
            *_flags(batch_size=4, **COMMON)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    single = tmp_path / "single"
    run(DistillConfig.from_sources(None, dict(teachers=tiny_teachers, data_dir=tiny_images, out_dir=single,
                                              batch_size=8, **COMMON)))
    ddp_rows, single_rows = _rows(ddp), _rows(single)
    assert len(ddp_rows) == 4  # rank 0 alone logs
    _assert_same_losses(ddp_rows, single_rows)
    _assert_same_weights(_student(ddp), _student(single))
    ckpt = torch.load(ddp / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["scheduler"]["world_size"] == 2 and ckpt["scheduler"]["global_batch"] == 8
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt",
                                                                       "step_0000004.pt"]

    # Resume the 2-process run from its step-2 checkpoint on ONE process (batch 8 keeps the global batch).
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp, resumed)
    (resumed / "checkpoints" / "step_0000004.pt").unlink()
    shutil.copyfile(resumed / "checkpoints" / "step_0000002.pt", resumed / "checkpoints" / "last.pt")
    config = DistillConfig.from_sources(resumed / "config.toml", {"out_dir": resumed, "batch_size": 8})
    result = run(config, resume=True)
    assert result.step == 4
    _assert_same_losses(_rows(resumed), single_rows)
    _assert_same_weights(_student(resumed), _student(single))


def test_resume__a_different_global_batch_is_refused_with_the_fix(tiny_teachers, tiny_images, tmp_path):
    from unic_cli.errors import ConfigError

    config = DistillConfig.from_sources(None, dict(teachers=tiny_teachers, data_dir=tiny_images, out_dir=tmp_path,
                                                   batch_size=8, **{**COMMON, "steps": 1}))
    run(config)
    with pytest.raises(ConfigError, match=r"global batch was 8 images.*e\.g\. --batch-size 8"):
        run(DistillConfig.from_sources(tmp_path / "config.toml", {"batch_size": 4, "steps": 2}), resume=True)


def test_fsdp__one_process_matches_plain_and_saves_plain_tensors(tiny_teachers, tiny_images, tmp_path):
    base = dict(teachers=tiny_teachers, data_dir=tiny_images, batch_size=8, **{**COMMON, "steps": 2})
    run(DistillConfig.from_sources(None, {**base, "out_dir": tmp_path / "plain"}))
    run(DistillConfig.from_sources(None, {**base, "out_dir": tmp_path / "fsdp", "fsdp": True}))
    _assert_same_losses(_rows(tmp_path / "fsdp"), _rows(tmp_path / "plain"))
    fsdp_ckpt = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in fsdp_ckpt["student"]["state_dict"].values())
    _assert_same_weights(fsdp_ckpt["student"]["state_dict"], _student(tmp_path / "plain"))
    state = fsdp_ckpt["optimizer"]["state"]
    assert all(type(v) is torch.Tensor for s in state.values() for v in s.values())
    assert not torch.distributed.is_initialized()  # the run left no process group behind


def _torchrun(teachers, data, out, **flags) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unic_cli",
            "distill", "--teachers", *teachers, "--data", str(data), "--out", str(out), *_flags(**flags)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _broken_folder(tiny_images, tmp_path, num_good: int):
    folder = tmp_path / "data"
    folder.mkdir()
    for path in sorted(tiny_images.rglob("*.jpg"))[:num_good]:
        shutil.copyfile(path, folder / path.name)
    (folder / "zz_broken.jpg").write_bytes(b"not an image")
    return folder


@pytest.mark.slow  # two torchrun processes: about 20 s on 2 busy cores
def test_torchrun__unreadable_images_at_batch_1_are_counted_over_all_ranks(tiny_teachers, tiny_images, tmp_path):
    # 4 images, one broken, 1 per rank: 2 steps per epoch, so 4 steps draw the broken file exactly twice, on
    # whichever rank; a rank left with no readable image repeats its latest readable batch and stays in step.
    data = _broken_folder(tiny_images, tmp_path, num_good=3)
    proc = _torchrun(tiny_teachers, data, tmp_path / "r", batch_size=1, **{**COMMON, "image_size": 32})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr  # DDP's deprecated broadcast_buffers, once per process
    rows = _rows(tmp_path / "r")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["skipped_images"] == 2
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["counters"]["skipped_images"] == 2 and ckpt["data"]["epoch"] == 2


@pytest.mark.slow  # two torchrun processes: about 20 s on 2 busy cores
def test_torchrun__a_rank_that_fails_does_not_leave_the_other_hanging(tiny_teachers, tiny_images, tmp_path):
    # 1 readable image of 2 at 1 per rank: each epoch one rank has nothing to train on and stops with a DataError
    data = _broken_folder(tiny_images, tmp_path, num_good=1)
    proc = _torchrun(tiny_teachers, data, tmp_path / "r", batch_size=1, **{**COMMON, "image_size": 32})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "No readable image in a whole epoch for rank" in out
    assert "lost contact with the other processes, most likely because one of them failed" in out
    assert "]: Traceback" not in out  # neither worker prints a traceback (torchrun itself still does)


# rank 1 kills its process once, at its first forward after the step-2 checkpoint exists: a worker lost mid-run
CRASH_ONCE = """
after, marker = Path(os.environ["CRASH_AFTER"]), Path(os.environ["CRASH_MARKER"])
if os.environ.get("RANK") == "1" and after.exists() and not marker.exists():
    marker.touch()
    os._exit(3)
"""


@pytest.mark.slow  # torchrun with 2 processes, started twice: about 40 s on 2 busy cores
def test_torchrun__max_restarts_with_auto_resume_continues_after_a_lost_worker(tiny_teachers, tiny_images,
                                                                                tmp_path, conv_teacher_module):
    module = tmp_path / "crash_once.py"
    module.write_text(conv_teacher_module(CRASH_ONCE, image_size=64))
    out = tmp_path / "r"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
            "-m", "unic_cli", "distill", "--teachers", tiny_teachers[0], f"py:{module}:build", "--data",
            str(tiny_images), "--out", str(out), "--auto-resume", *_flags(batch_size=2, **COMMON)]
    # without the variable, torch 2.14's restarted gloo workers read stale addresses about every other time
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CRASH_MARKER": str(tmp_path / "crashed"),
           "CRASH_AFTER": str(out / "checkpoints" / "step_0000002.pt"), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "crashed").exists()  # the worker was lost, torchrun restarted both, the run went on
    assert "resuming" in proc.stdout + proc.stderr and "shared rendezvous store" not in proc.stdout + proc.stderr
    assert [r["step"] for r in _rows(out)] == [1, 2, 3, 4]  # steps after the checkpoint are logged once
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["scheduler"]["world_size"] == 2


@pytest.mark.parametrize(("env", "warned"), [
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}, True),
    ({"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "False"}, False),  # the variable is set
    ({"TORCHELASTIC_MAX_RESTARTS": "0", "TORCHELASTIC_USE_AGENT_STORE": "True"}, False),
    ({}, False),
])
def test_restart_store_problem__names_the_variable_only_when_restarts_share_the_store(env, warned):
    from unic_cli.distributed import restart_store_problem

    problem = restart_store_problem(env)
    assert (problem is not None) == warned
    assert not warned or "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in problem
