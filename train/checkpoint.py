"""Checkpoints of the trainable state: DeepSpeed's files plus our own `indexers.safetensors` and `meta.json`.

Layout: <run_dir>/checkpoints/step_<N>/ (DeepSpeed model/optimizer states, indexers.safetensors: the
F-layer indexer weights under their backbone names, meta.json: pattern, step, model and job config,
metrics, data position, RNG) and <run_dir>/checkpoints/latest naming the newest complete one. `latest`
is replaced atomically after everything else is written, so a crash mid-save leaves the previous
checkpoint the one that loads.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from train import faults

LATEST = "latest"
META = "meta.json"
INDEXERS = "indexers.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or from another model or pattern."""


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint dir under `root`, or None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        tag = f.read().strip()
    path = os.path.join(root, tag)
    if not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"{pointer} names {tag!r}, which has no {META}: the checkpoint is incomplete")
    return path


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def gathered_indexer_state(distiller) -> dict[str, torch.Tensor]:
    """F-layer indexer weights as fp32 CPU tensors (gathered from all ranks under ZeRO-3). Call on every rank."""
    params = dict((n, p) for n, p in distiller.backbone.named_parameters() if p.requires_grad)
    if any(hasattr(p, "ds_id") for p in params.values()):
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().cpu().clone() for n, p in params.items()}
    return {n: p.detach().float().cpu().clone() for n, p in params.items()}


def save_checkpoint(engine, distiller, run_dir: str, step: int, meta: dict, keep: int) -> str:
    """Save on every rank (DeepSpeed shards), then rank 0 writes our files and moves `latest`."""
    root = checkpoint_root(run_dir)
    tag = f"step_{step}"
    engine.save_checkpoint(root, tag=tag, save_latest=False, exclude_frozen_parameters=True,
                           client_state={"universal_checkpoint_info": {}})  # convertible by ds_to_universal
    faults.kill_if("kill_in_save", step)
    state = gathered_indexer_state(distiller)
    path = os.path.join(root, tag)
    if _rank() == 0:
        save_file(state, os.path.join(path, INDEXERS))
        _write_atomic(os.path.join(path, META), json.dumps({**meta, "step": step}, indent=2, default=str))
        _write_atomic(os.path.join(root, LATEST), tag)
        _prune(root, keep, current=tag)
    if dist.is_initialized():
        dist.barrier()
    return path


def _prune(root: str, keep: int, current: str) -> None:
    steps = sorted((int(d.split("_")[1]), d) for d in os.listdir(root)
                   if re.fullmatch(r"step_\d+", d) and os.path.isdir(os.path.join(root, d)))
    for _, d in steps[:-keep] if keep > 0 else []:
        if d != current:
            for old in (d, f"{d}_universal"):
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def read_meta(path: str) -> dict:
    try:
        with open(os.path.join(path, META)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r} has no readable {META}: {e}") from e


def check_compatible(meta: dict, pattern: str, model_cfg: dict, path: str) -> None:
    """Refuse to resume from a checkpoint of another pattern or model."""
    if meta.get("pattern") != pattern:
        raise CheckpointError(f"checkpoint {path!r} was trained with pattern {meta.get('pattern')!r}, "
                              f"this run uses {pattern!r}: use another run name or resume=never")
    theirs, ours = meta.get("model", {}), model_cfg
    for key in ("type", "path", "config", "init_seed"):
        if theirs.get(key) != ours.get(key):
            raise CheckpointError(f"checkpoint {path!r} is of another model (model.{key}: {theirs.get(key)!r} "
                                  f"there, {ours.get(key)!r} here)")


def universal_checkpoint(path: str) -> str:
    """DeepSpeed's world-size-independent form of checkpoint `path` (made once, by rank 0): `<path>_universal`."""
    out = os.path.normpath(path) + "_universal"
    if _rank() == 0 and not os.path.isdir(out):
        tmp = f"{out}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", path,
                               "--output_folder", tmp, "--num_extract_workers", "1", "--num_merge_workers", "1"],
                              capture_output=True, text=True)
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
    load_path, _ = engine.load_checkpoint(root, tag=tag, load_module_strict=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {path!r}")
    return meta


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0
