"""Which images a dataset holds: folders of files and WebDataset tar shards, as random-access sources.

A source has `len()`, `root` (for messages), `name(i)` (for warnings) and `open(i)` (a path or a
file-like object for `PIL.Image.open`).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from unic_cli.errors import DataError

log = logging.getLogger("unic_cli")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_image_folder(root: Path) -> list[tuple[Path, str]]:
    """All images under `root`, recursively, sorted by relative path, with their class name.

    The class name is the first folder below `root` ("" for images directly in `root`). Hidden files
    and folders (".name", e.g. macOS "._x.jpg" resource forks) are ignored; symlinked folders are
    followed once.

    Raises:
        DataError: `root` is missing, is a file, or holds no image.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Data folder {str(root)!r} does not exist; pass a folder of images.")
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a folder; pass the folder that contains the images.")
    relpaths = []
    seen_dirs = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop: walk each real folder once
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                relpaths.append(name if rel == "." else f"{rel}{os.sep}{name}")
    if not relpaths:
        raise DataError(f"No images found in {str(root)!r} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case).")
    # Sort on "/"-joined parts so the order is the same on every OS and file system.
    relpaths.sort(key=lambda p: p.replace(os.sep, "/"))
    return [(root / p, p.split(os.sep)[0] if os.sep in p else "") for p in relpaths]


class StringTable:
    """Strings packed in one numpy buffer: a Python list of a million strings would be copied page by
    page into every forked worker as reference counts change (the "copy-on-read" leak)."""

    def __init__(self, strings: Sequence[str]) -> None:
        encoded = [t.encode("utf-8", "surrogateescape") for t in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].tobytes().decode("utf-8", "surrogateescape")


class PathTable:
    """A folder of image files as an image source."""

    def __init__(self, root: Path, paths: Sequence[Path]) -> None:
        self.root = str(root)
        self._relpaths = StringTable([os.path.relpath(p, root) for p in paths])

    def __len__(self) -> int:
        return len(self._relpaths)

    def name(self, index: int) -> str:
        return os.path.join(self.root, self._relpaths[index])

    def open(self, index: int) -> str:
        return self.name(index)


def describe_damaged(damaged: Sequence[tuple]) -> str:
    """'a is damaged (why)' or 'N files are damaged: a (why), b (why), ...' from (path, why, ...) tuples."""
    if len(damaged) == 1:
        return f"{damaged[0][0]} is damaged ({damaged[0][1]})"
    more = f", and {len(damaged) - 3} more" if len(damaged) > 3 else ""
    return f"{len(damaged)} files are damaged: {', '.join(f'{d[0]} ({d[1]})' for d in damaged[:3])}{more}"


def warn_damaged(damaged: Sequence[tuple[str, str, int]], *, what: str, unit: str) -> None:
    """One warning per damaged file of a source that still has readable items: (path, why, items kept)."""
    for path, problem, kept in damaged:
        if kept:
            log.warning("%s %s is unreadable after %d %s (%s); using those", what, path, kept, unit, problem)
        else:
            log.warning("%s %s is unreadable (%s); skipping it", what, path, problem)


def _tar_end_problem(shard: str, offset: int) -> str | None:
    """Why a tar archive whose last header ended at `offset` did not end properly; None if it did.

    Python's tarfile stops without an error at a missing, short or invalid header (it takes any of
    them for the end of the archive), so a shard cut at or inside a header would otherwise lose its
    remaining samples silently. A complete archive has its end-of-archive marker there: a zero block
    (GNU tar, Python's tarfile and webdataset's TarWriter write two, padded to a 10 kB record).
    """
    with open(shard, "rb") as f:
        block = os.pread(f.fileno(), tarfile.BLOCKSIZE, offset)
    if block == tarfile.NUL * tarfile.BLOCKSIZE:
        return None
    if not block:
        return f"it ends at byte {offset}, after a member, without tar's end-of-archive marker; cut short?"
    if len(block) < tarfile.BLOCKSIZE:
        where = "its end-of-archive marker" if block == tarfile.NUL * len(block) else "a tar header"
        return f"it ends inside {where} at byte {offset}; cut short?"
    return f"invalid tar header at byte {offset}"


def _stored_whole(member: tarfile.TarInfo) -> bool:
    """A regular file whose bytes follow its header: not a link (never followed), device or folder, and not a
    sparse file, whose header may claim any size (a 1 TB "image" in a 1 kB shard) that a read would allocate."""
    return member.type in (tarfile.REGTYPE, tarfile.AREGTYPE) and member.sparse is None


class TarIndex:
    """WebDataset tar shards as a random-access image source: (shard, data offset, size) per sample.

    Building the index reads only the 512-byte tar headers (the data is seeked over), about 1/200 of
    a shard of 100 kB JPEGs; a sample is then one `pread`. This keeps the exact-resume, per-image
    seeded augmentation and rank sharding of image folders, at the cost of random reads inside the
    shards, which local disks serve as well as a folder of files. The WebDataset convention applies:
    members sharing a key (the path up to the first "." of the file name) form one sample, and its
    first member with an image extension is used; other members (labels, captions) are ignored.

    A damaged shard (cut short, a bad header) gives the samples before the damage, with a warning naming it;
    a `DataError` names the damaged shards when no sample is left.
    """

    def __init__(self, shards: Sequence[Path]) -> None:
        self.root = ", ".join(str(s) for s in shards[:3]) + (" ..." if len(shards) > 3 else "")
        self.shards = [str(s) for s in shards]
        shard_ids, offsets, sizes, names, damaged = [], [], [], [], []
        for shard_id, shard in enumerate(self.shards):
            seen_keys, problem = set(), None
            try:
                with tarfile.open(shard, "r:") as tar:  # "r:" seeks over member data: headers only
                    for member in tar:
                        base = posixpath.basename(member.name)
                        if (not _stored_whole(member) or base.startswith(".")
                                or not base.lower().endswith(IMAGE_EXTENSIONS)):
                            continue
                        key = posixpath.join(posixpath.dirname(member.name), base.split(".", 1)[0])
                        if key in seen_keys:
                            continue
                        seen_keys.add(key)
                        shard_ids.append(shard_id)
                        offsets.append(member.offset_data)
                        sizes.append(member.size)
                        names.append(member.name)
                    problem = _tar_end_problem(shard, tar.offset)
            except (tarfile.TarError, OSError) as err:  # a damaged shard still gives the samples before the damage
                problem = f"{type(err).__name__}: {err}"
            if problem is not None:
                # A member whose data runs past the end of a cut shard is not a sample: drop it here, so
                # that the count below is what training gets.
                file_size = os.path.getsize(shard) if os.path.exists(shard) else 0
                kept = len(seen_keys)
                while shard_ids and shard_ids[-1] == shard_id and offsets[-1] + sizes[-1] > file_size:
                    for column in (shard_ids, offsets, sizes, names):
                        column.pop()
                    kept -= 1
                damaged.append((shard, problem, kept))
        if damaged and not shard_ids:
            raise DataError(f"No readable sample in the tar shard(s) {self.root}: {describe_damaged(damaged)}; "
                            f"copy or write {'them' if len(damaged) > 1 else 'it'} again.")
        warn_damaged(damaged, what="Tar shard", unit="samples")
        self._shard_N = np.asarray(shard_ids, dtype=np.int32)
        self._offset_N = np.asarray(offsets, dtype=np.int64)
        self._size_N = np.asarray(sizes, dtype=np.int64)
        self._names = StringTable(names)

    def __len__(self) -> int:
        return len(self._shard_N)

    def name(self, index: int) -> str:
        return f"{self.shards[self._shard_N[index]]}:{self._names[index]}"

    def open(self, index: int) -> io.BytesIO:
        with open(self.shards[self._shard_N[index]], "rb") as f:
            data = os.pread(f.fileno(), int(self._size_N[index]), int(self._offset_N[index]))
        if len(data) != self._size_N[index]:
            raise OSError(f"shard ends {self._size_N[index] - len(data)} bytes early")
        return io.BytesIO(data)


def _expand_braces(pattern: str) -> list[str]:
    """WebDataset shard patterns: "train-{000..099}.tar" (zero padding kept), nested left to right."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [p for i in range(int(first), int(last) + 1)
            for p in _expand_braces(f"{head}{str(i).zfill(width)}{tail}")]


def open_image_source(data: Path | str):
    """The images behind `data`: a folder of images, WebDataset tar shards, or a locally stored HF dataset.

    Tar shards are a `.tar` file, a brace pattern such as `shards/train-{000000..000146}.tar`, or a
    folder whose top level holds `.tar` files. Hugging Face datasets are a `save_to_disk` folder
    (state.json + data-*.arrow), a `.parquet` file, or a folder whose top level holds `.parquet` files
    (see `unic_cli.data.hf`; needs pyarrow).

    Raises:
        DataError: missing paths, no image, or shards with no image member.
    """
    from unic_cli.data import hf

    path = Path(data).expanduser()
    if hf.is_dataset_dict_folder(path):
        splits = sorted(p.name for p in path.iterdir() if hf.is_hf_disk_folder(p))
        raise DataError(f"{str(path)!r} is a DatasetDict saved with save_to_disk; pass one split's folder, e.g. "
                        f"{str(path / (splits[0] if splits else 'train'))!r} (splits: {', '.join(splits) or 'none'}).")
    if hf.is_hf_disk_folder(path):
        source = hf.ArrowDiskSource(path)
    elif (files := hf.parquet_files(path)) is not None:
        source = hf.ParquetSource(files)
    else:
        source = None
    if source is not None:
        if not len(source):
            raise DataError(f"The Hugging Face dataset {source.root!r} has no rows.")
        return source
    text = str(data)
    if "{" in text and ".." in text:
        shards = [Path(p).expanduser() for p in _expand_braces(text)]
        if missing := [str(p) for p in shards if not p.is_file()]:
            raise DataError(f"{len(missing)} of the {len(shards)} shards of {text!r} do not exist, e.g. "
                            f"{missing[0]!r}; check the pattern.")
    else:
        path = Path(data).expanduser()
        if path.is_file() and path.suffix.lower() == ".tar":
            shards = [path]
        elif path.is_dir() and (shards := sorted(p for p in path.iterdir() if p.suffix.lower() == ".tar"
                                                  and p.is_file() and not p.name.startswith("."))):
            pass
        else:
            entries = list_image_folder(path)
            return PathTable(path, [p for p, _ in entries])
    log.info("Indexing %d tar shard(s) (headers only)", len(shards))
    index = TarIndex(shards)
    if not len(index):
        raise DataError(f"No image member found in the tar shard(s) {index.root} (looked for "
                        f"{', '.join(IMAGE_EXTENSIONS)}, any case).")
    return index
