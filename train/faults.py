"""Fault injection for the fault-tolerance tests, off unless INDEXCACHE_FAULTS is set.

INDEXCACHE_FAULTS="nan_loss@3,nan_grad@5,kill_in_save@4": at optimizer step 3 rank 0's loss is made NaN; at step 5
rank 0's gradients are made NaN while its loss stays finite; while saving the checkpoint of step 4, the
process SIGKILLs itself after DeepSpeed's files and before ours.
"""
from __future__ import annotations

import os
import signal

import torch

_FAULTS = {tuple(item.split("@")) for item in os.environ.get("INDEXCACHE_FAULTS", "").split(",") if "@" in item}


def fires(name: str, step: int) -> bool:
    return (name, str(step)) in _FAULTS


def nonfinite_if(step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """On rank 0: `loss` made NaN (nan_loss), or its value kept and every gradient from it made NaN (nan_grad)."""
    if rank == 0 and fires("nan_loss", step):
        return loss * float("nan")
    if rank == 0 and fires("nan_grad", step):
        loss.register_hook(lambda grad: grad * float("nan"))
    return loss


def kill_if(name: str, step: int) -> None:
    if fires(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
