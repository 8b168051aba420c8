"""Hugging Face datasets (save_to_disk folders, parquet) and tar shards as training data, down to a distill run."""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import torch

from unic_cli.config import DistillConfig
from unic_cli.data import build_train_loader, list_image_folder
from unic_cli.errors import DataError

datasets = pytest.importorskip("datasets")  # the writer; unic reads with pyarrow alone
pytest.importorskip("pyarrow")


def _image_rows(folder, corrupt: int | None = None) -> list[dict]:
    rows = [{"bytes": p.read_bytes(), "path": p.name} for p, _ in list_image_folder(folder)]
    if corrupt is not None:
        rows[corrupt] = {"bytes": b"not an image", "path": "broken.jpg"}
    return rows


def _hf_dataset(folder, corrupt: int | None = None):
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
    datasets.DatasetDict({"train": _hf_dataset(tiny_images)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match="DatasetDict.*dd/train"):
        build_train_loader(tmp_path / "dd", image_size=32, batch_size=8, num_workers=0, seed=0)


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
