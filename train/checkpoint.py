"""Checkpoints of the trainable state: DeepSpeed's files plus our own `indexers.safetensors` and `meta.json`.

Layout: <run_dir>/checkpoints/step_<N>/ (DeepSpeed model/optimizer states, indexers.safetensors: the
F-layer indexer weights under their backbone names, meta.json: pattern, step, model and job config,
metrics, data position, RNG, the run's id, and the sha256 of every other file of the checkpoint) and
<run_dir>/checkpoints/latest naming the newest complete one. `latest` is replaced atomically after everything
else is written, so a crash mid-save leaves the previous checkpoint the one that loads. A checkpoint whose
files no longer match their recorded hashes is damaged: `newest_intact_checkpoint` skips it and says so.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from distill.files import (CHECKPOINTS, INDEXERS, LATEST, META, CheckpointFileError, files_under, read_checkpoint_meta,
                           sha256_file)
from train.faults import NO_FAULTS, Faults


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or from another model or pattern."""


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are missing, truncated or unreadable."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def latest_checkpoint(root: str) -> str | None:
    """The checkpoint dir that `root`'s `latest` names (the newest complete one), or None when there is none."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(root, f.read().strip())


def step_of(path: str) -> int | None:
    """N of a checkpoint dir `.../step_N`, else None."""
    match = re.fullmatch(r"step_(\d+)", os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _steps_newest_first(root: str, below: int | None = None) -> list[str]:
    """The step_N dirs of `root`, newest first; only those with N < `below` when given."""
    names = os.listdir(root) if os.path.isdir(root) else []
    steps = [(step_of(d), d) for d in names if step_of(d) is not None and os.path.isdir(os.path.join(root, d))]
    return [os.path.join(root, d) for n, d in sorted(steps, reverse=True) if below is None or n < below]


def verify_checkpoint(path: str) -> dict:
    """The meta of checkpoint dir `path` once it checks out: meta.json parses and every file it lists has its
    recorded sha256 (checkpoints without hashes: meta.json only). Raises DamagedCheckpoint naming the file."""
    meta = read_meta(path)
    for name, digest in meta.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise DamagedCheckpoint(f"checkpoint {path!r} is damaged: {name} is missing")
        if sha256_file(file) != digest:
            raise DamagedCheckpoint(f"checkpoint {path!r} is damaged: {name} does not match the sha256 recorded in "
                                    f"{META} (truncated or overwritten)")
    return meta


def newest_intact_checkpoint(root: str, below: int | None = None) -> tuple[str | None, list[str]]:
    """(the newest checkpoint under `root` that verifies, the reasons each newer one was skipped).

    Candidates: the one `latest` names and the older step_N dirs (dirs newer than `latest` are incomplete
    writes); with `below`, only steps before it. (None, []) when `root` has no checkpoint.
    """
    latest = latest_checkpoint(root)
    if latest is None:
        return None, []
    newest = step_of(latest)
    limits = [n for n in (below, None if newest is None else newest + 1) if n is not None]
    skipped = [] if os.path.isdir(latest) else [f"{os.path.join(root, LATEST)} names {latest!r}, which is missing"]
    for path in _steps_newest_first(root, min(limits) if limits else None):
        try:
            verify_checkpoint(path)
            return path, skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    return None, skipped


def previous_good_hint(path: str) -> str:
    """What to do about damaged checkpoint `path`: resume from the newest good one before it, or start over."""
    previous, _ = newest_intact_checkpoint(os.path.dirname(os.path.normpath(path)), below=step_of(path) or 0)
    if previous is not None:
        return f"resume from the previous good checkpoint with resume={previous}"
    return "no earlier checkpoint verifies: start over with resume=never (the run's outputs are moved aside)"


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gathered_indexer_state(distiller) -> dict[str, torch.Tensor]:
    """`distiller.indexer_state_dict()` as fp32 CPU copies, gathered from every rank under ZeRO-3. Call on every
    rank."""
    partitioned = [p for p in distiller.backbone.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed
        gathered = deepspeed.zero.GatheredParameters(partitioned)
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        return {name: t.float().cpu().clone() for name, t in distiller.indexer_state_dict().items()}


def save_checkpoint(engine, distiller, run_dir: str, step: int, meta: dict, keep: int,
                    faults: Faults = NO_FAULTS) -> str:
    """Save on every rank (DeepSpeed shards), then rank 0 writes our files (meta.json with every other file's
    sha256) and moves `latest`; keeps the newest `keep` checkpoints of this run (meta's run_id; 0: all).
    `faults`: kill_in_save@N SIGKILLs the process between DeepSpeed's files and ours (the tests)."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    engine.save_checkpoint(root, tag=tag, save_latest=False, exclude_frozen_parameters=True,
                           client_state={"universal_checkpoint_info": {}})  # convertible by ds_to_universal
    faults.kill_if("kill_in_save", step)
    state = gathered_indexer_state(distiller)
    path = os.path.join(root, tag)
    if dist.is_initialized():
        dist.barrier()  # every rank's DeepSpeed files are written before rank 0 hashes them
    if _rank() == 0:
        save_file(state, os.path.join(path, INDEXERS))
        files = {name: sha256_file(os.path.join(path, name)) for name in files_under(path) if name != META}
        _write_atomic(os.path.join(path, META), json.dumps({**meta, "step": step, "files": files}, indent=2,
                                                           default=str))
        _write_atomic(os.path.join(root, LATEST), tag)
        _prune(root, keep, current=tag, run_id=meta.get("run_id"))
    if dist.is_initialized():
        dist.barrier()
    return path


def _prune(root: str, keep: int, current: str, run_id: str | None) -> None:
    """Delete all but the newest `keep` checkpoints of run `run_id` (0: keep all); other runs' are left alone."""
    ours = [p for p in _steps_newest_first(root) if _run_id_of(p) == run_id]
    for path in ours[keep:] if keep > 0 else []:
        if os.path.basename(path) != current:
            for old in (path, f"{path}_universal"):
                shutil.rmtree(old, ignore_errors=True)


def _run_id_of(path: str) -> str | None:
    """The run id in checkpoint `path`'s meta.json; a sentinel that matches no run when it is unreadable."""
    try:
        return read_meta(path).get("run_id")
    except CheckpointError:
        return "<unreadable>"


def read_meta(path: str) -> dict:
    """Checkpoint `path`'s meta.json; DamagedCheckpoint when it is missing (an incomplete write) or not JSON."""
    try:
        return read_checkpoint_meta(path)
    except CheckpointFileError as e:
        raise DamagedCheckpoint(str(e)) from e


def check_compatible(meta: dict, pattern: str, target: str, model_cfg: dict, path: str) -> None:
    """Refuse to resume from a checkpoint of another pattern, target or model."""
    fix = "give this run another name (name=...), or start over with resume=never (which moves the earlier " \
          "run's outputs aside into <run dir>/replaced/)"
    if meta.get("pattern") != pattern:
        raise CheckpointError(f"checkpoint {path!r} was trained with pattern {meta.get('pattern')!r}, "
                              f"this run uses {pattern!r}: {fix}")
    theirs = meta.get("config", {}).get("distill", {}).get("target", target)
    if theirs != target:
        raise CheckpointError(f"checkpoint {path!r} was trained with distill.target={theirs!r}, this run uses "
                              f"{target!r}: {fix}")
    theirs, ours = meta.get("model", {}), model_cfg
    for key in ("type", "path", "config", "init_seed"):
        if theirs.get(key) != ours.get(key):
            raise CheckpointError(f"checkpoint {path!r} is of another model (model.{key}: {theirs.get(key)!r} "
                                  f"there, {ours.get(key)!r} here): {fix}")


def universal_checkpoint(path: str) -> str:
    """DeepSpeed's world-size-independent form of checkpoint `path` (made once, by rank 0): `<path>_universal`."""
    out = os.path.normpath(path) + "_universal"
    if _rank() == 0 and not os.path.isdir(out):
        tmp = f"{out}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
                               "--output_folder", tmp, "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"converting {path!r} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


def load_checkpoint(engine, path: str, universal: bool = False) -> dict:
    """Load DeepSpeed state from checkpoint dir `path` on every rank; returns its meta.

    `universal`: load its universal form (the engine must be configured with checkpoint.load_universal).
    """
    meta = read_meta(path)
    root, tag = os.path.split(universal_checkpoint(path) if universal else os.path.normpath(path))
    try:
        load_path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=False)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
        raise DamagedCheckpoint(f"checkpoint {path!r} is damaged: DeepSpeed could not read it ({type(e).__name__}: "
                                f"{e}); {previous_good_hint(path)}") from e
    if load_path is None:
        raise DamagedCheckpoint(f"DeepSpeed found no state in checkpoint {path!r}; {previous_good_hint(path)}")
    return meta


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
