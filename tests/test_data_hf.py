"""Hugging Face datasets (save_to_disk folders, parquet) and tar shards as training data, down to a distill run."""

from __future__ import annotations

import json
import logging
import os
import tarfile

import numpy as np
import pytest
import torch

from unic_cli.config import DistillConfig
from unic_cli.data import build_train_loader, list_image_folder
from unic_cli.errors import DataError

pa = pytest.importorskip("pyarrow")  # unic reads with pyarrow alone; `datasets` writes most test datasets


def _datasets():
    return pytest.importorskip("datasets")


def _image_rows(folder, corrupt: int | None = None) -> list[dict]:
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p, _ in list_image_folder(folder)]
    if corrupt is not None:
        rows[corrupt] = {"bytes": b"not an image", "path": "broken.jpg"}
    return rows


def _hf_dataset(folder, corrupt: int | None = None):
    datasets = _datasets()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = _image_rows(folder, corrupt)
    return datasets.Dataset.from_dict({"image": rows, "label": list(range(len(rows)))}, features=features)


@pytest.fixture(scope="module")
def hf_inputs(tiny_images, tmp_path_factory) -> dict:
    """The 32 tiny images as a save_to_disk folder, a parquet file (row groups of 8) and a tar shard."""
    root = tmp_path_factory.mktemp("hf")
    ds = _hf_dataset(tiny_images)
    ds.save_to_disk(str(root / "arrow"), max_shard_size="20KB")  # several data-*.arrow files
    ds.to_parquet(str(root / "train.parquet"), batch_size=8)
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for i, (path, _) in enumerate(list_image_folder(tiny_images)):
            tar.add(path, arcname=f"{i:06d}.jpg")
    return {"arrow": root / "arrow", "parquet": root / "train.parquet", "tar": root / "shard-000.tar",
            "folder": tiny_images}


def _all_images(loader, num_batches):
    it = iter(loader)
    return [next(it) for _ in range(num_batches)]


def test_arrow_source__same_pixels_and_order_as_the_folder(hf_inputs):
    assert len(list((hf_inputs["arrow"]).glob("data-*.arrow"))) > 1
    kwargs = dict(image_size=32, batch_size=8, num_workers=0, seed=3, augment="unic")
    folder = _all_images(build_train_loader(hf_inputs["folder"], **kwargs), 4)
    arrow = _all_images(build_train_loader(hf_inputs["arrow"], **kwargs), 4)
    for a, b in zip(folder, arrow):
        assert torch.equal(a.images_BCHW, b.images_BCHW)


def test_parquet_source__block_shuffle_covers_every_image_once_per_epoch(hf_inputs):
    from unic_cli.data import open_image_source

    source = open_image_source(hf_inputs["parquet"])
    assert len(source) == 32 and len(source._start_U) - 1 == 4  # four row groups of 8
    order = source.epoch_order(np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(32))
    groups = [int(i) // 8 for i in order]
    assert all(len(set(groups[k:k + 8])) == 1 for k in range(0, 32, 8))  # each run of 8 is one row group
    loader = build_train_loader(hf_inputs["parquet"], image_size=32, batch_size=8, num_workers=2, seed=0,
                                augment="none")
    batches = _all_images(loader, 5)  # crosses into epoch 2
    assert all(b.images_BCHW.shape == (8, 3, 32, 32) for b in batches) and loader.epoch == 1


def test_hf_sources__corrupt_rows_are_skipped_and_counted(tiny_images, tmp_path):
    ds = _hf_dataset(tiny_images, corrupt=5)
    ds.save_to_disk(str(tmp_path / "arrow"))
    ds.to_parquet(str(tmp_path / "p" / "train.parquet"), batch_size=16)
    for data in (tmp_path / "arrow", tmp_path / "p"):
        loader = build_train_loader(data, image_size=32, batch_size=8, num_workers=0, seed=0, augment="none")
        batches = _all_images(loader, 4)
        assert sum(b.num_skipped for b in batches) == 1 and sum(len(b.images_BCHW) for b in batches) == 31


def test_hf_sources__dataset_dict_folder_names_its_splits(tiny_images, tmp_path):
    _datasets().DatasetDict({"train": _hf_dataset(tiny_images)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict.*dd/train"):
        build_train_loader(tmp_path / "dd", image_size=32, batch_size=8, num_workers=0, seed=0)


# --- damaged files ------------------------------------------------------------------------------


def _write_arrow_folder(folder, images, *, num_files: int = 2, rows_per_batch: int = 4) -> list[list[int]]:
    """A save_to_disk layout written with pyarrow alone: state.json + data-*.arrow IPC streams of small record batches.

    Returns, per file, the byte offset where each record batch ends, as the writer reports it.
    """
    folder.mkdir()
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p in images]
    per_file = -(-len(rows) // num_files)
    names, batch_ends = [], []
    for f in range(num_files):
        names.append(f"data-{f:05d}-of-{num_files:05d}.arrow")
        table = pa.table({"image": rows[f * per_file:(f + 1) * per_file]})
        with pa.OSFile(str(folder / names[-1]), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                ends = []
                for batch in table.to_batches(max_chunksize=rows_per_batch):
                    writer.write_batch(batch)
                    ends.append(sink.tell())
        batch_ends.append(ends)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    return batch_ends


def _write_parquet(path, images) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(exist_ok=True)
    pq.write_table(pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images]}), path,
                   row_group_size=8)


def _cut(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _row_bytes(source) -> list[bytes]:
    return [source.open(i).read() for i in range(len(source))]


# (where data-00000 is cut, rows it keeps): its 16 rows are 4 record batches of 4, then the end-of-stream marker
_ARROW_CUTS = {
    "inside its schema": (lambda ends: 100, 0),
    "inside batch 2": (lambda ends: ends[1] - 100, 4),
    "between batches 2 and 3": (lambda ends: ends[1], 8),
    "inside the end-of-stream marker": (lambda ends: ends[3] + 4, 16),
}


@pytest.mark.parametrize("where", list(_ARROW_CUTS))
def test_arrow_source__damaged_file_is_used_up_to_its_last_whole_batch(tiny_images, tmp_path, caplog, where):
    from unic_cli.data import open_image_source

    images = [p for p, _ in list_image_folder(tiny_images)]
    ends = _write_arrow_folder(tmp_path / "arrow", images)
    size, kept = _ARROW_CUTS[where]
    damaged = tmp_path / "arrow" / "data-00000-of-00002.arrow"
    _cut(damaged, size(ends[0]))
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        source = open_image_source(tmp_path / "arrow")
    assert _row_bytes(source) == [p.read_bytes() for p in images[:kept] + images[16:]]
    warnings = [r.getMessage() for r in caplog.records]
    expected = f"after {kept} rows" if kept else "skipping it"
    assert len(warnings) == 1 and f"{damaged} is unreadable" in warnings[0] and expected in warnings[0], warnings


def test_arrow_source__intact_files_do_not_warn(tiny_images, tmp_path, caplog):
    from unic_cli.data import open_image_source

    images = [p for p, _ in list_image_folder(tiny_images)]
    _write_arrow_folder(tmp_path / "arrow", images)
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        assert _row_bytes(open_image_source(tmp_path / "arrow")) == [p.read_bytes() for p in images]
    assert not caplog.records


def test_arrow_source__nothing_readable_or_a_missing_file_is_a_data_error(tiny_images, tmp_path, caplog):
    from unic_cli.data import open_image_source

    images = [p for p, _ in list_image_folder(tiny_images)]
    _write_arrow_folder(tmp_path / "arrow", images)
    for f in (0, 1):
        _cut(tmp_path / "arrow" / f"data-0000{f}-of-00002.arrow", 50)
    with pytest.raises(DataError, match=r"No readable rows .* 2 files are damaged: .*data-00000-of-00002.arrow "
                                        r"\(.*data-00001-of-00002.arrow") as info:
        open_image_source(tmp_path / "arrow")
    assert info.value.exit_code == 2 and not _warnings(caplog)  # the error says it all
    (tmp_path / "arrow" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(DataError, match=r"1 of the 2 data files listed in .*state.json do not exist, "
                                        r"e.g. '.*data-00001-of-00002.arrow'"):
        open_image_source(tmp_path / "arrow")


@pytest.mark.parametrize("size", [0, 1000, -1])  # empty, inside the first row group, one byte short of the footer
def test_parquet_source__damaged_file_is_skipped_with_a_warning(tiny_images, tmp_path, caplog, size):
    from unic_cli.data import open_image_source

    images = [p for p, _ in list_image_folder(tiny_images)]
    _write_parquet(tmp_path / "p" / "train-0.parquet", images[:16])
    _write_parquet(tmp_path / "p" / "train-1.parquet", images[16:])
    damaged = tmp_path / "p" / "train-0.parquet"
    _cut(damaged, size if size >= 0 else damaged.stat().st_size + size)
    with caplog.at_level(logging.WARNING, logger="unic_cli"):
        source = open_image_source(tmp_path / "p")
        loader = build_train_loader(source, image_size=32, batch_size=8, num_workers=0, seed=0, augment="none")
        batches = _all_images(loader, loader.steps_per_epoch)
    assert _row_bytes(source) == [p.read_bytes() for p in images[16:]]
    assert loader.num_images == 16 and sum(b.num_skipped for b in batches) == 0
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"Parquet file {damaged} is unreadable" in warnings[0], warnings


def test_parquet_source__a_lone_damaged_file_is_a_data_error(tiny_images, tmp_path, caplog):
    from unic_cli.data import open_image_source

    path = tmp_path / "train.parquet"
    _write_parquet(path, [p for p, _ in list_image_folder(tiny_images)])
    _cut(path, path.stat().st_size // 2)  # the review's `head -c`: the footer is gone
    with pytest.raises(DataError, match=f"No readable rows: {path} is damaged .*magic bytes.*; download or copy "
                                        "it again") as info:
        open_image_source(path)
    assert info.value.exit_code == 2 and not _warnings(caplog)


@pytest.mark.parametrize("kind", ["arrow", "parquet", "tar"])
def test_distill__runs_on_hf_datasets_and_tar_shards(kind, hf_inputs, tiny_teachers, tmp_path):
    from unic_cli.checkpoint import load_checkpoint
    from unic_cli.distill import run

    config = DistillConfig.from_sources(None, dict(
        teachers=tiny_teachers, data_dir=hf_inputs[kind], out_dir=tmp_path / "run", student="test_vit", image_size=64,
        batch_size=8, steps=2, num_workers=0, augment="unic", log_every=1, random_init_teachers=True,
        device=os.environ.get("UNIC_TEST_DEVICE", "cpu")))
    result = run(config)
    assert result.status == "done" and result.last_metrics["loss"] is not None
    assert load_checkpoint(tmp_path / "run")["data"]["batch_index"] == 2


def _warnings(caplog) -> list[str]:
    """Warnings and errors logged (other tests may leave INFO logging on for unic_cli)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
