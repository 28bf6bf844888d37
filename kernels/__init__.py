"""Kernel dispatch: fused Triton kernels on GPU, plain-PyTorch references elsewhere.

kind: 'auto' (Triton on CUDA, the reference on CPU), 'triton' (CUDA, or the CPU under TRITON_INTERPRET=1),
'reference'.
"""
from __future__ import annotations

import os

import torch

from kernels import reference

KINDS = ("auto", "triton", "reference")


def _use_triton(kind: str, device: torch.device | str) -> bool:
    if kind not in KINDS:
        raise ValueError(f"distill.kernel {kind!r} is not one of {KINDS}")
    on_cuda = torch.device(device).type == "cuda"
    if kind == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"distill.kernel 'triton' needs a CUDA device (got {device}) or TRITON_INTERPRET=1 "
                         "for the CPU interpreter")
    return kind == "triton" or (kind == "auto" and on_cuda)


def centroid_kl_fn(kind: str, device: torch.device | str):
    """The `centroid_kl` implementation for `kind` (auto | triton | reference) on `device`."""
    if not _use_triton(kind, device):
        return reference.centroid_kl
    from kernels.centroid_kl import centroid_kl
    return centroid_kl


def indexer_topk_fn(kind: str, device: torch.device | str):
    """The `indexer_topk` implementation for `kind` (auto | triton | reference) on `device`."""
    if not _use_triton(kind, device):
        return reference.indexer_topk
    from kernels.indexer_topk import indexer_topk
    return indexer_topk


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.6's CPU interpreter converts scalars (arrays of shape [1]) to loop bounds with int(), which
    NumPy >= 2.4 rejects (triton-lang/triton#9171); install the upstream fix (squeeze first)."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_interpreter_loop_bounds()
