"""Locally stored Hugging Face datasets as random-access image sources: `save_to_disk` folders and parquet files.

Only `pyarrow` is needed (the `hf` extra), not `datasets`. Nothing is read up front but metadata: a
`load_from_disk` folder's `data-*.arrow` files (Arrow IPC streams) are memory-mapped and their record batches
indexed zero-copy, so a sample is one slice of the mapping; parquet files contribute their footers (row
groups and row counts), and a sample is read with its whole row group, which a small per-process cache keeps
for the next samples. Parquet sources therefore shuffle in blocks (`epoch_order`): row groups in a seeded
random order, the rows of each row group shuffled among themselves, so that a decoding worker reads each row
group about once per epoch instead of once per image.

The image column is the dataset's `Image` feature (read from the schema's "huggingface" metadata), else a
column named image/img/jpg/jpeg/png/webp; HF stores an image as a struct {bytes, path}, and a row whose bytes
are missing falls back to its path (relative to the dataset folder). Undecodable or missing images raise
OSError, so the loader skips and counts them like unreadable files in a folder. A damaged file is handled like a
damaged tar shard: an Arrow file gives its complete record batches before the damage, a parquet file without a
readable footer is skipped, each with a warning, and a `DataError` names the files when no row is left.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unic_cli.data.source import describe_damaged, warn_damaged
from unic_cli.errors import DataError

log = logging.getLogger("unic_cli")

_IMAGE_NAMES = ("image", "img", "jpg", "jpeg", "png", "webp")
_ROW_GROUP_CACHE = 2  # row groups kept per process (a batch mostly comes from one)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401  (submodules used below)
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise DataError("Reading Hugging Face datasets (save_to_disk folders, parquet) needs pyarrow: "
                        "pip install 'unic-cli[hf]' (or pip install pyarrow).") from None
    return pyarrow


def is_hf_disk_folder(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


def is_dataset_dict_folder(path: Path) -> bool:
    return path.is_dir() and (path / "dataset_dict.json").is_file()


def _image_column(schema, origin: str) -> str:
    meta = (schema.metadata or {}).get(b"huggingface")
    if meta:
        features = json.loads(meta).get("info", {}).get("features", {})
        for name, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") == "Image":
                return name
    for name in schema.names:
        if name.lower() in _IMAGE_NAMES:
            return name
    raise DataError(f"{origin} has no image column (an `Image` feature, or a column named "
                    f"{'/'.join(_IMAGE_NAMES)}); its columns are {schema.names}. Mark the image column with "
                    f"datasets: `ds.cast_column(NAME, datasets.Image())` (or `ds.rename_column(NAME, 'image')`), "
                    f"then save the dataset again.")


def _image_bytes(value, root: str) -> io.BytesIO | str:
    """An HF image cell ({bytes, path} struct, raw bytes, or a path) -> what PIL.Image.open takes."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        path = value.get("path")
        if path:
            return path if os.path.isabs(path) else os.path.join(root, path)
        raise OSError("the row holds no image (bytes and path are both empty)")
    if isinstance(value, (bytes, bytearray)) and value:
        return io.BytesIO(value)
    if isinstance(value, str) and value:
        return value if os.path.isabs(value) else os.path.join(root, value)
    raise OSError("the row holds no image")


class _LazyFiles:
    """Per-process file handles: dropped on pickling, reopened on first use in each worker.

    Rows are stored in U chunks (files or row groups); `_start_U` holds each chunk's first row index, plus the
    total at the end.
    """

    _open: dict
    _start_U: np.ndarray

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return int(self._start_U[-1])

    def _locate(self, index: int) -> tuple[int, int]:
        """(chunk, row within the chunk) of a global row index."""
        u = int(np.searchsorted(self._start_U, index, side="right")) - 1
        return u, index - int(self._start_U[u])


class ArrowDiskSource(_LazyFiles):
    """A `Dataset.save_to_disk` folder (state.json + data-*.arrow) as a random-access image source.

    A damaged Arrow file (cut short, or not an Arrow stream) is used up to its last complete record batch, with
    a warning naming it, as a damaged tar shard is; a listed file that is missing is a `DataError`.
    """

    def __init__(self, folder: Path) -> None:
        pa = _pyarrow()
        self.root = str(folder)
        state = json.loads((folder / "state.json").read_text())
        listed = [str(folder / f["filename"]) for f in state.get("_data_files", [])]
        if not listed:
            raise DataError(f"{self.root!r} lists no data files in state.json; is it a `save_to_disk` folder?")
        if missing := [p for p in listed if not os.path.isfile(p)]:
            raise DataError(f"{len(missing)} of the {len(listed)} data files listed in {self.root}/state.json do "
                            f"not exist, e.g. {missing[0]!r}; copy the whole folder again.")
        self._open = {}
        self.files, batches, starts, column, damaged = [], [], [0], None, []
        for path in listed:
            num_batches, num_rows, schema, problem = _read_stream_index(pa, path)
            if problem is not None:
                damaged.append((path, problem, num_rows))
            if num_rows:
                column = column or _image_column(schema, self.root)
                self.files.append(path)
                batches.append(num_batches)
                starts.append(starts[-1] + num_rows)
        if damaged and not self.files:
            raise DataError(f"No readable rows in the Hugging Face dataset {self.root!r}: "
                            f"{describe_damaged(damaged)}; copy the folder again or re-create it with save_to_disk.")
        warn_damaged(damaged, what="Arrow file", unit="rows")
        self.column = column
        self._batches_F = np.asarray(batches, dtype=np.int64)  # complete record batches per file
        self._start_U = np.asarray(starts, dtype=np.int64)  # one chunk per file

    def name(self, index: int) -> str:
        f, row = self._locate(index)
        return f"{self.files[f]}:row {row}"

    def open(self, index: int):
        pa = _pyarrow()
        f, row = self._locate(index)
        if f not in self._open:
            # Only the batches indexed: a damaged file fails past them (read_all would raise).
            reader = pa.ipc.open_stream(pa.memory_map(self.files[f]))
            batches = [reader.read_next_batch() for _ in range(int(self._batches_F[f]))]
            self._open[f] = pa.Table.from_batches(batches, schema=reader.schema).column(self.column)
        return _image_bytes(self._open[f][row].as_py(), self.root)


_ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # the IPC stream's end-of-stream marker


def _read_stream_index(pa, path: str):
    """(complete record batches, their rows, schema or None, problem or None) of an Arrow IPC stream file.

    Touches only the batches' metadata (the file is memory-mapped). The problem is None only when the stream
    ends with its end-of-stream marker right after the last batch: pyarrow's reader takes a file cut exactly
    between two batches for a complete stream, so without this check such a file would lose rows silently.
    """
    num_batches = num_rows = 0
    schema = None
    try:
        source = pa.memory_map(path)
        reader = pa.ipc.open_stream(source)
        schema, end = reader.schema, source.tell()
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            num_batches, num_rows, end = num_batches + 1, num_rows + batch.num_rows, source.tell()
        size = source.size()
        source.seek(end)
        if source.read(len(_ARROW_EOS)) != _ARROW_EOS or size != end + len(_ARROW_EOS):
            return num_batches, num_rows, schema, (f"its stream stops at byte {end} of {size} without Arrow's "
                                                   "end-of-stream marker; cut short?")
    except (OSError, pa.ArrowException) as err:
        return num_batches, num_rows, schema, f"{type(err).__name__}: {err}"
    return num_batches, num_rows, schema, None


class ParquetSource(_LazyFiles):
    """Parquet files (e.g. a dataset's `data/train-*.parquet`) as an image source read by row group."""

    def __init__(self, files: Sequence[Path]) -> None:
        pa = _pyarrow()
        self.files = [str(f) for f in files]
        self.root = ", ".join(self.files[:3]) + (" ..." if len(self.files) > 3 else "")
        self._open, self._cache = {}, OrderedDict()
        readable, file_ids, groups, starts, column, damaged = [], [], [], [0], None, []
        for path in self.files:
            try:
                meta = pa.parquet.ParquetFile(path)  # the footer only
            except (OSError, pa.ArrowException) as err:
                # Without its footer (at the end of the file) a parquet file's rows cannot be located at all.
                damaged.append((path, f"{type(err).__name__}: {err}"))
                continue
            column = column or _image_column(meta.schema_arrow, path)
            f = len(readable)
            readable.append(path)
            for g in range(meta.metadata.num_row_groups):
                file_ids.append(f)
                groups.append(g)
                starts.append(starts[-1] + meta.metadata.row_group(g).num_rows)
        if damaged and not readable:
            origin = f" in the parquet files {self.root}" if len(self.files) > 1 else ""
            raise DataError(f"No readable rows{origin}: {describe_damaged(damaged)}; download or copy "
                            f"{'them' if len(damaged) > 1 else 'it'} again.")
        for path, problem in damaged:
            log.warning("Parquet file %s is unreadable (%s); skipping it", path, problem)
        self.files = readable
        self.column = column
        self._file_G, self._group_G = np.asarray(file_ids, np.int32), np.asarray(groups, np.int32)
        self._start_U = np.asarray(starts, dtype=np.int64)  # one chunk per row group

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cache": OrderedDict()}

    def name(self, index: int) -> str:
        g, row = self._locate(index)
        return f"{self.files[self._file_G[g]]}:row group {self._group_G[g]}, row {row}"

    def open(self, index: int):
        pa = _pyarrow()
        g, row = self._locate(index)
        if g not in self._cache:
            f = int(self._file_G[g])
            if f not in self._open:
                self._open[f] = pa.parquet.ParquetFile(self.files[f])
            self._cache[g] = self._open[f].read_row_group(int(self._group_G[g]), columns=[self.column]).column(0)
            while len(self._cache) > _ROW_GROUP_CACHE:
                self._cache.popitem(last=False)
        return _image_bytes(self._cache[g][row].as_py(), os.path.dirname(self.files[self._file_G[g]]))

    def epoch_order(self, rng: np.random.Generator) -> np.ndarray:
        """Row groups in random order, rows shuffled within each: every image once, row groups read ~once."""
        order = []
        for g in rng.permutation(len(self._start_U) - 1):
            start, end = self._start_U[g], self._start_U[g + 1]
            order.append(start + rng.permutation(end - start))
        return np.concatenate(order) if order else np.zeros(0, dtype=np.int64)


def parquet_files(path: Path) -> list[Path] | None:
    """The parquet files behind `path`: a .parquet file, or a folder holding them at its top level (one split)."""
    if path.is_file() and path.suffix.lower() == ".parquet":
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.parquet") if p.is_file() and not p.name.startswith("."))
        return files or None
    return None
