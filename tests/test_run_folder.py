"""Never lose a user's work: the run folder across failed starts, locks, resumes, damaged files and bad steps."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import replace

import pytest
import torch

from unic_cli.config import DistillConfig
from unic_cli.distill import MAX_CONSECUTIVE_SKIPS, DistillHooks, _RunLock, run
from unic_cli.errors import CheckpointError, ConfigError, DataError, TrainingError
from unic_cli.standardize import EmaStandardizer


def _config(teachers, images, out, **overrides) -> DistillConfig:
    flags = dict(teachers=teachers, data_dir=images, out_dir=out, student="test_vit", image_size=64, batch_size=4,
                 steps=4, base_lr=1e-2, num_workers=0, augment="none", log_every=1, checkpoint_every=2,
                 keep_checkpoints=0, random_init_teachers=True, device="cpu")
    return DistillConfig.from_sources(None, {**flags, **overrides})


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_sec"} for r in rows]


def _rewind(run_dir, step: int) -> None:
    """The run folder as an interruption right after checkpoint `step` leaves it."""
    folder = run_dir / "checkpoints"
    for path in folder.glob("step_*.pt"):
        if int(path.stem.split("_")[1]) > step:
            path.unlink()
    (folder / "last.pt").unlink()
    shutil.copyfile(folder / f"step_{step:07d}.pt", folder / "last.pt")


@pytest.fixture
def messy_images(tiny_images, tmp_path):
    """tiny_images plus unreadable files (zero bytes, a truncated JPEG, text), skipped and counted."""
    folder = tmp_path / "messy"
    shutil.copytree(tiny_images, folder)
    jpeg = next(folder.rglob("*.jpg")).read_bytes()
    (folder / "a" / "zero.jpg").write_bytes(b"")
    (folder / "a" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "b" / "text.png").write_text("not an image")
    return folder


def test_failed_start__leaves_nothing_that_blocks_the_corrected_command(tiny_teachers, tiny_images, tmp_path):
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(next(tiny_images.rglob("*.jpg")), few / "one.jpg")
    with pytest.raises(DataError, match="fewer than one global batch"):
        run(_config(tiny_teachers, few, tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # nothing left behind
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.toml").write_text("# what a failed start of an earlier version left")
    result = run(_config(tiny_teachers, tiny_images, tmp_path / "r", steps=1))  # no --overwrite needed
    assert result.status == "done" and not (tmp_path / "r" / ".unic.lock").exists()


def test_out_under_a_file__one_clear_error(tiny_teachers, tiny_images, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"--out .*file/run' cannot be created: .*file' is a file"):
        run(_config(tiny_teachers, tiny_images, tmp_path / "file" / "run"))


def test_lock__a_second_process_on_the_same_run_folder_is_refused(tiny_teachers, tiny_images, tmp_path):
    (tmp_path / "r").mkdir()
    with _RunLock(tmp_path / "r"):  # another open file description: as another process holds it
        with pytest.raises(ConfigError, match=rf"in use by pid {os.getpid()}"):
            run(_config(tiny_teachers, tiny_images, tmp_path / "r", steps=1))
    assert run(_config(tiny_teachers, tiny_images, tmp_path / "r", steps=1)).status == "done"


def test_resume__counters_metrics_and_weights_continue_exactly(tiny_teachers, messy_images, tmp_path):
    straight = _config(tiny_teachers, messy_images, tmp_path / "straight")
    run(straight)
    assert _metrics(tmp_path / "straight")[-1]["skipped_images"] > 0  # the messy files were met and counted
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    _rewind(tmp_path / "resumed", 2)
    with (tmp_path / "resumed" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 0.7')  # a line cut short by a crash
    stale = tmp_path / "resumed" / "checkpoints" / ".step_0000004.pt.tmp4242"  # a save killed mid-write
    stale.write_bytes(b"half")
    resumed = run(replace(straight, out_dir=tmp_path / "resumed"), resume=True)
    assert resumed.step == 4 and _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    assert not stale.exists()
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["counters"] == b["counters"] and a["counters"]["skipped_images"] > 0
    assert all(torch.equal(a["student"]["state_dict"][k], v) for k, v in b["student"]["state_dict"].items())


def test_resume__a_finished_run_has_nothing_to_do_and_steps_cannot_go_back(tiny_teachers, tiny_images, tmp_path):
    config = _config(tiny_teachers, tiny_images, tmp_path / "r")
    done = run(config)
    toml = (tmp_path / "r" / "config.toml").read_text()
    again = run(config, resume=True)
    assert again.status == "done" and again.step == 4 and again.last_metrics["loss"] == done.last_metrics["loss"]
    with pytest.raises(ConfigError, match="--steps 2 is below the checkpoint's step 4"):
        run(replace(config, steps=2), resume=True)
    assert (tmp_path / "r" / "config.toml").read_text() == toml


def test_resume__changed_settings_are_named_and_the_earlier_ones_kept(tiny_teachers, tiny_images, tmp_path, caplog):
    config = _config(tiny_teachers, tiny_images, tmp_path / "r")
    run(config)
    _rewind(tmp_path / "r", 2)
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        run(replace(config, base_lr=5e-3, teacher_drop_prob=0.0), resume=True)
    assert "changed on resume, from step 2 on: base_lr 0.01 -> 0.005, teacher_drop_prob 0.5 -> 0.0" in caplog.text
    earlier = DistillConfig.from_sources(tmp_path / "r" / "config.until_step_0000002.toml", {})
    assert earlier.base_lr == 1e-2 and DistillConfig.from_sources(tmp_path / "r" / "config.toml", {}).base_lr == 5e-3


def test_resume__a_run_trained_by_epochs_continues_by_steps(tiny_teachers, tiny_images, tmp_path):
    """`--resume --steps N` (or `--config RUN/config.toml --steps N`) on a run saved with `epochs`: the flag
    replaces the file's training length instead of clashing with it."""
    config = _config(tiny_teachers, tiny_images, tmp_path / "r", steps=None, epochs=1)
    first = run(config)
    saved = tmp_path / "r" / "config.toml"
    assert "epochs = 1" in saved.read_text() and first.step == first.total_steps
    longer = DistillConfig.from_sources(saved, {"steps": first.step + 2})
    assert (longer.epochs, longer.steps) == (None, first.step + 2)
    assert run(longer, resume=True).step == first.step + 2
    with pytest.raises(ConfigError, match="not both"):  # both as flags is still a mistake
        DistillConfig.from_sources(saved, {"steps": 3, "epochs": 2})


def test_resume__a_damaged_last_checkpoint_falls_back_to_the_newest_readable(tiny_teachers, tiny_images, tmp_path,
                                                                             caplog):
    config = _config(tiny_teachers, tiny_images, tmp_path / "r", checkpoint_every=1)
    run(config)
    folder = tmp_path / "r" / "checkpoints"
    for name in ("last.pt", "step_0000004.pt"):  # both damaged (last.pt is a hard link: replace, not rewrite)
        (folder / name).unlink()
        (folder / name).write_bytes(b"PK\x03\x04 cut short")
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        result = run(config, resume=True)
    assert "resuming from" in caplog.text and "step_0000003.pt (step 3)" in caplog.text
    assert result.step == 4 and [r["step"] for r in _metrics(tmp_path / "r")] == [1, 2, 3, 4]
    for path in folder.glob("*.pt"):
        path.unlink()
        path.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        run(config, resume=True)


def test_config_toml__keeps_an_absolute_data_path(tiny_teachers, tiny_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_images.parent)
    run(_config(tiny_teachers, tiny_images.name, tmp_path / "r", steps=1))
    saved = DistillConfig.from_sources(tmp_path / "r" / "config.toml", {})
    assert saved.data_dir == tiny_images and saved.data_dir.is_absolute()


def test_standardizer__a_non_finite_batch_leaves_the_statistics_untouched():
    std = EmaStandardizer(3)
    std.update(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), momentum=1.0)
    before = (std.mean_D.clone(), std.var_D.clone())
    std.update(torch.tensor([[1.0, float("inf"), 3.0], [3.0, 2.0, 1.0]]), momentum=0.5)
    assert torch.equal(std.mean_D, before[0]) and torch.equal(std.var_D, before[1])
    std.update(torch.tensor([[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), momentum=0.5)
    assert torch.allclose(std.mean_D, torch.tensor([2.5, 2.0, 1.5])) and torch.isfinite(std.var_D).all()


def test_skip_nonfinite__gives_up_when_the_run_has_diverged(tiny_teachers, tiny_images, tmp_path):
    config = _config(tiny_teachers, tiny_images, tmp_path / "r", steps=MAX_CONSECUTIVE_SKIPS + 10, base_lr=1e36,
                     warmup_steps=0, skip_nonfinite=True, checkpoint_every=100)
    with pytest.raises(TrainingError, match=rf"non-finite at {MAX_CONSECUTIVE_SKIPS} steps in a row.*diverged"):
        run(config)


def test_signal__stops_after_the_step_it_arrives_in(tiny_teachers, tiny_images, tmp_path):
    calls = []

    def timer(name):
        if name == "teachers":
            calls.append(name)
            if len(calls) == 2:  # during step 2
                os.kill(os.getpid(), signal.SIGTERM)
        return torch.autograd.profiler.record_function(name)

    result = run(_config(tiny_teachers, tiny_images, tmp_path / "r", steps=10, checkpoint_every=100), timer=timer)
    assert result.status == "interrupted" and result.step == 2 and result.checkpoint.name == "step_0000002.pt"


def test_data_lost_mid_run__the_steps_trained_so_far_are_saved(tiny_teachers, tiny_images, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)

    class LoseData(DistillHooks):
        def on_step(self, step: int) -> None:
            if step == 3:  # a network mount gone
                data.rename(tmp_path / "moved")

    config = _config(tiny_teachers, data, tmp_path / "r", steps=20, checkpoint_every=100)
    with pytest.raises(DataError, match=r"the run was saved at step 3 .*step_0000003\.pt.*--resume"):
        run(config, hooks=LoseData())
    (tmp_path / "moved").rename(data)
    assert run(config, resume=True).step == 20


def test_stop_request__the_launchers_echo_of_a_signal_does_not_kill():
    # Under torchrun a Ctrl-C or a SLURM signal reaches a worker twice: directly, then forwarded by torchrun.
    from unic_cli.distill import _StopRequest

    before = signal.getsignal(signal.SIGINT)
    with _StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the echo, milliseconds later: still stopping gracefully
    assert stop.signal_name == "SIGINT" and signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):  # a deliberate second Ctrl-C after the grace period still interrupts
        with _StopRequest(repeat_grace_s=0.0):
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_resume__keeps_the_teacher_cards_it_started_with(tiny_teachers, tiny_images, tmp_path, caplog):
    # The registry changes between start and resume (a new unic version feeds tiny_a at its native 160 px): the
    # resumed run must still feed it as before, so its losses equal an uninterrupted run's.
    straight = _config(tiny_teachers, tiny_images, tmp_path / "straight")
    run(straight)
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    _rewind(tmp_path / "resumed", 2)
    from unic_cli import registry

    card = registry.card_path("tiny_a")
    card.write_text(card.read_text() + 'resolution = "native"\n')
    registry.all_cards.cache_clear()
    assert registry.get_card("tiny_a").input_size_for((4, 4)) == (160, 160)
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        run(replace(straight, out_dir=tmp_path / "resumed"), resume=True)
    assert ("teacher tiny_a: its card has changed since this run started (resolution 'student' -> 'native'); the "
            "run keeps the card it started with") in caplog.text
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")


def test_lock__a_lock_file_unlinked_before_our_flock_is_reopened(tmp_path, monkeypatch):
    # The holder ends (and unlinks RUN/.lock) between our open and our flock: we must not hold a lock on the
    # orphaned file, or a third process would find no lock and run beside us.
    (tmp_path / "r").mkdir()
    lock = _RunLock(tmp_path / "r")
    real_open, calls = _RunLock._open, []

    def open_then_holder_exits(self):
        fd = real_open(self)
        if not calls:
            self.path.unlink()  # what the ending holder's __exit__ does
        calls.append(fd)
        return fd

    monkeypatch.setattr(_RunLock, "_open", open_then_holder_exits)
    with lock:
        assert len(calls) == 2 and os.path.samestat(os.fstat(lock.fd), os.stat(lock.path))
        monkeypatch.setattr(_RunLock, "_open", real_open)
        with pytest.raises(ConfigError, match="is in use by pid"):
            with _RunLock(tmp_path / "r"):
                pass


def test_auto_resume__starts_then_resumes_and_restarts_a_run_that_never_checkpointed(tiny_teachers, tiny_images,
                                                                                      tmp_path, caplog):
    config = _config(tiny_teachers, tiny_images, tmp_path / "auto")
    first = run(config, resume="auto")  # nothing there: a new run
    straight = _metrics(tmp_path / "auto")
    assert first.step == 4 and [r["step"] for r in straight] == [1, 2, 3, 4]
    _rewind(tmp_path / "auto", 2)  # as a crash right after step 2's checkpoint leaves it
    with caplog.at_level(logging.INFO, logger="unic_cli"):
        again = run(config, resume="auto")  # the same call again: continues from step 2, exactly
    assert again.step == 4 and _metrics(tmp_path / "auto") == straight and "at step 2/4" in caplog.text

    # a run killed before its first checkpoint left config.toml and metrics, nothing to resume: start over
    shutil.rmtree(tmp_path / "auto" / "checkpoints")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        restarted = run(config, resume="auto")
    assert restarted.step == 4 and _metrics(tmp_path / "auto") == straight
    assert "has no checkpoint to resume from; starting the run again" in caplog.text


def test_auto_resume__refuses_foreign_folders_overwrite_and_unknown_values(tiny_teachers, tiny_images, tmp_path):
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "config.toml").write_text('name = "another project"\n')
    config = _config(tiny_teachers, tiny_images, foreign)
    with pytest.raises(ConfigError, match="is not a unic run folder"):
        run(config, resume="auto")
    assert (foreign / "config.toml").read_text() == 'name = "another project"\n'
    with pytest.raises(ConfigError, match="--auto-resume and --overwrite contradict"):
        run(replace(config, out_dir=tmp_path / "new"), resume="auto", overwrite=True)
    with pytest.raises(ConfigError, match="resume='yes': give True, False or 'auto'"):
        run(config, resume="yes")


def test_out_of_memory__one_message_with_the_step_the_checkpoint_and_what_to_change(tiny_images, greedy_teacher,
                                                                                   tmp_path):
    config = _config((greedy_teacher,), tiny_images, tmp_path / "r", image_size=32, drop_path_rate=0.0)
    with pytest.raises(TrainingError) as info:
        run(config)
    message = str(info.value)
    assert message.startswith("out of memory at step 1 on cpu with 4 images per process (can't allocate memory")
    assert "no checkpoint was written yet" in message
    assert "--batch-size 2 --grad-accum-steps 2 (the same global batch)" in message
    assert "--student-dtype bf16" in message and "--try-batch-sizes" in message
    # no allocation error behind it: its traceback would keep the failed step's tensors alive
    assert info.value.__cause__ is None and info.value.__context__ is None
