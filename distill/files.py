"""The files of a written directory as the export's manifest and a checkpoint's meta.json record them: every file
below the directory, and each file's sha256."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def files_under(root: str | os.PathLike) -> list[str]:
    """Every file below directory `root`, as sorted '/'-separated paths relative to it."""
    return sorted(Path(d, f).relative_to(root).as_posix() for d, _, files in os.walk(root) for f in files)


def sha256_file(path: str | os.PathLike, sync: bool = False) -> str:
    """The sha256 hex digest of file `path`; sync: also fsync the file, so that what was hashed is on disk."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest
