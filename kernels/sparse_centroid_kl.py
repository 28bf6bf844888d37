"""Fused sparse centroid KL (docs/DESIGN.md section 3, "Sparse stage at scale"): Triton kernel and autograd Function.

    loss   = (1 / (B T)) sum_{b,t} KL(target_t || softmax_j I_t(j))     over row t's valid top-k entries j
    I_t(j) = sum_h w_{t,h} relu(qI_{t,h} . kI_{idx_j})
    dL/dI_t(j) = (softmax_j I_t(j) sum_i target_t(i) - target_t(j)) / (B T)       (the sum is ~1)

Shapes: index_q [B, T, HI, D], index_k [B, T, D], index_w [B, T, HI] (already scaled), target [B, T, K] fp32 (the
group's sparse centroid, aligned with topk_indices), topk_indices [B, T, K] (-1 = no key; entry j is valid iff
doc_start(t) <= idx_j <= t), cu_seqlens int [num_docs + 1]. Rows without valid entries contribute 0.

The loss is terminal, so the forward computes the input gradients and backward only scales them. One program
per query row: its [HI, D] queries against [BLOCK_K, D] keys gathered by index. Pass 1: I, its online LSE and
the row's KL terms. Pass 2 (gradients): I again, dL/dI, then d index_q and d index_w of the row in registers and
d index_k scattered by fp32 atomics into a [B, S, D] buffer. Compute O(T K HI D), memory O(T (HI D + K)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_sparse_kl, document_starts
from kernels.tiles import tile_config
from kernels.triton_utils import TL_DTYPES, TL_LOG2E, dot_dtype, load_rows, online_lse, scale_saved_grads


@triton.jit
def _gathered_logits(q, w, k_base, key, ok, ik_t, ik_d, D: tl.constexpr, DI: tl.constexpr, PREC: tl.constexpr,
                     DOT: tl.constexpr):
    """(I [BLOCK_K] fp32, head dots s [BLOCK_HI, BLOCK_K] fp32, keys [BLOCK_K, DI]) of one row's queries q
    [BLOCK_HI, DI] and weights w [BLOCK_HI] against the keys gathered at `key` (rows where ok)."""
    k = load_rows(k_base, key, ok, ik_t, ik_d, 0, DI, D, DOT)
    s = tl.dot(q, tl.trans(k), input_precision=PREC)
    return tl.sum(w[:, None] * tl.maximum(s, 0.0), 0), s, k


@triton.jit
def _sparse_kl_kernel(iq, ik, iw, target_ptr, idx_ptr, doc_ptr, loss_ptr, dq_ptr, dk_ptr, dw_ptr,
                      iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h, tg_b, tg_t, tg_k, i_b, i_t, i_k,
                      T, S, HI, K, inv_rows,
                      D: tl.constexpr, DI: tl.constexpr, BLOCK_HI: tl.constexpr, BLOCK_K: tl.constexpr,
                      WRITE_GRAD: tl.constexpr, GRAD_DTYPE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    """One query row: its KL into loss [B*T]; (WRITE_GRAD) d index_q [B*T, HI, D] and d index_w [B*T, HI]
    stored, d index_k added into dk [B*S, D] fp32 (S keys per batch row). Grid (B*T,)."""
    r = tl.program_id(0)  # flattened row b*T + t
    b = r // T
    t = r % T
    heads = tl.arange(0, BLOCK_HI)
    head_ok = heads < HI
    q = load_rows(iq + b.to(tl.int64) * iq_b + t.to(tl.int64) * iq_t, heads, head_ok, iq_h, iq_d, 0, DI, D, DOT)
    w = tl.load(iw + b.to(tl.int64) * iw_b + t.to(tl.int64) * iw_t + heads * iw_h, mask=head_ok,
                other=0.0).to(tl.float32)
    k_base = ik + b.to(tl.int64) * ik_b
    idx_base = idx_ptr + b.to(tl.int64) * i_b + t.to(tl.int64) * i_t
    tg_base = target_ptr + b.to(tl.int64) * tg_b + t.to(tl.int64) * tg_t
    start = tl.load(doc_ptr + r)
    m = tl.full((1,), float("-inf"), tl.float32)  # base-2 online LSE of I
    l = tl.zeros((1,), tl.float32)
    entropy = tl.zeros((BLOCK_K,), tl.float32)  # per lane: sum target log target, sum target I, sum target
    cross = tl.zeros((BLOCK_K,), tl.float32)
    mass = tl.zeros((BLOCK_K,), tl.float32)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        key = tl.load(idx_base + j * i_k, mask=j < K, other=-1)
        ok = (key >= start) & (key <= t)
        logit, _, _ = _gathered_logits(q, w, k_base, key, ok, ik_t, ik_d, D, DI, PREC, DOT)
        m, l = online_lse(m, l, tl.where(ok, logit * TL_LOG2E, float("-inf"))[None, :])
        p = tl.load(tg_base + j * tg_k, mask=ok, other=0.0)
        entropy += tl.where(p > 0, p * tl.log(tl.where(p > 0, p, 1.0)), 0.0)
        cross += p * logit
        mass += p
    has_keys = l > 0
    lse = tl.where(has_keys, m + tl.log2(tl.where(has_keys, l, 1.0)), 0.0) / TL_LOG2E  # [1], natural log; 0 if empty
    total = tl.sum(mass, 0)  # ~1 (a centroid of distributions over the valid entries)
    kl = tl.sum(entropy, 0) - tl.sum(cross, 0) + total * lse
    tl.store(loss_ptr + r, tl.sum(kl, 0))
    if WRITE_GRAD:
        cols = tl.arange(0, DI)
        dq = tl.zeros((BLOCK_HI, DI), tl.float32)
        dw = tl.zeros((BLOCK_HI,), tl.float32)
        for j0 in range(0, K, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            key = tl.load(idx_base + j * i_k, mask=j < K, other=-1)
            ok = (key >= start) & (key <= t)
            logit, s, k = _gathered_logits(q, w, k_base, key, ok, ik_t, ik_d, D, DI, PREC, DOT)
            p = tl.load(tg_base + j * tg_k, mask=ok, other=0.0)
            grad = tl.where(ok, total * tl.exp(logit - lse) - p, 0.0) * inv_rows  # dL/dI
            dw += tl.sum(tl.maximum(s, 0.0) * grad[None, :], 1)
            ds = tl.where(s > 0, w[:, None] * grad[None, :], 0.0).to(GRAD_DTYPE)  # dL/d(qI_h . kI_j)
            dq += tl.dot(ds, k.to(GRAD_DTYPE), input_precision=PREC)
            dk = tl.dot(tl.trans(ds), q.to(GRAD_DTYPE), input_precision=PREC)
            dk_ptrs = dk_ptr + (b * S + key).to(tl.int64)[:, None] * D + cols[None, :]
            tl.atomic_add(dk_ptrs, dk, mask=ok[:, None] & (cols < D)[None, :], sem="relaxed")
        dq_ptrs = dq_ptr + (r.to(tl.int64) * HI + heads)[:, None] * D + cols[None, :]
        tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=head_ok[:, None] & (cols < D)[None, :])
        tl.store(dw_ptr + r.to(tl.int64) * HI + heads, dw.to(dw_ptr.dtype.element_ty), mask=head_ok)


def _fused_forward(iq, ik, iw, target, topk_indices, cu_seqlens, need_grad):
    """(loss fp32 scalar, (d index_q, d index_k, d index_w) or None) of the sparse centroid KL."""
    if iq.dtype not in TL_DTYPES or ik.dtype != iq.dtype or iw.dtype not in TL_DTYPES:
        raise ValueError("the fused sparse_centroid_kl takes index_q and index_k of one dtype of bf16, fp16, fp32 "
                         f"(index_w any of them); got {iq.dtype}, {ik.dtype}, {iw.dtype}")
    cfg = tile_config(iq.device)
    B, T, HI, D = iq.shape
    S = ik.shape[1]  # keys: tokens, or compressed entries
    K = topk_indices.shape[-1]
    dev = iq.device
    doc = document_starts(cu_seqlens, B, T, dev).to(torch.int32).contiguous()
    idx = topk_indices.to(torch.int32)
    target = target.float()
    dot = dot_dtype(iq)
    loss_rows = torch.empty(B * T, device=dev, dtype=torch.float32)
    if need_grad:
        d_iq = torch.empty(B, T, HI, D, device=dev, dtype=iq.dtype)
        d_iw = torch.empty(B, T, HI, device=dev, dtype=iw.dtype)
        d_ik = torch.zeros(B, S, D, device=dev, dtype=torch.float32)
    else:
        d_iq = d_iw = d_ik = loss_rows  # unused placeholder pointers
    _sparse_kl_kernel[(B * T,)](
        iq, ik, iw, target, idx, doc, loss_rows, d_iq, d_ik, d_iw,
        *iq.stride(), *ik.stride(), *iw.stride(), *target.stride(), *idx.stride(),
        T=T, S=S, HI=HI, K=K, inv_rows=1.0 / (B * T),
        D=D, DI=max(cfg.min_dot, triton.next_power_of_2(D)),
        BLOCK_HI=max(cfg.min_dot, triton.next_power_of_2(HI)),
        BLOCK_K=cfg.sparse_kl_block_k, WRITE_GRAD=need_grad,
        GRAD_DTYPE=tl.bfloat16 if dot == tl.bfloat16 else tl.float32,
        PREC="ieee" if iq.dtype == torch.float32 else "tf32", DOT=dot, num_warps=cfg.sparse_kl_warps)
    loss = loss_rows.sum() / (B * T)
    return loss, ((d_iq, d_ik.to(ik.dtype), d_iw) if need_grad else None)


class SparseCentroidKL(torch.autograd.Function):
    """Autograd Function of the fused loss: forward computes loss and input gradients, backward scales them."""

    @staticmethod
    def forward(ctx, index_q, index_k, index_w, target, topk_indices, cu_seqlens):
        need_grad = any(ctx.needs_input_grad[:3])
        loss, grads = _fused_forward(index_q, index_k, index_w, target, topk_indices, cu_seqlens, need_grad)
        if need_grad:
            ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return scale_saved_grads(ctx, grad_loss) + (None,) * 3


def sparse_centroid_kl(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, target: torch.Tensor,
                       topk_indices: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Fused `kernels.reference.sparse_centroid_kl` (same arguments and semantics): an fp32 scalar.

    index_q and index_k share one dtype (bf16, fp16 or fp32); index_w may be any of them (the Distiller passes
    fp32 head weights); each gradient comes back in its input's dtype. Entries of a row must be distinct.
    """
    check_sparse_kl(index_q, index_k, index_w, target, topk_indices)
    return SparseCentroidKL.apply(index_q, index_k, index_w, target, topk_indices, cu_seqlens)
