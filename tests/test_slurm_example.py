"""examples/slurm/unic_distill.sbatch, run for real with `srun` and `scontrol` stand-ins: one node, two gloo
processes through torchrun's c10d rendezvous, then a resubmission that resumes from last.pt."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from unic_cli.config import DistillConfig

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "slurm" / "unic_distill.sbatch"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _submit(config: Path, run_dir: Path, bin_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
           "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "2",
           "MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(SCRIPT), str(config), str(run_dir)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_slurm_example__runs_under_torchrun_and_a_resubmission_resumes(tiny_teachers, tiny_images, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr "," "\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\nexec "$@"\n')  # one task on this one node
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    run_dir = tmp_path / "run"
    common = dict(teachers=tiny_teachers, data_dir=tiny_images, student="test_vit", image_size=64, batch_size=2,
                  base_lr=1e-2, num_workers=0, augment="none", log_every=1, checkpoint_every=2,
                  random_init_teachers=True, device="cpu", out_dir=run_dir)
    first, second = tmp_path / "first.toml", tmp_path / "second.toml"
    first.write_text(DistillConfig.from_sources(None, {**common, "steps": 2}).to_toml())
    second.write_text(DistillConfig.from_sources(None, {**common, "steps": 4}).to_toml())

    proc = _submit(first, run_dir, bin_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ckpt_steps = json.loads((run_dir / "run.json").read_text())
    assert ckpt_steps["total_steps"] == 2 and (run_dir / "checkpoints" / "last.pt").is_file()

    proc = _submit(second, run_dir, bin_dir)  # a requeued job: --auto-resume finds last.pt
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone logs; steps 3-4 continue the same file
    import torch

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["scheduler"]["world_size"] == 2 and ckpt["scheduler"]["global_batch"] == 4
