"""Fault injection for the fault-tolerance tests: a `Faults` the job's `main` reads from INDEXCACHE_FAULTS once and
hands to the loop and the checkpoint writer; `NO_FAULTS`, the default, injects nothing.

INDEXCACHE_FAULTS="nan_loss@3,nan_grad@5,kill_in_save@4": at optimizer step 3 rank 0's loss is made NaN; at step 5
rank 0's gradients are made NaN while its loss stays finite; while saving the checkpoint of step 4, the
process SIGKILLs itself after DeepSpeed's files and before ours.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

import torch

ENV = "INDEXCACHE_FAULTS"


@dataclass(frozen=True)
class Faults:
    """The faults to inject, as (name, step) pairs."""
    planned: frozenset[tuple[str, int]] = frozenset()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        """The faults $INDEXCACHE_FAULTS names (`name@step`, comma-separated); none when it is unset."""
        items = (item.split("@") for item in environ.get(ENV, "").split(",") if "@" in item)
        return cls(frozenset((name, int(step)) for name, step in items))

    def fires(self, name: str, step: int) -> bool:
        return (name, step) in self.planned

    def nonfinite_if(self, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """On rank 0: `loss` made NaN (nan_loss), or its value kept and every gradient from it made NaN (nan_grad)."""
        if rank == 0 and self.fires("nan_loss", step):
            return loss * float("nan")
        if rank == 0 and self.fires("nan_grad", step):
            loss.register_hook(lambda grad: grad * float("nan"))
        return loss

    def kill_if(self, name: str, step: int) -> None:
        """SIGKILL this process when fault `name` is planned at `step`."""
        if self.fires(name, step):
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
