"""The backbone's dense causal attention, returning each head's log-sum-exp (the centroid target needs it).

    out_t = sum_{s<=t} softmax_s(scale q_t . k_s) v_s,     lse_t = log sum_{s<=t} exp(scale q_t . k_s)

per head, over the causal keys of the row's document. Shapes: q, k [B, T, H, Dq], v [B, T, H, Dv] ->
out [B, T, H, Dv] (q's dtype), lse [B, H, T] fp32 natural log.

The strongest attention torch has for the backbone's real shapes (MLA: Dq 192, Dv 128), fused, no
T x T tensor:
- CUDA: cuDNN's fused attention (what the default `scaled_dot_product_attention` picks on Hopper), which
  returns the LSE at no extra cost; the memory-efficient backend for fp32 (cuDNN takes fp32 inputs and returns
  NaN: measured on an H200, torch 2.11) and where cuDNN refuses the shapes.
- CPU: torch's flash attention for the CPU, with v padded to q's width (it takes one head size).
- Heads in groups, each made contiguous, wherever a q, k or v view reaches 2^31 elements of memory (its extent:
  the elements between its first and its last, so v sliced out of a wider kv counts that width): past that one
  cuDNN call over all heads gave inf (DeepSeek-V3.2's 128 heads at 128K tokens, H100 and H200, torch 2.11). The
  copies keep every call within 32-bit offsets; whether cuDNN would take a strided group whose extent passes 2^31
  is not measured (the 128K real-width failure first blamed on such groups came from `kernels.block_fp8`'s 32-bit
  offsets, docs/BENCHMARKS.md). Heads are independent: the groups give the same result.
- Packed documents (`cu_seqlens`): each document is a contiguous run of a row, so the fused kernel runs on
  each run in turn (exact, and as fast as the backend is for that length).
The LSE a backend returns is checked, once per call, on the last query row of each head (of the longest run)
against a direct computation, without a host sync (`torch._assert_async`): a backend that changed its LSE
convention fails loudly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

INDEX_LIMIT = 2**31 - 1  # the largest element offset a kernel indexing in 32 bits reaches


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                     cu_seqlens: torch.Tensor | None = None,
                     runs: list[tuple[int, int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, T, H, Dv], lse [B, H, T] fp32) of causal attention; see the module docstring. runs: the
    `document_runs` of cu_seqlens when the caller has them (a forward computes them once: one host sync, not
    one per layer)."""
    if cu_seqlens is None:
        out, lse = _attention(q, k, v, scale)
        _check_last_row_lse(q, k, scale, lse)
        return out, lse
    runs = document_runs(cu_seqlens, q.shape[0], q.shape[1]) if runs is None else runs
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)
    for b, start, end in runs:
        rows = slice(start, end)
        out[b:b + 1, rows], lse[b:b + 1, :, rows] = _attention(q[b:b + 1, rows], k[b:b + 1, rows],
                                                              v[b:b + 1, rows], scale)
    b, start, end = max(runs, key=lambda run: run[2] - run[1])  # one backend LSE check per call
    _check_last_row_lse(q[b:b + 1, start:end], k[b:b + 1, start:end], scale, lse[b:b + 1, :, start:end])
    return out, lse


def _attention(q, k, v, scale):
    """(out [B, T, H, Dv], lse [B, H, T] fp32) of one causal run, from the device's fused backend."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D] views
    fused = _cuda_attention if q.device.type == "cuda" else _cpu_attention
    out, lse = in_head_groups(fused, qh, kh, vh, scale)
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[..., : q.shape[1]].float()
    return out.transpose(1, 2), lse


def document_runs(cu_seqlens: torch.Tensor, batch: int, seq_len: int) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every document's run of tokens within a row (a row start is a boundary)."""
    flat = sorted(set(cu_seqlens.tolist()) | {b * seq_len for b in range(batch + 1)})
    return [(a // seq_len, a % seq_len, b - (a // seq_len) * seq_len) for a, b in zip(flat, flat[1:]) if b > a]


def in_head_groups(fused, qh, kh, vh, scale, *, max_extent: int = INDEX_LIMIT):
    """fused(qh, kh, vh, scale) -> (out [B, H, T, Dv], lse [B, H, T']) of [B, H, T, D] views, in one call where every
    view's memory extent is at most max_extent elements, else one call per group of heads whose contiguous copies
    stay within it (the module docstring says why)."""
    if max(map(memory_extent, (qh, kh, vh))) <= max_extent:
        return fused(qh, kh, vh, scale)
    B, H, T, _ = qh.shape
    heads = _group_heads(B, T, qh.shape[-1], vh.shape[-1], max_extent)
    parts = [fused(*(t[:, h:h + heads].contiguous() for t in (qh, kh, vh)), scale) for h in range(0, H, heads)]
    return torch.cat([out for out, _ in parts], dim=1), torch.cat([lse for _, lse in parts], dim=1)


def head_group_bytes(B: int, T: int, H: int, dq: int, dv: int, v_row: int, element_size: int,
                     max_extent: int = INDEX_LIMIT) -> int:
    """Bytes `in_head_groups` holds beyond its inputs and the one call's out and lse, for q, k [B, T, H, dq] and v
    [B, T, H, dv] with v_row elements between a token's heads (dv for a tensor of its own, nope + dv for MLA's view
    into kv): 0 where it makes one call; else one group's contiguous q, k, v and, while the groups' outs and lses are
    concatenated, a second out [B, H, T, dv] and lse [B, H, T] fp32."""
    if max(B * T * H * dq, B * T * H * v_row - (v_row - dv)) <= max_extent:  # the views' extents
        return 0
    heads = min(H, _group_heads(B, T, dq, dv, max_extent))
    return heads * B * T * (2 * dq + dv) * element_size + B * H * T * (dv * element_size + 4)


def _group_heads(B: int, T: int, dq: int, dv: int, max_extent: int) -> int:
    """Heads per group: the most whose contiguous q, k [B, heads, T, dq] and v [B, heads, T, dv] stay within
    max_extent elements (at least one)."""
    return max(1, max_extent // (B * T * max(dq, dv)))


def memory_extent(t: torch.Tensor) -> int:
    """Elements from t's first to its last in memory: what a kernel indexing t from its data pointer addresses."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _cpu_attention(qh, kh, vh, scale):
    """torch's CPU flash attention, which takes one head size: v padded to q's and the padding sliced off out."""
    dv = vh.shape[-1]
    padded = F.pad(vh, (0, qh.shape[-1] - dv)) if dv < qh.shape[-1] else vh
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, padded, 0.0, True, scale=scale)[:2]
    return out[..., :dv], lse


def _cuda_attention(qh, kh, vh, scale):
    """cuDNN's fused attention where it takes the inputs, else the memory-efficient backend: (out, lse) of [B, H, T, D]
    views."""
    if qh.dtype in (torch.bfloat16, torch.float16):  # cuDNN's fused attention: fp32 inputs come back as NaN
        try:
            return torch.ops.aten._scaled_dot_product_cudnn_attention(
                qh, kh, vh, None, True, 0.0, True, False, scale=scale)[:2]
        except RuntimeError:  # cuDNN refuses some shapes / GPUs
            pass
    # the memory-efficient kernel also returns the LSE, and takes fp32
    return torch.ops.aten._scaled_dot_product_efficient_attention(qh, kh, vh, None, True, 0.0, True, scale=scale)[:2]


def _check_last_row_lse(q, k, scale, lse) -> None:
    """The last query row of q, k [B, T, H, D] attends to every key: its LSE (lse [B, H, T]) is a dot product
    away."""
    scores = torch.einsum("bhd,bshd->bhs", q[:, -1], k)  # [B, H, T] in the input dtype: no fp32 copy of k
    direct = torch.logsumexp(scores.float() * scale, dim=-1)
    tol = 2e-2 * direct.abs().clamp(min=1.0)  # catches another convention (base 2, padding), not rounding
    torch._assert_async(((lse[:, :, -1] - direct).abs() <= tol).all(),
                        "the attention backend's log-sum-exp is not the natural-log LSE over causal keys")
