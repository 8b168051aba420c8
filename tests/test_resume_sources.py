"""Exact resume on every data source: a folder, WebDataset shards (brace pattern), a save_to_disk folder, parquet.

A training loader stopped and resumed (mid-epoch, at an epoch boundary, onto another number of workers) hands out
the batches and skip counts of a straight run, unreadable samples included; decoding workers survive a stop
signal sent to the whole process group (Ctrl-C, SLURM), so that the run can stop at a step boundary and save.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from unic_cli.data import build_train_loader, list_image_folder
from unic_cli.data import loader as loader_module

BATCH, STEPS = 3, 9  # 16 samples: 5 batches per epoch (one sample dropped), so 9 batches cross an epoch boundary
CORRUPT = {2: b"", 7: b"not an image", 11: None}  # None: a JPEG cut to a third


def _samples(tiny_images) -> list[tuple[str, bytes]]:
    """13 tiny JPEGs with 3 unreadable samples among them (zero bytes, text, a cut JPEG), in a fixed order."""
    jpegs = [p.read_bytes() for p, _ in list_image_folder(tiny_images)[:13]]
    samples, it = [], iter(jpegs)
    for i in range(16):
        data = CORRUPT[i] if i in CORRUPT else next(it)
        samples.append((f"{i:03d}.jpg", jpegs[0][: len(jpegs[0]) // 3] if data is None else data))
    return samples


@pytest.fixture(scope="module")
def sources(tiny_images, tmp_path_factory) -> dict[str, str]:
    """The same 16 samples as each kind of source `unic distill --data` reads."""
    root = tmp_path_factory.mktemp("sources")
    samples = _samples(tiny_images)
    (root / "folder").mkdir()
    for name, data in samples:
        (root / "folder" / name).write_bytes(data)
    (root / "shards").mkdir()
    for s in range(3):  # 6, 6 and 4 samples, each with a label member that is not a sample
        with tarfile.open(root / "shards" / f"train-{s:03d}.tar", "w") as tar:
            for name, data in samples[6 * s:6 * s + 6]:
                for member, payload in ((name, data), (name.replace(".jpg", ".cls"), b"1")):
                    info = tarfile.TarInfo(member)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    found = {"folder": str(root / "folder"), "shards": str(root / "shards" / "train-{000..002}.tar")}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the hf extra is not installed: the hf sources skip
        return found
    table = pa.table({"image": [{"bytes": data, "path": name} for name, data in samples]})
    (root / "arrow").mkdir()
    names = []
    for f, rows in enumerate((table.slice(0, 9), table.slice(9))):  # two data files, record batches of 3 rows
        names.append(f"data-{f:05d}-of-00002.arrow")
        with pa.OSFile(str(root / "arrow" / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
            for batch in rows.to_batches(max_chunksize=3):
                w.write_batch(batch)
    (root / "arrow" / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    pq.write_table(table, root / "train.parquet", row_group_size=4)  # block-shuffled by row group
    return {**found, "arrow": str(root / "arrow"), "parquet": str(root / "train.parquet")}


def _source(sources, kind: str) -> str:
    if kind not in sources:
        pytest.skip("needs pyarrow (the hf extra)")
    return sources[kind]


def _loader(data, num_workers: int = 0):
    return build_train_loader(data, image_size=32, batch_size=BATCH, num_workers=num_workers, seed=11)


def _take(loader, num_batches: int) -> list[tuple[torch.Tensor, int]]:
    it = iter(loader)
    return [tuple(next(it)) for _ in range(num_batches)]


def _resumed(data, stop: int, *, workers_before: int = 0, workers_after: int = 0) -> list[tuple[torch.Tensor, int]]:
    """`stop` batches, a state saved and loaded as a checkpoint does, then the rest of the STEPS batches."""
    first = _loader(data, workers_before)
    before = _take(first, stop)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = _loader(data, workers_after)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    return before + _take(second, STEPS - stop)


def _assert_same(straight, resumed) -> None:
    assert len(straight) == len(resumed) == STEPS
    for step, ((a, skipped_a), (b, skipped_b)) in enumerate(zip(straight, resumed)):
        assert skipped_a == skipped_b, f"batch {step}: {skipped_a} vs {skipped_b} skipped"
        assert torch.equal(a, b), f"batch {step} differs"
    assert sum(s for _, s in straight) >= 3  # the unreadable samples were met (and counted) in these batches


@pytest.mark.parametrize("stop", [2, 5], ids=["mid_epoch", "epoch_boundary"])
@pytest.mark.parametrize("kind", ["folder", "shards", "arrow", "parquet"])
def test_train_loader__resume_is_exact_on_every_source(sources, kind, stop) -> None:
    data = _source(sources, kind)
    _assert_same(_take(_loader(data), STEPS), _resumed(data, stop))


@pytest.mark.parametrize(("kind", "before", "after"), [("folder", 0, 2), ("parquet", 2, 0)])
def test_train_loader__resume_onto_another_number_of_workers_is_exact(sources, kind, before, after) -> None:
    # parquet: each worker keeps its own row-group cache; the order must not depend on which worker reads what
    data = _source(sources, kind)
    _assert_same(_take(_loader(data), STEPS), _resumed(data, 3, workers_before=before, workers_after=after))


def _worker_pids() -> list[int]:
    return [p.pid for p in multiprocessing.active_children()]


def test_train_loader__workers_ignore_stop_signals_from_outside(sources) -> None:
    # A Ctrl-C or a SLURM SIGTERM reaches the decoding workers too. A worker killed by it made torch raise in the
    # main process mid-step ("DataLoader worker is killed by signal: Terminated"), so no checkpoint was written.
    straight = _take(_loader(sources["folder"]), STEPS)
    it = iter(_loader(sources["folder"], num_workers=2))
    got = [tuple(next(it)) for _ in range(2)]  # one batch from each worker: both are running
    workers = _worker_pids()
    assert len(workers) == 2
    for sig in ("TERM", "INT"):  # sent by another process, as a terminal or SLURM does (not the parent)
        subprocess.run(["kill", f"-{sig}", *map(str, workers)], check=True)
    time.sleep(0.2)
    got += [tuple(next(it)) for _ in range(STEPS - 2)]
    _assert_same(straight, got)
    assert all(pid in _worker_pids() for pid in workers)
    del it  # the parent still ends its workers: DataLoader's shutdown (and its SIGTERM, if one is stuck) works
    deadline = time.monotonic() + 30
    while any(pid in _worker_pids() for pid in workers):
        assert time.monotonic() < deadline, "workers still alive after the loader was dropped"
        time.sleep(0.05)


def test_train_loader__a_worker_still_ends_some_time_after_sigterm(sources, monkeypatch) -> None:
    # Its parent ends a worker that does not exit by SIGTERM (DataLoader's shutdown, multiprocessing at exit):
    # an ignored SIGTERM would let one stuck worker hang the run's exit forever. A worker killed outright by it
    # (torch's own handler) would make the main process raise: the exit code must be 0.
    monkeypatch.setattr(loader_module, "STOP_GRACE_S", 0.3)  # the forked workers inherit it
    it = iter(_loader(sources["folder"], num_workers=2))
    next(it), next(it)
    workers = multiprocessing.active_children()
    subprocess.run(["kill", "-TERM", str(workers[0].pid)], check=True)  # from outside, as SLURM does
    workers[0].join(timeout=20)
    assert workers[0].exitcode == 0  # not "killed by signal": the main process raises nothing mid-step
    assert workers[1].is_alive()
    del it


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["shards", "parquet"])
def test_distill__process_group_sigterm_with_workers_then_resume_matches_a_straight_run(sources, kind, tmp_path):
    """The CLI with `--num-workers 2` and gradient accumulation: `kill -TERM -- -PGID` mid-run (as SLURM signals
    every process of the job), then `--resume`, ends with the straight run's weights and metrics."""
    data = _source(sources, kind)
    unic = [sys.executable, "-m", "unic_cli"]
    common = ["distill", "--teachers", "timm:test_vit", "timm:test_vit2", "--random-init-teachers", "--student",
              "test_vit", "--image-size", "32", "--batch-size", "2", "--grad-accum-steps", "2", "--steps", "8",
              "--log-every", "1", "--checkpoint-every", "100", "--device", "cpu", "--num-workers", "2", "--data",
              data]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    straight, split = tmp_path / "straight", tmp_path / "split"
    subprocess.run([*unic, *common, "--out", str(straight)], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*unic, *common, "--out", str(split)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics, deadline = split / "metrics.jsonl", time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "Traceback" not in out, out
    assert 2 <= torch.load(split / "checkpoints" / "last.pt", weights_only=True)["step"] < 8
    subprocess.run([*unic, "distill", "--out", str(split), "--resume"], env=env, check=True, capture_output=True)
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (straight, split))
    assert a["counters"] == b["counters"] and a["counters"]["skipped_images"] > 0
    assert all(torch.equal(v, b["student"]["state_dict"][k]) for k, v in a["student"]["state_dict"].items())

    def lines(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]

    assert lines(split) == lines(straight)


def test_train_loader__a_crash_with_workers_alive_exits_at_once(sources, tmp_path) -> None:
    # A traceback that still holds the loader (any crash mid-run) left the workers to multiprocessing's exit,
    # which SIGTERMs and joins them: they outlive a SIGTERM by STOP_GRACE_S (120 s), and so did the process.
    script = tmp_path / "crash.py"
    script.write_text(f"""
from unic_cli.data import build_train_loader
loader = build_train_loader({str(sources["folder"])!r}, image_size=32, batch_size=4, num_workers=2, seed=0,
                            augment="none")
it = iter(loader)
next(it)
raise RuntimeError("a bug while the loader's workers are alive")
""")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=110)
    assert proc.returncode == 1 and "a bug while the loader's workers are alive" in proc.stderr
    assert time.monotonic() - start < 60  # seconds (start-up, two workers), not STOP_GRACE_S
