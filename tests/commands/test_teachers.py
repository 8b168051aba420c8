"""`unic teachers`: listing, JSON, show, check, and the errors a user hits (exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from unic_cli import registry
from unic_cli.cli import unic


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """`--registry` adds folders to a module-level list: keep each test's folders to itself."""
    monkeypatch.setattr(registry, "_user_dirs", [])
    registry.all_cards.cache_clear()
    yield
    registry.all_cards.cache_clear()


def _run(*args):
    result = CliRunner().invoke(unic, list(args))
    return result, result.output  # click >= 8.2: stdout and stderr interleaved


def test_teachers__json_lists_at_least_25_cards():
    result, _ = _run("teachers", "--json")
    cards = json.loads(result.stdout)
    assert result.exit_code == 0 and len(cards) >= 25
    assert {"dinov2_g", "metaclip_h", "efficientnet_lite0", "siglip2_so400m"} <= {c["alias"] for c in cards}


def test_teachers__table_names_every_card_on_one_line():
    result, out = _run("teachers")
    assert result.exit_code == 0
    line = next(l for l in out.splitlines() if l.strip().startswith("dinov2_g_reg4 "))
    assert "vit_giant_patch14_reg4_dinov2.lvd142m" in line and "apache-2.0" in line


def test_teachers_show__unknown_alias_suggests_and_exits_2():
    result, out = _run("teachers", "show", "dinov2_gg")
    assert result.exit_code == 2 and "Did you mean 'dinov2_g'" in out and "Traceback" not in out


def test_teachers_show__resolved_grid_for_a_student():
    result, _ = _run("teachers", "show", "dinov2_g", "--json", "--image-size", "224", "--patch-size", "16")
    resolved = json.loads(result.stdout)["resolved"]
    assert resolved["teacher_input_size"] == [196, 196] and resolved["teacher_feature_grid"] == [14, 14]


def test_teachers_show__explicit_timm_spec():
    result, out = _run("teachers", "show", "timm:test_vit2")
    assert result.exit_code == 0 and "num_register_tokens" in out and "grids match exactly" in out


def test_teachers__malformed_card_names_file_and_field(tmp_path):
    (tmp_path / "my_vit.toml").write_text('source = "timm"\nmodel_id = "test_vit"\nimage_size = "big"\n')
    result, out = _run("teachers", "--registry", str(tmp_path))
    assert result.exit_code == 2 and "my_vit.toml" in out and "image_size" in out and "Traceback" not in out


def test_teachers_check__bad_weights_file_is_one_clear_error(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"garbage")
    result, out = _run("teachers", "check", f"timm:test_vit={path}")
    assert result.exit_code == 2 and "cannot read weights file" in out and "Traceback" not in out


def test_teachers_check__offline_download_names_hub_id_and_fix():
    result, out = _run("teachers", "check", "timm:test_vit")
    assert result.exit_code == 2 and "timm/test_vit.r160_in1k" in out and "=/path/to/weights" in out
    assert "Traceback" not in out


def test_teachers_check__random_init_reports_shapes():
    result, _ = _run("teachers", "check", "timm:test_vit", "--random-init", "--json")
    report = json.loads(result.stdout)
    assert report["tokens"] == {"summary": [2, 64], "patch": [2, 196, 64]} and report["grid"] == [14, 14]


@pytest.mark.parametrize("args", [["--help"], ["teachers"], ["teachers", "--json"], ["teachers", "show", "dinov2_g"]])
def test_cli__help_and_listing_do_not_import_torch(args):
    code = (f"import sys; from click.testing import CliRunner; from unic_cli.cli import unic; "
            f"r = CliRunner().invoke(unic, {args!r}); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_cli__teachers_json_end_to_end_in_a_subprocess():
    unic_bin = os.path.join(os.path.dirname(sys.executable), "unic")
    out = subprocess.run([unic_bin, "teachers", "--json"], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert len(json.loads(out.stdout)) >= 25


@pytest.mark.parametrize("device, message", [
    ("gpu", "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    pytest.param("cuda", "CUDA is not available on this machine; use --device cpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
])
def test_teachers_check__bad_device_is_one_message(device, message):
    result, out = _run("teachers", "check", "timm:test_vit", "--random-init", "--device", device)
    assert result.exit_code == 2 and message in out and "Traceback" not in out


def test_cli__ctrl_c_is_one_line_and_exit_130(tmp_path):
    # a module whose import is interrupted: the same KeyboardInterrupt a Ctrl-C raises mid-command
    (tmp_path / "slow_teacher.py").write_text("raise KeyboardInterrupt\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "unic_cli", "teachers", "check", "py:slow_teacher:make"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip().splitlines()[-1] == "Interrupted.", proc.stderr
    assert "Traceback" not in proc.stderr and "Aborted" not in proc.stderr
