"""`unic export` end to end (a real subprocess) and its error paths (exit 2, one message, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from unic_cli.cli import unic


def test_export__cli_writes_a_loadable_folder(tmp_path, make_unic_checkpoint):
    import torch

    ckpt_path = make_unic_checkpoint()
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    ckpt["scheduler"]["total_steps"] = 10  # step 7 of 10: an interrupted (or still running) run
    torch.save(ckpt, ckpt_path)
    out = tmp_path / "student"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    result = subprocess.run([sys.executable, "-m", "unic_cli", "export", str(ckpt_path.parent.parent), "--out",
                             str(out), "--keep-heads", "tiny_nc"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "local-dir:" in result.stdout and "Traceback" not in result.stderr
    assert result.stderr.count("at step 7 of 10: the run has not finished") == 1, result.stderr
    info = json.loads((out / "unic.json").read_text())
    assert info["heads"]["teachers"] == ["tiny_nc"] and info["finished"] is False


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "does not exist"),
        ("random_pt", "is not a unic checkpoint"),
        ("out_exists", "already exists; pass --overwrite"),
        ("bad_alias", "Did you mean 'tiny_nc'"),
        ("heads_before_the_run", "Did you mean 'tiny_nc'"),  # not "'tiny_nc' does not exist"
    ],
)
def test_export__bad_input_is_one_message_and_exit_2(tmp_path, make_unic_checkpoint, case, message):
    import torch

    source, out, extra = make_unic_checkpoint(), tmp_path / "out", []
    if case == "missing":
        source = tmp_path / "nope"
    elif case == "random_pt":
        source = tmp_path / "random.pt"
        torch.save({"state_dict": {"w": torch.zeros(3)}}, source)
    elif case == "out_exists":
        out.mkdir()
        (out / "something.txt").write_text("keep me")
    else:
        extra = ["--keep-heads", "tiny_n"]
    args = ["export", str(source), "--out", str(out), *extra]
    if case == "heads_before_the_run":  # click reads `--keep-heads a b RUN` as --keep-heads a, RUN=b, extra RUN
        args = ["export", "--keep-heads", "tiny_n", "tiny_nc", str(source), "--out", str(out)]
    result = CliRunner().invoke(unic, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.count("Error") == 1
    if case == "out_exists":
        assert (out / "something.txt").read_text() == "keep me"
    else:
        assert not out.exists()
