"""Error paths found by the s7 CLI fuzz audit: each is one message naming the value, exit 2, no traceback, before
anything heavy loads, and nothing left on disk."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from unic_cli.cli import unic


def _fails(args: list[str], *messages: str) -> str:
    result = CliRunner().invoke(unic, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for message in messages:
        assert message in result.output, result.output
    return result.output


@pytest.fixture
def in_empty_cwd(tmp_path, monkeypatch):
    """An empty working folder with an empty `data/` in it; the test checks that nothing else appears there."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# "--batch-size 0" is a second mistake in every command line: were the one under test missed, the command still
# stops at validation instead of training a default-sized model
DISTILL = ["distill", "-t", "timm:test_vit", "--data", "data", "--out", "run", "--batch-size", "0"]
PROBE = ["probe", "timm:test_vit", "--task", "knn", "--batch-size", "0"]


@pytest.mark.parametrize(("args", "message"), [
    ([*DISTILL, "--base-lr", "nan"], "--base-lr must be a finite number, got nan"),
    ([*DISTILL, "--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["bench", "-t", "timm:test_vit", "--batch-size", "0", "--grad-clip", "nan"],
     "--grad-clip must be a finite number, got nan"),
    ([*PROBE, "--data", "data", "--depth-scale", "inf"],
     "--depth-scale must be a finite number, got inf"),
    ([*DISTILL, "--ladder-hidden", str(10**20)], "--ladder-hidden 100000000000000000000 does not fit in 64 bits"),
])
def test_numbers__nan_inf_and_overflow_are_refused(in_empty_cwd, args, message):
    _fails(args, message)


@pytest.mark.parametrize(("args", "message"), [
    ([*DISTILL, "--out", ""], "--out is empty ('')"),
    ([*DISTILL, "--data", " "], "--data is empty (' ')"),
    (["export", "run", "--out", ""], "Invalid value for '--out' / '-o': '' is empty; give a path"),
    ([*PROBE, "--data", ""], "'--data' / '--data-dir': '' is empty"),
    (["demo", "--out", ""], "'' is empty; give a path"),
    (["--registry", "", "teachers"], "Invalid value for '--registry': '' is empty"),
    (["distill", "--config", ""], "Invalid value for '--config': '' is empty"),
    ([*PROBE, "", "--data", "data"], "MODEL '' is empty"),
])
def test_paths__an_empty_string_is_not_the_current_folder(in_empty_cwd, args, message):
    _fails(args, message)


def test_config_file__bad_bytes_another_command_and_wrong_types_name_the_file(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    _fails(["distill", "--config", str(binary)], f"cannot read config file {str(binary)!r}", "give a TOML file")
    other = tmp_path / "export.toml"
    other.write_text('command = "export"\nbatch_size = "big"\n')
    _fails(["distill", "--config", str(other), "-t", "timm:test_vit", "--data", str(tmp_path)],
           "is a `unic export` config, not a `unic distill` one", f"{other}: batch_size must be int, got 'big'")
    nan = tmp_path / "nan.toml"
    nan.write_text('command = "probe"\nknn_temperature = nan\n')
    _fails([*PROBE, "--data", str(tmp_path), "--config", str(nan)],
           f"{nan}: knn_temperature must be a finite number, got nan")


def test_outputs__inside_the_data_are_refused(in_empty_cwd):
    _fails([*DISTILL, "--out", "data/run"], "--out 'data/run' is inside --data 'data'")
    (in_empty_cwd / "data" / "train").mkdir()
    _fails([*PROBE, "--data", "data", "--out", "data/train/x"], "--out 'data/train/x' is inside the data split")


def test_distill__contradictions_and_empty_choices(in_empty_cwd):
    _fails([*DISTILL, "--resume", "--overwrite"], "--resume with --overwrite")
    _fails([*DISTILL, "--json"], "--json prints the --dry-run plan")
    _fails([*DISTILL, "--ladder-blocks", ",,"], "--ladder-blocks must be 'all', 'last' or block indices")
    _fails([*DISTILL, "-t", "timm:test_vit,timm:test_vit2"],
           "give several teachers separated by spaces: --teachers timm:test_vit timm:test_vit2")
    _fails(["distill", "-t", "dinov2_s?image_size=0", *DISTILL[3:]], "image_size must be positive, got 0")


def test_output_folders__under_a_file_name_the_flag(tmp_path):
    (tmp_path / "a_file").write_text("")
    _fails(["bench", "-t", "timm:test_vit", "--batch-size", "0", "--profile", str(tmp_path / "a_file" / "prof")],
           "--profile", "cannot be created", "a_file' is a file")
    _fails([*PROBE, "--data", str(tmp_path), "--cache-dir", str(tmp_path / "a_file")], "--cache-dir ")


def test_teachers__an_alias_as_subcommand_points_at_show():
    _fails(["teachers", "dinov2_g"], "to show one card: unic teachers show dinov2_g")


def test_teachers_check__bad_spec_and_device_are_reported_before_torch_loads():
    code = ("import sys\nfrom click.testing import CliRunner\nfrom unic_cli.cli import unic\n"
            "r = CliRunner().invoke(unic, ['teachers', 'check', 'dinov2_gg', '--device', 'gpu'])\n"
            "print(r.exit_code, 'torch' in sys.modules)\nprint(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}).stdout
    assert out.startswith("2 False"), out
    assert "Did you mean 'dinov2_g'" in out and "--device must be auto, cpu, cuda or cuda:N, got 'gpu'" in out


def test_demo__an_out_under_a_file_and_an_absent_cuda_are_refused_before_anything_is_written(tmp_path):
    import torch

    (tmp_path / "afile.txt").write_text("x")
    _fails(["demo", "--out", str(tmp_path / "afile.txt" / "x")], "afile.txt' is a file")
    if not torch.cuda.is_available():
        _fails(["demo", "--out", str(tmp_path / "d"), "--device", "cuda"], "CUDA is not available")
        assert not (tmp_path / "d").exists()  # no .unic-demo marker, no data/ left behind


def test_distill__sizes_that_cannot_be_built_are_one_message(tiny_images, tmp_path):
    base = ["distill", "-t", "timm:test_vit", "--random-init-teachers", "--student", "test_vit", "--data",
            str(tiny_images), "--out", str(tmp_path / "r"), "--batch-size", "4", "--steps", "1", "--num-workers", "0"]
    result = CliRunner().invoke(unic, [*base, "--image-size", "32", "--ladder-hidden", "1000000000000"])
    assert result.exit_code == 1 and "out of memory building the student, its ladder and the teachers" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    output = _fails([*base, "--image-size", "1099511627776"], "cannot be built as a ViT student at --image-size")
    assert "frame #" not in output  # torch's C++ stack is not part of the message
    _fails([*base, "--image-size", "32", "--base-lr", "1e308"], "overflows; AdamW learning rates are around")
    assert not (tmp_path / "r").exists()


def test_teachers_check__blank_images_that_do_not_fit_are_one_message():
    result = CliRunner().invoke(unic, ["teachers", "check", "timm:test_vit", "--random-init", "--image-size",
                                       "160000"])
    assert result.exit_code == 2 and "do not fit on cpu" in result.output and "lower --image-size" in result.output
    assert "Traceback" not in result.output


def test_config_file__huge_integers_are_one_message_and_int64_seeds_pass(in_empty_cwd):
    config = in_empty_cwd / "data" / "a.toml"
    config.write_text(f"base_lr = {10**400}\nlog_every = {10**300}\nseed = {-2**63}\n")
    output = _fails([*DISTILL, "--config", str(config)], "base_lr must be a finite number, got an integer of 401 "
                    "digits", "log_every 100000000000... (301 digits) does not fit in 64 bits")
    assert "seed" not in output  # -2**63 is a valid 64-bit seed


def test_distill__out_inside_a_tar_shard_folder_is_allowed(tmp_path):
    # only a folder read as image files turns the run's plots into training images
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "train-000.tar", "w"):
        pass
    result = CliRunner().invoke(unic, ["distill", "-t", "timm:test_vit", "--data", str(shards), "--out",
                                       str(shards / "run"), "--batch-size", "0"])
    assert result.exit_code == 2 and "is inside --data" not in result.output and "--batch-size" in result.output
