"""Metrics from rank 0: to wandb (offline by default: files in the run dir) and to <run_dir>/metrics.jsonl.
wandb is imported only where a wandb run starts (rank 0, logger.mode not disabled).

One wandb run per distillation run: its id is the run id kept in the checkpoints, so a resumed run continues
the same wandb run and a fresh one (resume=never) starts another. A resumed run drops the rows of
metrics.jsonl after its checkpoint's step before it logs again, so that replayed steps appear once; wandb
itself refuses steps at or below the last one it holds.
"""
from __future__ import annotations

import json
import os

MODES = ("offline", "online", "disabled")


class Logger:
    def __init__(self, cfg, run_dir: str, name: str, config: dict, rank: int, run_id: str, resume_step: int = 0):
        """`resume_step`: the step the run continues from (0: a fresh start); later rows are dropped."""
        self.run = None
        self.jsonl = os.path.join(run_dir, "metrics.jsonl") if rank == 0 else None
        if self.jsonl is not None:
            _truncate_after(self.jsonl, resume_step)
        if rank != 0 or cfg.mode == "disabled":
            return
        import wandb  # here, not at the top: a job without a wandb run does not pay for importing it
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=name, mode=cfg.mode,
                              dir=run_dir, config=config, resume="allow",
                              id=run_id, settings=wandb.Settings(silent=True))

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


def _truncate_after(path: str, step: int) -> None:
    """Keep the rows of metrics file `path` up to `step` (and drop a line cut short by a kill), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
