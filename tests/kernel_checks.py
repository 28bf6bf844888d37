"""Shared checks of the fused losses against their references (tests/kernels/test_kernel_*.py)."""
import os
import subprocess
import sys
from pathlib import Path

import torch


def kernel_layouts(*args: str) -> str:
    """stdout of `python -m bench.kernel_layouts *args` (GPU kernels compiled for sm_90 without a GPU), run in a
    process without the CPU interpreter; fails the test if it exits non-zero."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.kernel_layouts", *args], env=env, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def loss_and_grads(fn, index, *args, **kw):
    """(fn(*index, *args, **kw), its gradients with respect to index)."""
    loss = fn(*index, *args, **kw)
    return loss, torch.autograd.grad(loss, index)


def assert_matches_reference(index, got, got_grads, want, want_grads):
    """A fused loss (fp32) and its index_q, index_k, index_w gradients (each in its input's dtype and shape) against
    the reference's: the loss to 1e-5, each gradient's largest error within 1e-5 (fp32 inputs) or 1e-2 (half
    precision) of its largest value."""
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    tol = 1e-5 if index[0].dtype == torch.float32 else 1e-2
    for name, x, a, b in zip(("index_q", "index_k", "index_w"), index, got_grads, want_grads):
        assert a.dtype == x.dtype and a.shape == b.shape
        err = (a.float() - b).abs().max() / b.abs().max()
        assert err < tol, f"d {name}: relative error {err:.2e}"
