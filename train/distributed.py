"""The job's processes: torch.distributed setup, collectives the loop needs, SIGTERM and the launcher's death.

Every rank calls `setup_distributed` first; `die_with_launcher` runs before anything else under launch/distill.sh.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

import datasets
import torch
import torch.distributed as dist

LAUNCHER_PID = "INDEXCACHE_LAUNCHER_PID"  # exported by launch/distill.sh: the pid of torch.distributed.run
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def setup_distributed(device_cfg: str) -> tuple[torch.device, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns device, rank, world."""
    import deepspeed
    use_cuda = torch.cuda.is_available() and device_cfg != "cpu"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process without torchrun: any free port (runs may be side by side)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ["LOCAL_RANK"])  # this node's process index: its GPU (RANK counts every node's)
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} on {socket.gethostname()}, which sees "
                           f"{torch.cuda.device_count()} GPUs: NPROC is the processes per node, at most its GPUs")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def is_rank0() -> bool:
    """True on rank 0, and in a process whose rank is not known (no process group, no RANK set)."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def on_rank0_first(rank: int, fn):
    """Run `fn` on rank 0, then on the others (they find rank 0's cache)."""
    if rank != 0:
        datasets.disable_progress_bars()
        dist.barrier()
    result = fn()
    if rank == 0:
        dist.barrier()
    return result


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over every rank, in fp32 (non-finite where any rank's is)."""
    values = values.float().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


class StopOnSigterm:
    """SIGTERM (as schedulers send it) asks for a checkpoint and a clean exit at the end of the step."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank got SIGTERM."""
        flag = torch.tensor(float(self.flag), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def die_with_launcher() -> None:
    """Under launch/distill.sh: the kernel SIGKILLs this worker when its parent, the launcher's
    torch.distributed.run (pid in $INDEXCACHE_LAUNCHER_PID), dies, kill -9 included. torch.distributed.run starts
    its workers in sessions of their own, so a kill of the launcher's process group does not reach them."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed: the worker would outlive its launcher")
    if os.getppid() != int(launcher):
        sys.exit(f"[distill] the launcher (pid {launcher}) is gone before this worker started; exiting")
