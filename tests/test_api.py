"""The Python API as a notebook or script uses it: configs built directly, errors, results, repeated runs, state."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from unic_cli.config import DistillConfig, ProbeConfig
from unic_cli.distill import run
from unic_cli.errors import ConfigError, DataError, ExportError

ROOT = Path(__file__).resolve().parent.parent


def _tiny(images: Path, out: Path, **overrides) -> DistillConfig:
    """The smallest real run: one random test_vit teacher, a test_vit student at 32 px, 2 steps."""
    values = dict(teachers=("timm:test_vit",), data_dir=images, out_dir=out, student="test_vit", image_size=32,
                  batch_size=8, steps=2, num_workers=0, augment="none", log_every=1, random_init_teachers=True,
                  device="cpu")
    return DistillConfig(**{**values, **overrides})


def test_config__built_directly_coerces_like_from_sources(tmp_path):
    config = DistillConfig(teachers="timm:test_vit", data_dir=str(tmp_path), out_dir="~/runs/a", crop_scale=[0.5, 1])
    assert config.teachers == ("timm:test_vit",)  # one spec, not a tuple of its characters
    assert config.data_dir == tmp_path and config.out_dir == Path("~/runs/a").expanduser()
    assert config.crop_scale == (0.5, 1.0)
    assert config == DistillConfig.from_sources(None, {"teachers": "timm:test_vit", "data_dir": str(tmp_path),
                                                       "out_dir": "~/runs/a", "crop_scale": [0.5, 1]})
    assert ProbeConfig(models="timm:test_vit", tasks="knn", data_dir=str(tmp_path)).tasks == ("knn",)


def test_config__built_directly_with_wrong_types_lists_each(tmp_path):
    with pytest.raises(ConfigError) as err:
        DistillConfig(teachers=("a",), data_dir=tmp_path, batch_size="8", standardize="yes")
    assert err.value.problems == ["batch_size must be int, got '8'", "standardize must be bool, got 'yes'"]


def test_config__unknown_flag_names_the_close_field(tmp_path):
    with pytest.raises(TypeError, match="no field 'batch_sise'; did you mean 'batch_size'"):
        DistillConfig.from_sources(None, {"teachers": ("a",), "data_dir": tmp_path, "batch_sise": 4})


def test_run__validates_a_directly_built_config_before_anything_loads(tiny_images, tmp_path):
    with pytest.raises(ConfigError, match="--batch-size must be >= 1, got 0"):
        run(_tiny(tiny_images, tmp_path / "run", batch_size=0))
    assert not (tmp_path / "run").exists()


def test_plan_distillation__validates_a_directly_built_config(tiny_images, tmp_path):
    from unic_cli.plan import plan_distillation

    with pytest.raises(ConfigError, match="--batch-size must be >= 1, got 0"):
        plan_distillation(_tiny(tiny_images, tmp_path / "run", batch_size=0))


def _global_state() -> dict:
    return {"sigint": signal.getsignal(signal.SIGINT), "sigterm": signal.getsignal(signal.SIGTERM),
            "threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "handlers": list(logging.getLogger("unic_cli").handlers), "level": logging.getLogger("unic_cli").level}


def test_run__twice_in_a_loop_leaves_the_process_as_found(tiny_images, tmp_path, capsys):
    before = _global_state()
    torch.manual_seed(123)
    expected = torch.rand(3)  # the caller's own random stream
    torch.manual_seed(123)
    results = [run(_tiny(tiny_images, tmp_path / f"seed{seed}", seed=seed)) for seed in (0, 1)]
    assert torch.equal(torch.rand(3), expected)  # run() seeded torch inside, and gave the stream back
    assert _global_state() == before
    assert capsys.readouterr().out == ""  # the library prints nothing
    assert [(r.status, r.step, r.total_steps) for r in results] == [("done", 2, 2)] * 2
    assert results[0].checkpoint.is_file() and results[0].run_dir == tmp_path / "seed0"
    assert results[0].last_metrics["loss"] != results[1].last_metrics["loss"]  # the seeds differ
    assert set(results[0].last_metrics["teachers"]["t0"]) >= {"loss", "coeff"}


def test_run__from_a_worker_thread_installs_no_signal_handler(tiny_images, tmp_path):
    outcome = {}

    def work():
        try:
            outcome["result"] = run(_tiny(tiny_images, tmp_path / "run"))
        except BaseException as err:  # noqa: BLE001 - the assertion below shows it
            outcome["error"] = err

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert "error" not in outcome and outcome["result"].status == "done"
    assert signal.getsignal(signal.SIGINT) is before


def test_run__resuming_a_finished_run_builds_no_teacher(tiny_images, tmp_path, monkeypatch):
    config = _tiny(tiny_images, tmp_path / "run")
    first = run(config)

    def fail(*args, **kwargs):
        raise AssertionError("a finished run built its teachers and student again")

    monkeypatch.setattr("unic_cli.distill.build_trainer", fail)
    again = run(config, resume=True)
    assert (again.status, again.step, again.total_steps) == ("done", 2, 2)
    assert again.last_metrics == first.last_metrics and again.checkpoint.is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_load_teacher__cuda_without_cuda_is_a_config_error():
    from unic_cli.teachers import load_teacher

    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_teacher("timm:test_vit", pretrained=False, device="cuda")


def test_load_teacher__is_in_eval_mode_and_takes_auto_and_torch_devices():
    from unic_cli.teachers import load_teacher

    teacher = load_teacher("timm:test_vit", grid=(2, 2), pretrained=False, device="auto")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    tokens = load_teacher("timm:test_vit", grid=(2, 2), pretrained=False, device=torch.device("cpu"))(
        torch.zeros(2, 3, 40, 50, dtype=torch.uint8))
    assert tokens.summary_BD.shape == (2, 64) and tokens.patch_BND.shape == (2, 4, 64)


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"image_size": 0}, {"num_workers": -1}, {"world_size": 0},
                                 {"batch_size": 2.0}])
def test_build_train_loader__rejects_bad_sizes_up_front(tiny_images, bad):
    from unic_cli.data import build_train_loader

    args = {"image_size": 32, "batch_size": 4, "num_workers": 0, "seed": 0, **bad}
    name = next(iter(bad))
    with pytest.raises(DataError, match=f"{name} must be an integer >= "):
        build_train_loader(tiny_images, **args)


def test_build_eval_loader__rejects_bad_sizes_up_front(tiny_images):
    from unic_cli.data import build_eval_loader

    with pytest.raises(DataError, match="batch_size must be an integer >= 1, got 0"):
        build_eval_loader(tiny_images, image_size=32, batch_size=0)


def test_export_student__one_head_given_as_a_string(make_unic_checkpoint, tmp_path):
    from unic_cli import export_student, load_student

    ckpt = make_unic_checkpoint()
    out = export_student(ckpt, tmp_path / "student", keep_heads="t0")
    assert list(load_student(out).heads) == ["tiny_a"]
    with pytest.raises(ExportError, match="'nope' is not a teacher of this run"):
        export_student(ckpt, tmp_path / "other", keep_heads="nope")


def test_unic_cli__dir_lists_the_lazy_api():
    import unic_cli

    assert {"export_student", "load_student", "__version__"} <= set(dir(unic_cli))


@pytest.mark.slow  # a fresh interpreter pays every import (about 10 s on 2 busy cores)
def test_api__a_script_imports_no_ui_and_prints_nothing(tiny_images, tmp_path):
    """A fresh interpreter, as a notebook starts: `import unic_cli` is light, and the whole journey (config, run,
    export, load) imports neither click nor rich and writes nothing to stdout or stderr."""
    script = f"""
import sys
import unic_cli
assert "torch" not in sys.modules, "import unic_cli imported torch"
from unic_cli.config import DistillConfig
from unic_cli.distill import run
from unic_cli import export_student, load_student
config = DistillConfig(teachers="timm:test_vit", data_dir={str(tiny_images)!r}, out_dir={str(tmp_path / 'run')!r},
                       student="test_vit", image_size=32, batch_size=8, steps=1, num_workers=0,
                       random_init_teachers=True, device="cpu")
result = run(config)
student = load_student(export_student(result.run_dir, {str(tmp_path / 'student')!r}))
ui = sorted(m for m in sys.modules if m.split(".")[0] in ("click", "rich"))
assert not ui, ui
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
