"""The run directory `runs/<name>/`: its name, its lock, and what happens to an earlier run's outputs.

- The name says what defines the run: the pattern source (an explicit pattern, or a short hash of a long one;
  `freq<n>`; `r<retention>`) and the target, so that runs of other patterns never share a directory.
- One job at a time writes a run directory: `run.lock`, an flock held by the job's rank 0 and released by the
  OS however the process ends; a second job is refused with the holder's pid.
- `resume=never` moves an earlier run's outputs into `replaced/<UTC time>/` instead of mixing or overwriting
  them; the launch's config is recorded in `.hydra/` only once the job owns the directory (Hydra's own record,
  written before any check, is off: `hydra.output_subdir: null`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import time

from omegaconf import DictConfig, OmegaConf

from distill.pattern import pattern_source

LOCK = "run.lock"
REPLACED = "replaced"
OUTPUTS = ("checkpoints", "export", "metrics.jsonl", "wandb", ".hydra")  # an earlier run's results
LONGEST_NAMED_PATTERN = 16  # longer explicit patterns are named by a hash


class RunDirInUse(RuntimeError):
    """Another job holds the run directory's lock."""


def run_tag(pattern, freq, retention, target) -> str:
    """What defines a run, for its name: `FSSFSSSF-centroid`, `p1a2b3c4d-own` (a long pattern's sha256),
    `freq4-centroid`, `r0.25-centroid`, `all_full-centroid`. Never raises: a bad value is refused later."""
    key, value = pattern_source(pattern, freq, retention)
    if key == "pattern":
        letters = re.sub(r"[^A-Za-z0-9]", "", str(value)).upper()
        spec = letters if 0 < len(letters) <= LONGEST_NAMED_PATTERN else \
            "p" + hashlib.sha256(letters.encode()).hexdigest()[:8]
    else:
        spec = {"freq": f"freq{value}", "retention": f"r{value}", "all_full": "all_full"}[key]
    return f"{spec}-{target}"


@contextlib.contextmanager
def hold_run_lock(run_dir: str):
    """Hold `<run_dir>/run.lock` (exclusive, non-blocking flock) for the `with` block; the file holds our pid.

    Raises RunDirInUse naming the holder's pid when another process holds it. The OS drops the lock when the
    process exits, kill -9 included, so a dead job never blocks the next one.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirInUse(
                f"run directory {run_dir} is in use by pid {holder} (it holds {path}): wait for that job to end or "
                f"stop it (kill {holder}), or give this run another directory (name=... or hydra.run.dir=...)"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def set_aside_outputs(run_dir: str) -> str | None:
    """Move an earlier run's outputs (OUTPUTS) into `<run_dir>/replaced/<UTC time>/`; returns that directory,
    or None when there were none. For resume=never: the new run starts clean and nothing is lost."""
    present = [name for name in OUTPUTS if os.path.lexists(os.path.join(run_dir, name))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = os.path.join(run_dir, REPLACED, stamp)
    suffix = 1
    while os.path.lexists(aside):
        aside = os.path.join(run_dir, REPLACED, f"{stamp}-{suffix}")
        suffix += 1
    os.makedirs(aside)
    for name in present:
        os.rename(os.path.join(run_dir, name), os.path.join(aside, name))
    return aside


def record_config(run_dir: str, cfg: DictConfig) -> None:
    """The launch's config in `<run_dir>/.hydra/` as Hydra writes it (config.yaml, and overrides.yaml and
    hydra.yaml inside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig
    out = os.path.join(run_dir, ".hydra")
    os.makedirs(out, exist_ok=True)
    OmegaConf.save(cfg, os.path.join(out, "config.yaml"))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        OmegaConf.save(hydra_cfg.overrides.task, os.path.join(out, "overrides.yaml"))
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), os.path.join(out, "hydra.yaml"))
