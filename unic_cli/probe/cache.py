"""The on-disk feature cache: one folder of row chunks per (model, split, kind), written as a pass goes.

Shape legend: M rows (images), N patch tokens, D token width.

The cache key is (model identity incl. weights file size/mtime, dataset folder + file list fingerprint,
resolution, feature kind), so a changed model or dataset never hits a stale entry. Each entry is a folder of row
chunks written while the pass runs (`FeatureStore`), so an interrupted extraction (hours on ImageNet) resumes
after its last whole chunk, and at most one chunk per model is held in memory. Probes read entries lazily
(`Features`): one model's features at a time, dense patch tokens memory-mapped (`RowStore`), since they do not
fit in memory at scale. Chunks are safetensors files written by hand from the batches' buffers and read back
memory-mapped; every file is written atomically, and a full disk is one `ProbeError` naming the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from unic_cli.errors import ProbeError
from unic_cli.files import atomic_write

if TYPE_CHECKING:  # types only: the cache keys on a model's identity, it never loads one
    from unic_cli.probe.encoder import ModelRef
    from unic_cli.probe.split import Split

log = logging.getLogger("unic_cli")

# Bump when extraction changes in a way that changes cached features.
FEATURE_VERSION = 2  # 2: an entry is a folder of row chunks (resumable), not one file

# A chunk is flushed once a job has this many bytes of features waiting: at most this much work per model is
# lost to an interrupt, and at most this much host memory per model is held while extracting.
CHUNK_BYTES = 256 * 2**20
_CHUNK_NAME = "rows-{:09d}-{:09d}.safetensors"
_COMPLETE = "complete.json"
_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                 "U8": np.uint8, "BOOL": np.bool_}
_SAFETENSORS_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in (Path(text).name or text))
    return keep[:40] or "model"


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


def _disk_full(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


def _write_atomic(path: Path, data: bytes | Sequence[memoryview], what: str) -> None:
    """Write `data` (bytes, or buffers written one after the other) through a temporary name, then rename:
    a crash never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffers = [data] if isinstance(data, bytes) else data
    try:
        with atomic_write(path) as f:
            for buffer in buffers:
                f.write(buffer)
    except OSError as err:
        if not _disk_full(err):
            raise
        free = shutil.disk_usage(path.parent).free
        size = sum(memoryview(b).nbytes for b in buffers)
        raise ProbeError(f"the disk holding the feature cache {str(path.parent.parent)!r} is full ({_gib(free)} "
                         f"free) while writing {_gib(size)} of {what}; free some space or pass --cache-dir "
                         "on a bigger disk. Chunks already written are kept: the same command resumes") from None


class RowStore:
    """One feature's rows spread over memory-mapped chunk files: rows are read only when taken.

    Dense patch features do not fit in memory at scale (ADE20K train, ViT-G/14 at 448 px: 64 GiB in fp16),
    so probes gather the rows of each batch from here instead of holding the whole array.

    Args:
        parts: one array per chunk, [rows, ...] each (numpy memmaps).
        index: global row numbers this view holds (None: every row, in order).
    """

    def __init__(self, parts: Sequence[np.ndarray], index: np.ndarray | None = None) -> None:
        self.parts = list(parts)
        self.ends = np.cumsum([len(p) for p in self.parts])
        self.starts = self.ends - np.array([len(p) for p in self.parts], dtype=np.int64)
        self.index = index
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.shape = (total if index is None else len(index), *self.parts[0].shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.parts[0].itemsize

    def __getitem__(self, rows: torch.Tensor | slice) -> RowStore:
        """A view of some rows (a bool mask, row numbers or a slice); nothing is read."""
        local = np.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).cpu().numpy()
        if local.dtype == np.bool_:
            local = np.flatnonzero(local)
        return RowStore(self.parts, local if self.index is None else self.index[local])

    def take(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Rows read into memory, as a CPU tensor (one copy per chunk touched, no per-row loop)."""
        local = np.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).cpu().numpy()
        wanted = local if self.index is None else self.index[local]
        part = np.searchsorted(self.ends, wanted, side="right")
        out = np.empty((len(wanted), *self.shape[1:]), dtype=self.parts[0].dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = self.parts[p][wanted[sel] - self.starts[p]]
        return torch.from_numpy(out)

    def load(self) -> torch.Tensor:
        return self.take(slice(None))


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and the byte offset of its data; ValueError when the file is damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        if length > size - 8:
            raise ValueError("header runs past the end of the file")
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        raise ValueError(f"{size} bytes, the header describes {8 + length + end}")
    return header, 8 + length


def _safetensors_buffers(arrays: dict[str, list[np.ndarray]], metadata: dict[str, str]) -> list:
    """A safetensors file as buffers to write one after the other: each tensor is its arrays concatenated along
    the first axis, without making that concatenated copy (nor a serialised one, as the library's `save` would)."""
    header: dict[str, dict] = {"__metadata__": metadata}
    buffers, offset = [], 0
    for name, parts in arrays.items():
        size = sum(a.nbytes for a in parts)
        header[name] = {"dtype": _SAFETENSORS_DTYPES[parts[0].dtype], "data_offsets": [offset, offset + size],
                        "shape": [sum(len(a) for a in parts), *parts[0].shape[1:]]}
        buffers += [np.ascontiguousarray(a).reshape(-1).view(np.uint8).data for a in parts if a.size]
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return [struct.pack("<Q", len(raw)) + raw, *buffers]


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, memory-mapped (copy-on-write: writable for torch, the file never is).

    Raises OSError or ValueError when the file is missing or damaged.
    """
    header, offset = _read_header(path)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype, shape = _NUMPY_DTYPES[info["dtype"]], tuple(info["shape"])
        out[name] = (np.memmap(path, dtype=dtype, mode="c", offset=offset + begin, shape=shape)
                     if end > begin else np.empty(shape, dtype=dtype))
    return out


class FeatureStore:
    """One cache entry: a folder of row chunks `rows-<start>-<end>.safetensors`, then `complete.json`.

    Chunks are written in row order, each atomically, so after an interrupt the folder holds a run of whole
    chunks from row 0: extraction resumes after the last of them. A chunk whose header, size, key or rows do
    not check out (a damaged disk, a stray file) is deleted and extracted again.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.key = folder.name.rsplit("-", 1)[-1]

    @property
    def complete(self) -> bool:
        return (self.folder / _COMPLETE).is_file()

    def chunks(self) -> list[tuple[int, int, Path]]:
        """The valid chunks that continue each other from row 0, as (start, end, path); the rest is deleted."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in sorted(self.folder.glob("rows-*.safetensors")):
            try:
                start, end = (int(x) for x in path.stem.split("-")[1:3])
                meta = _read_header(path)[0].get("__metadata__", {})
                if meta.get("key") != self.key or (int(meta["start"]), int(meta["end"])) != (start, end):
                    raise ValueError("its key or rows do not match its name")
            except (OSError, ValueError, KeyError) as err:
                log.warning("cache chunk %s is damaged (%s): extracting those rows again", path, err)
                path.unlink(missing_ok=True)
                continue
            found.append((start, end, path))
        run, row = [], 0
        for start, end, path in found:
            if start == row:
                run.append((start, end, path))
                row = end
            else:  # not contiguous (chunks of another interrupted pass): redo from `row`
                path.unlink(missing_ok=True)
        return run

    def next_row(self) -> int:
        chunks = self.chunks()
        return chunks[-1][1] if chunks else 0

    def write_chunk(self, start: int, tensors: dict[str, torch.Tensor | Sequence[torch.Tensor]], what: str) -> None:
        """Write rows `start`... of each feature (a tensor, or batches to be concatenated) as one chunk file.

        The safetensors layout is written by hand from the batches' buffers: no concatenated copy and no
        serialised copy of the chunk is made (the library's `save` would hold both, 3x the chunk in memory).
        """
        parts = {k: [v] if isinstance(v, torch.Tensor) else list(v) for k, v in tensors.items()}
        end = start + sum(len(v) for v in next(iter(parts.values())))
        arrays = {name: [b.detach().cpu().contiguous().numpy() for b in batches] for name, batches in parts.items()}
        _write_atomic(self.folder / _CHUNK_NAME.format(start, end),
                      _safetensors_buffers(arrays, {"key": self.key, "start": str(start), "end": str(end)}), what)

    def finish(self, rows: int, meta: dict) -> None:
        _write_atomic(self.folder / _COMPLETE, json.dumps({"rows": rows, **meta}, default=str).encode(), "metadata")

    def arrays(self) -> dict[str, list[np.ndarray]]:
        """Every feature as memory-mapped chunk arrays (copy-on-write: writable for torch, the file never is)."""
        out: dict[str, list[np.ndarray]] = {}
        for _, _, path in self.chunks():
            for name, array in _map_safetensors(path).items():
                out.setdefault(name, []).append(array)
        return out


class Features(Mapping):
    """A complete cache entry, read lazily: `feats["summary"]` reads that feature (all rows) when asked.

    Small features are returned as tensors; `patch` (dense tokens) as a memory-mapped `RowStore`. Nothing is
    kept, so a caller that drops the tensor frees its memory: a probe holds one model's features at a time.
    """

    MAPPED = ("patch",)

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self._arrays = store.arrays()

    def __getitem__(self, name: str) -> torch.Tensor | RowStore:
        rows = RowStore(self._arrays[name])
        return rows if name in self.MAPPED else rows.load()

    def __iter__(self):
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)


class FeatureCache:
    """Feature entries under `root`, one folder per (model identity, split fingerprint, feature kind)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, ref: ModelRef, split: Split, kind: str) -> Path:
        key = _digest({"v": FEATURE_VERSION, "model": ref.identity, "data": split.fingerprint, "kind": kind})
        return self.root / f"{_slug(ref.name)}-{split.name}-{_slug(kind)}-{key}"

    def target_path(self, split: Split, kind: str, size: tuple[int, int] | None, depth_scale: float) -> Path:
        """The cache file of a split's targets: resized to `size` ([M, H, W]), or at their own sizes when `size` is
        None (`RaggedTargets`, another layout under another key and name: never read as the other)."""
        # "png8": depth targets cached before 8-bit PNGs were refused may hold such maps: read them again
        extra = {"scale": depth_scale, "png8": "refused"} if kind == "depth" else {"scale": None}
        layout = {} if size is not None else {"layout": "ragged"}
        key = _digest({"v": FEATURE_VERSION, "data": split.fingerprint, "kind": kind, "size": size, **extra, **layout})
        name = kind if size is not None else f"{kind}-native"
        return self.root / f"targets-{split.name}-{name}-{key}.safetensors"

    @staticmethod
    def features(path: Path) -> Features | None:
        """A complete entry, or None (absent, or only partly extracted)."""
        store = FeatureStore(path)
        if not store.complete:
            return None
        try:
            rows = int(json.loads((path / _COMPLETE).read_text(encoding="utf-8"))["rows"])
        except (OSError, ValueError, KeyError):
            rows = -1
        if store.next_row() != rows:  # a chunk was damaged or deleted since: extract those rows again
            log.warning("cache entry %s lacks rows it once held: extracting them again", path)
            (path / _COMPLETE).unlink(missing_ok=True)
            return None
        return Features(store)

    @staticmethod
    def load(path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (OSError, SafetensorError) as err:  # e.g. a file truncated by a full disk: extract again
            log.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None

    @staticmethod
    def save(path: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        from safetensors.torch import save

        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"meta": json.dumps(meta, default=str)})
        _write_atomic(path, data, "targets")


def _slot(meta: dict) -> tuple | None:
    """What a cache entry stands for apart from its key: (model name, split folder, feature kind, input size,
    pretrained, seed); None when its metadata does not say (such an entry is never removed)."""
    try:
        identity = meta["identity"]
        size = identity["image_size"] if "image_size" in identity else identity["card"]["image_size"]
        return (meta["model"], meta["split"], meta["kind"], size, identity["pretrained"], identity.get("seed"))
    except (KeyError, TypeError):
        return None


def remove_superseded(path: Path, meta: dict) -> list[Path]:
    """Delete the cache entries that the complete entry `path` replaces; returns what was deleted.

    A complete entry with the same slot (`_slot`: model name, split folder, kind, resolution, random-init seed)
    but another key was extracted from other weights (a re-exported student, an updated card), another file
    list of the dataset, or by an older feature version: its key can never match again, so it only takes disk
    space. Entries of other models, datasets, resolutions or seeds are kept, and so are unfinished entries (no
    complete.json: possibly another process extracting now). Single-file entries of feature version 1 with the
    same name prefix are never read by this version and are deleted too.
    """
    slot = _slot(meta)
    prefix = path.name.rsplit("-", 1)[0]
    if slot is None or not path.parent.is_dir():
        return []
    removed = []
    for other in sorted(path.parent.iterdir()):
        if other == path or other.name.rsplit("-", 1)[0] != prefix:
            continue
        if other.is_file() and other.suffix == ".safetensors":  # feature version 1
            other.unlink(missing_ok=True)
            removed.append(other)
            continue
        try:
            other_meta = json.loads((other / _COMPLETE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(other_meta, dict) and _slot(other_meta) == slot:
            # readers that mapped its chunks keep them (POSIX); a failed delete only leaves the space used
            shutil.rmtree(other, ignore_errors=True)
            removed.append(other)
    if removed:
        log.info("removed %d superseded cache entr%s of %s (%s/, %s): %s", len(removed),
                 "y" if len(removed) == 1 else "ies", meta["model"], Path(meta["split"]).name, meta["kind"],
                 ", ".join(p.name for p in removed))
    return removed
