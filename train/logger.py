"""Metrics from rank 0: to wandb (offline by default: files in the run dir) and to <run_dir>/metrics.jsonl."""
from __future__ import annotations

import json
import os
import uuid

import wandb


class Logger:
    def __init__(self, cfg, run_dir: str, name: str, config: dict, rank: int):
        self.run = None
        self.jsonl = os.path.join(run_dir, "metrics.jsonl") if rank == 0 else None
        if rank != 0 or cfg.mode == "disabled":
            return
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=name, mode=cfg.mode,
                              dir=run_dir, config=config, resume="allow",
                              id=_stable_id(run_dir), settings=wandb.Settings(silent=True))

    def log(self, metrics: dict, step: int) -> None:
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.summary.update(metrics)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _stable_id(run_dir: str) -> str:
    """One wandb run id per run dir, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id")
    if not os.path.exists(path):
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(uuid.uuid4().hex[:12])
    with open(path) as f:
        return f.read().strip()
