"""`atomic_write`: the one way unic replaces a file (checkpoints, run files, probe caches and reports).

Stdlib only, so every layer may import it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_write(path: Path, mode: str = "wb", *, encoding: str | None = None, durable: bool = False
                 ) -> Iterator[IO]:
    """Write `path` through a temporary name beside it, renamed over `path` once the block ends without error.

    A crash never leaves a half-written file under the final name. The temporary file is created exclusively
    (mode "x": never through a symlink planted at its name in a shared folder) and removed when the block raises.

    Args:
        mode: "wb" or "w" (text, with `encoding`).
        durable: fsync the file before the rename (checkpoints: the rename must not expose an empty file after a
            power loss); the caller fsyncs the folder if the rename itself must survive.
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of this pid's earlier crash; "x" below refuses anything else
    try:
        with open(tmp, mode.replace("w", "x"), encoding=encoding) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
