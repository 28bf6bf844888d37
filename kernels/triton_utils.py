"""Triton helpers shared by the op files (kernels.centroid_kl, .sparse_centroid_kl, .sparse_attention,
.indexer_topk): constants, @triton.jit building blocks and host-side helpers. An op's own kernels, its autograd
Function and its launcher live in its file; tile settings live in kernels.tiles.

Constants: LOG2E (a float for host code), TL_LOG2E (the same as a constexpr, for kernels: globals that kernels read
must be constexpr), TL_DTYPES (torch -> triton dtypes the kernels take).
@triton.jit: `load_rows` (a masked [rows, columns] slice through pointers), `load_tile` (a tile through a TMA
descriptor or through pointers), `online_lse` (one step of a base-2 online log-sum-exp).
Host: `strides` (a kernel's stride arguments), `pow2_pieces` (a head dim as two power-of-two column pieces),
`dot_dtype`, `sm_count`, `row_tiles` / `tma_ready` (TMA TensorDescriptors over tensors flattened to rows),
`scale_saved_grads` (the backward of a terminal loss whose forward computed its gradients).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
TL_LOG2E = tl.constexpr(LOG2E)  # globals that kernels read must be constexpr
TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def load_rows(base, rows, row_ok, stride_t, stride_d, D0: tl.constexpr, DW: tl.constexpr, DTOT: tl.constexpr,
              DTYPE: tl.constexpr):
    """[len(rows), DW] slice of columns D0 .. D0+DW of a [T, *] matrix (zeros outside), as DTYPE."""
    cols = D0 + tl.arange(0, DW)
    ptrs = base + rows.to(tl.int64)[:, None] * stride_t + cols[None, :] * stride_d
    return tl.load(ptrs, mask=row_ok[:, None] & (cols < DTOT)[None, :], other=0.0).to(DTYPE)


@triton.jit
def load_tile(base, desc, row, col, rows, row_ok, stride_t, stride_d, DW: tl.constexpr, WIDTH: tl.constexpr,
              DOT: tl.constexpr, TMA: tl.constexpr):
    """[len(rows), DW] tile of a column piece (WIDTH columns, zeros past them) of one head's q or k, as DOT: through
    the descriptor desc at its row `row`, column `col` (TMA: `row_tiles`; rows past the tensor's hold other rows,
    which the caller masks), else through pointers from base (the piece's first column) at `rows`."""
    if TMA:
        return desc.load([row, col]).to(DOT)
    return load_rows(base, rows, row_ok, stride_t, stride_d, 0, DW, WIDTH, DOT)


@triton.jit
def online_lse(m, l, s):
    """One step of a base-2 online log-sum-exp over rows of s [M, N] (-inf = masked)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp2(m - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
    return m_new, l


def strides(x: torch.Tensor, prefix: str, dims: str) -> dict:
    """A kernel's stride arguments for x: {prefix + dim: stride}, e.g. strides(q, "sq_", "bthd") -> sq_b ... sq_d."""
    return {prefix + dim: stride for dim, stride in zip(dims, x.stride(), strict=True)}


def pow2_pieces(dim: int, min_dot: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two column pieces (the second may be 0), e.g. 192 -> (128, 64)."""
    first = max(min_dot, 1 << (dim.bit_length() - 1))
    rest = dim - first
    return first, (0 if rest <= 0 else max(min_dot, triton.next_power_of_2(rest)))


def dot_dtype(x: torch.Tensor):
    """Operand dtype of the dots: x's, except bf16 on the CPU interpreter, which cannot multiply bf16
    (Triton's debugging guide) and gets the exactly upcast fp32 values instead."""
    return tl.float32 if x.device.type != "cuda" and x.dtype == torch.bfloat16 else TL_DTYPES[x.dtype]


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 on the CPU interpreter."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def row_tiles(x: torch.Tensor, lead: int, block: tuple[int, int]) -> TensorDescriptor | None:
    """A TensorDescriptor of `block` tiles of x flattened to rows of x.stride(lead - 1) elements: one row per index of
    the first `lead` dims, the others side by side in it (column = their offset, e.g. h * head stride + d; as many
    columns as they reach, so that a column slice of a wider tensor, e.g. main_k[..., 128:], reads inside it), or
    None where x does not flatten so: the lead dims not evenly spaced, a later dim reaching outside its row, the
    last dim not contiguous, a row or the data not 16-byte aligned, a tile row narrower than 16 bytes, or no
    elements. Tiles past the last row or column hold TMA's zeros."""
    if x.numel() == 0:
        return None
    width = x.stride(lead - 1)
    even = all(x.shape[i] == 1 or x.stride(i) == x.shape[i + 1] * x.stride(i + 1) for i in range(lead - 1))
    reach = sum((n - 1) * st for n, st in zip(x.shape[lead:], x.stride()[lead:]))
    inside = x.stride(-1) == 1 and all(st >= 0 for st in x.stride()[lead:]) and reach < width
    aligned = (width * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0 and block[1] * x.element_size() >= 16
    if not (even and inside and aligned):
        return None
    return TensorDescriptor(x, [math.prod(x.shape[:lead]), reach + 1], [width, 1], list(block))


def tma_ready(x: torch.Tensor, enabled: bool) -> bool:
    """Whether the kernels may read x through TMA: enabled (Tiles.tma), bf16 or fp16 (fp32 is the checking dtype,
    whose stages would not fit in shared memory), and on a GPU with TMA (Hopper on) or the CPU interpreter."""
    return (enabled and x.element_size() == 2
            and (x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] >= 9))


def scale_saved_grads(ctx, grad_loss: torch.Tensor) -> tuple:
    """Backward of a terminal loss whose forward saved its first inputs' gradients: each times grad_loss
    (None where the input needs none)."""
    return tuple(grad_loss.to(g.dtype) * g if need else None
                 for g, need in zip(ctx.saved_tensors, ctx.needs_input_grad))
