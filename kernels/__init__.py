"""Kernel dispatch: fused Triton kernels on GPU, plain-PyTorch references elsewhere.

kind: 'auto' (Triton on CUDA, the reference on CPU), 'triton' (CUDA, or the CPU under TRITON_INTERPRET=1),
'reference'.
"""
from __future__ import annotations

import importlib
import os
import sys

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


def _implementation(kind: str, device: torch.device | str, module: str, name: str):
    """kernels.<module>.<name> (Triton) or kernels.reference.<name> for `kind` on `device`."""
    if not _use_triton(kind, device):
        return getattr(reference, name)
    return getattr(importlib.import_module(f"kernels.{module}"), name)


def centroid_kl_fn(kind: str, device: torch.device | str):
    """The `centroid_kl` implementation for `kind` (auto | triton | reference) on `device`."""
    return _implementation(kind, device, "centroid_kl", "centroid_kl")


def shared_keys_apart(kind: str, device: torch.device | str, per_head: int, shared: int) -> bool:
    """Whether `centroid_kl_fn(kind, device)` reads main_k_rope (`shared` key columns all heads share, after
    `per_head` columns of each head) as a piece of its own, once per layer and tile, so that a capture gains by
    keeping those columns once: the fused kernels where the widths allow it (`kernels.centroid_kl.keys_apart`). The
    reference, like the fused kernels otherwise, joins them back into every head's key, a second copy."""
    if not _use_triton(kind, device):
        return False
    return importlib.import_module("kernels.centroid_kl").keys_apart(per_head, shared, torch.device(device))


def indexer_topk_fn(kind: str, device: torch.device | str):
    """The `indexer_topk` implementation for `kind` (auto | triton | reference) on `device`."""
    return _implementation(kind, device, "indexer_topk", "indexer_topk")


def sparse_attention_fn(kind: str, device: torch.device | str):
    """The `sparse_mqa_attention` implementation for `kind` (auto | triton | reference) on `device`."""
    return _implementation(kind, device, "sparse_attention", "sparse_mqa_attention")


def sparse_centroid_kl_fn(kind: str, device: torch.device | str):
    """The `sparse_centroid_kl` implementation for `kind` (auto | triton | reference) on `device`."""
    return _implementation(kind, device, "sparse_centroid_kl", "sparse_centroid_kl")


def enable_cpu_interpreter() -> None:
    """Run the Triton kernels on Triton's CPU interpreter from now on (tests): sets TRITON_INTERPRET=1 and
    rebuilds what was built for the GPU before it was set (triton.language's helpers, these kernel modules),
    so that it works whatever imported triton first (a conftest's `import torch` does)."""
    from triton.runtime.jit import JITFunction

    os.environ["TRITON_INTERPRET"] = "1"
    _patch_interpreter_loop_bounds()
    _interpret_language_helpers()
    # every loaded kernel module with kernels, triton_utils first: the op files import its @jit helpers
    # (kernels.tiles holds no kernels and keeps any override in effect)
    loaded = sorted((name for name in sys.modules if name.startswith("kernels.")),
                    key=lambda name: name != "kernels.triton_utils")
    for name in loaded:
        module = sys.modules[name]
        if any(isinstance(v, JITFunction) for v in vars(module).values()):
            importlib.reload(module)


def _patch_interpreter_loop_bounds() -> None:
    """Triton 3.6's CPU interpreter converts scalars (arrays of shape [1]) to loop bounds with int(), which
    NumPy >= 2.4 rejects (triton-lang/triton#9171); install the upstream fix (squeeze first), once."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "squeezes_index", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched.squeezes_index = True
    interpreter._patch_lang_tensor = patched


def _interpret_language_helpers() -> None:
    """triton.language's own @jit helpers (tl.zeros, tl.max, tl.sort, ...) are built for the interpreter only
    when TRITON_INTERPRET=1 was set before triton's first import; rebuild them when it was set later."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    for name, value in list(vars(tl.standard).items()):
        if isinstance(value, JITFunction):
            interpreted = InterpretedFunction(value.fn)
            setattr(tl.standard, name, interpreted)
            if getattr(tl, name, None) is value:
                setattr(tl, name, interpreted)


if os.environ.get("TRITON_INTERPRET") == "1":
    enable_cpu_interpreter()
