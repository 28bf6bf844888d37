"""The files of a written directory as the export's manifest and a checkpoint's meta.json record them (every file
below the directory, and each file's sha256), and the files of a training checkpoint, which this module owns:
train/checkpoint.py writes them, distill/export.py reads them.

A checkpoint: `<run dir>/CHECKPOINTS/step_<N>/` holding INDEXERS (the F-layer indexer weights, fp32, under their
backbone state-dict names), META (pattern, step, model and job config, metrics, ..., and the sha256 of every other
file of the step dir, under "files") and DeepSpeed's own files; `<run dir>/CHECKPOINTS/LATEST` names the newest
complete step dir.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHECKPOINTS = "checkpoints"          # a run dir's checkpoints dir
LATEST = "latest"                    # in it: the name of the newest complete step dir
META = "meta.json"                   # in a step dir: the checkpoint's meta
INDEXERS = "indexers.safetensors"    # in a step dir: the F-layer indexer weights


class CheckpointFileError(ValueError):
    """A checkpoint file that is missing or unreadable (the messages name the file)."""


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


# ---- a training checkpoint's files ------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint step dir, given it, a run dir, or a run's checkpoints dir (these follow LATEST)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for checkpoints in (path / CHECKPOINTS, path):
        latest = checkpoints / LATEST
        if latest.is_file():
            step_dir = checkpoints / latest.read_text().strip()
            if not (step_dir / META).is_file():
                raise CheckpointFileError(f"{latest} names {step_dir}, which has no {META}")
            return step_dir
    raise CheckpointFileError(f"{path} is neither a checkpoint (no {META}) nor a run dir (no {CHECKPOINTS}/{LATEST})")


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """Checkpoint step dir `path`'s META as a dict; CheckpointFileError when it is missing (an incomplete write),
    not JSON or not a JSON object."""
    name = os.fspath(path)
    file = os.path.join(name, META)
    if not os.path.isfile(file):
        raise CheckpointFileError(f"checkpoint {name!r} has no {META}: the checkpoint is incomplete")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f"checkpoint {name!r} is damaged: {META} is unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointFileError(f"checkpoint {name!r} is damaged: {META} holds no JSON object")
    return meta


def read_checkpoint_indexers(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Checkpoint step dir `path`'s INDEXERS: {backbone state-dict name: tensor}."""
    return read_safetensors(Path(path) / INDEXERS, CheckpointFileError)


def read_safetensors(path: Path, error: type[Exception]) -> dict[str, torch.Tensor]:
    """{name: tensor} of the safetensors file `path`; `error` (the caller's error class) where it is missing or not a
    safetensors file."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise error(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types for bad headers, truncation)
        raise error(f"{path} is not a valid safetensors file: {e}") from None
