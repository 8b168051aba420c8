"""Probe datasets on disk: the splits of a DATA folder, their layout checks, and their cache fingerprint.

Classification splits are class folders (`split/<class>/**/<image>`, class index = sorted folder order); dense
splits are `split/images/*` paired by file stem with `split/masks/*.png` (seg) or `split/depth/*.{png,npy}`
(depth). Every layout problem is a `DataError` naming the folder and the expected layout, raised before any
model loads. No tensors here: file lists only.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from unic_cli.data import IMAGE_EXTENSIONS, list_image_folder
from unic_cli.errors import DataError

DEPTH_EXTENSIONS = (".png", ".npy")


@dataclass(frozen=True)
class Split:
    """One split of a probe dataset: image files, and labels (classification) or target files (dense)."""

    name: str
    root: Path
    images: tuple[Path, ...]
    labels: tuple[int, ...] = ()
    classes: tuple[str, ...] = ()
    targets: tuple[Path, ...] = ()

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the folder and its file list (names, sizes, mtimes): a changed file changes the key."""
        h = hashlib.sha256(str(self.root.resolve()).encode())
        for path in (*self.images, *self.targets):
            st = path.stat()
            h.update(f"{path.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def find_splits(data_dir: Path, *, need_train: bool, eval_split: str | None) -> tuple[Path | None, Path]:
    """The train folder (None when not needed) and the evaluation folder (`eval_split`, else test, else val)."""
    if not data_dir.is_dir():
        raise DataError(f"--data {str(data_dir)!r} is not a folder; it must hold train/ and val/ or test/")
    problems = []
    train = data_dir / "train"
    if need_train and not train.is_dir():
        problems.append(f"{str(data_dir)!r} has no train/ split")
    if eval_split is not None:
        evaluation = data_dir / eval_split
        if not evaluation.is_dir():
            problems.append(f"{str(data_dir)!r} has no {eval_split}/ split (from --eval-split)")
    else:
        evaluation = next((data_dir / s for s in ("test", "val") if (data_dir / s).is_dir()), data_dir / "val")
        if not evaluation.is_dir():
            problems.append(f"{str(data_dir)!r} has neither a val/ nor a test/ split")
    if problems:
        found = sorted(p.name + "/" for p in data_dir.iterdir() if p.is_dir())
        raise DataError("; ".join(problems) + f" (found: {', '.join(found) or 'no folders'}). Expected "
                        "DIR/train/ plus DIR/val/ or DIR/test/: class folders for knn/linear/zeroshot, "
                        "images/ + masks/ for seg, images/ + depth/ for depth.")
    return (train if need_train else None), evaluation


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def _few(names: Sequence[str], n: int = 5) -> str:
    shown = ", ".join(map(str, names[:n]))
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def list_class_split(split_dir: Path) -> Split:
    """A class-folder split: `split_dir/<class>/**/<image>`; class index = sorted folder order."""
    folders = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    if "images" in folders and {"masks", "depth"} & folders and folders <= {"images", "masks", "depth"}:
        targets = sorted(folders - {"images"})
        tasks = " or ".join(f"--task {'seg' if t == 'masks' else 'depth'}" for t in targets)
        raise DataError(f"{str(split_dir)!r} holds images/ + {'/ + '.join(targets)}/ (the seg/depth layout), not "
                        f"class folders; knn, linear and zeroshot need {split_dir.name}/<class>/<image>: use {tasks}")
    entries = list_image_folder(split_dir)
    loose = [p.name for p, c in entries if not c]
    if loose:
        raise DataError(f"{str(split_dir)!r} has images outside class folders ({_few(loose)}); knn, linear and "
                        f"zeroshot expect {split_dir.name}/<class>/<image> (for seg or depth use --task seg|depth)")
    classes = sorted({c for _, c in entries})
    index = {c: i for i, c in enumerate(classes)}
    return Split(split_dir.name, split_dir, tuple(p for p, _ in entries), tuple(index[c] for _, c in entries),
                 tuple(classes))


def check_same_classes(train: Split, evaluation: Split) -> None:
    """Class folders must be the same in both splits, or labels would silently mean different classes."""
    if train.classes == evaluation.classes:
        return
    only_train = sorted(set(train.classes) - set(evaluation.classes))
    only_eval = sorted(set(evaluation.classes) - set(train.classes))
    parts = []
    if only_train:
        parts.append(f"only in {train.name}/: {_few(only_train)}")
    if only_eval:
        parts.append(f"only in {evaluation.name}/: {_few(only_eval)}")
    raise DataError(f"class folders differ between {str(train.root)!r} and {str(evaluation.root)!r} "
                    f"({'; '.join(parts)}); both splits need the same class folders")


def list_dense_split(split_dir: Path, target_folder: Literal["masks", "depth"]) -> Split:
    """`split_dir/images/*` paired by file stem with `split_dir/masks/*.png` or `split_dir/depth/*.{png,npy}`."""
    image_dir, target_dir = split_dir / "images", split_dir / target_folder
    task = "seg" if target_folder == "masks" else "depth"
    missing = [f"{d.name}/" for d in (image_dir, target_dir) if not d.is_dir()]
    if missing:
        raise DataError(f"{str(split_dir)!r} has no {' or '.join(missing)}; --task {task} expects "
                        f"{split_dir.name}/images/ and {split_dir.name}/{target_folder}/ with matching file names")
    images = _images_in(image_dir)
    if not images:
        raise DataError(f"{str(image_dir)!r} holds no images")
    extensions = (".png",) if target_folder == "masks" else DEPTH_EXTENSIONS
    by_stem = {p.stem: p for p in sorted(target_dir.iterdir())
               if p.suffix.lower() in extensions and not p.name.startswith(".")}
    lacking = [p.name for p in images if p.stem not in by_stem]
    if lacking:
        kinds = " or ".join(extensions)
        raise DataError(f"{len(lacking)} of {len(images)} images in {str(image_dir)!r} have no {kinds} in "
                        f"{target_folder}/ with the same name: {_few(lacking)}")
    return Split(split_dir.name, split_dir, tuple(images), targets=tuple(by_stem[p.stem] for p in images))
