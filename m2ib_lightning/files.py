"""Files that a reader sees whole or not at all.

:func:`atomic_write` writes under a temporary name, syncs the data, renames onto the final name and
syncs the directory: used for attribution shards, skip manifests, results and cached statistics.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "fsync"]


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see all of it or nothing.

    The file's data reaches the disk before the rename, and the rename before this returns, so a
    machine that crashes right after cannot leave an empty or partial file under the final name.
    """
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)

