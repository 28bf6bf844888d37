"""Fault injection for the fault-tolerance tests, off unless INDEXCACHE_FAULTS is set.

INDEXCACHE_FAULTS="nan_loss@3,kill_in_save@4": at optimizer step 3 the loss is made NaN; while saving
the checkpoint of step 4, the process SIGKILLs itself after DeepSpeed's files and before ours.
"""
from __future__ import annotations

import os
import signal

_FAULTS = {tuple(item.split("@")) for item in os.environ.get("INDEXCACHE_FAULTS", "").split(",") if "@" in item}


def fires(name: str, step: int) -> bool:
    return (name, str(step)) in _FAULTS


def kill_if(name: str, step: int) -> None:
    if fires(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
