"""Sparse MQA attention forward with LSE (DESIGN.md section 3, "Sparse stage at scale"): the Triton kernel.

    out_{t,h}   = sum_j softmax_j(scale q_{t,h} . kv_{idx_j}) kv_{idx_j}[:v_dim]      over row t's valid entries j
    lse_{h,t}   = log sum_j exp(scale q_{t,h} . kv_{idx_j})
    prob_t(j)  += prob_weight / H sum_h exp(scale q_{t,h} . kv_{idx_j} - lse_{h,t})   (optional)

Shapes: q [B, T, H, Dk], kv [B, T, Dk] (one key per token shared by all heads, MLA's absorbed form; its first
v_dim columns are the value), topk_indices [B, T, K] (-1 = no key; entry j is valid iff
doc_start(t) <= idx_j <= t), cu_seqlens int [num_docs + 1] -> out [B, T, H, v_dim] (q's dtype), lse [B, H, T]
fp32 (-inf where a row has no valid entry, out 0 there), prob_out [B, T, K] fp32.

As FlashMLA's sparse prefill: one program per (query row, block of heads); the heads are the rows of the
products, [BLOCK_H, Dk] queries against [BLOCK_K, Dk] keys gathered by index, Dk split into two power-of-two
column pieces (576 = 512 + 64); when v_dim is the first piece, the gathered key tile is the value tile. Online
softmax over the row's key blocks with fp32 accumulation; with prob_out a second pass over the same blocks
adds the head-averaged probabilities (fp32 atomics across head blocks). Compute O(T K H Dk), memory the
inputs and outputs: no T x T.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.centroid_kl import LOG2E, TL_DTYPES, _LOG2E, _load_rows, _main_scores, _pow2_pieces, dot_dtype, \
    tile_config
from kernels.reference import check_sparse_attention, document_starts


@triton.jit
def _sparse_mqa_kernel(q, kv, idx_ptr, doc_ptr, out_ptr, lse_ptr, prob_ptr,
                       q_b, q_t, q_h, q_d, kv_b, kv_t, kv_d, i_b, i_t, i_k, o_b, o_t, o_h, o_d,
                       T, H, K, n_hb, scale_log2, prob_scale,
                       DK: tl.constexpr, V: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, V_IS_A: tl.constexpr,
                       WRITE_PROB: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    """One (query row, head block): out, lse and (WRITE_PROB) the probabilities added into prob [B*T, K];
    grid (B*T*n_hb,), the head blocks of a row adjacent."""
    pid = tl.program_id(0)
    hb = pid % n_hb
    r = pid // n_hb  # flattened row b*T + t
    b = r // T
    t = r % T
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < H
    q_base = q + b.to(tl.int64) * q_b + t.to(tl.int64) * q_t
    qa = _load_rows(q_base, heads, head_ok, q_h, q_d, 0, DA, DK, DOT)
    qb = qa
    if DB > 0:
        qb = _load_rows(q_base, heads, head_ok, q_h, q_d, DA, DB, DK, DOT)
    kv_base = kv + b.to(tl.int64) * kv_b
    idx_base = idx_ptr + b.to(tl.int64) * i_b + t.to(tl.int64) * i_t
    start = tl.load(doc_ptr + r)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # base-2 running max of each head
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, DV), tl.float32)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        key = tl.load(idx_base + j * i_k, mask=j < K, other=-1)
        ok = (key >= start) & (key <= t)
        ka = _load_rows(kv_base, key, ok, kv_t, kv_d, 0, DA, DK, DOT)
        s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
        if DB > 0:
            kb = _load_rows(kv_base, key, ok, kv_t, kv_d, DA, DB, DK, DOT)
            s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, 1)
        if V_IS_A:
            v = ka
        else:
            v = _load_rows(kv_base, key, ok, kv_t, kv_d, 0, DV, V, DOT)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PREC)
        m = m_new
    has_keys = l > 0
    lse2 = m + tl.log2(tl.where(has_keys, l, 1.0))
    out = acc / tl.where(has_keys, l, 1.0)[:, None]
    cols = tl.arange(0, DV)
    o_ptrs = (out_ptr + b.to(tl.int64) * o_b + t.to(tl.int64) * o_t + heads[:, None] * o_h
              + cols[None, :] * o_d)
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (cols < V)[None, :])
    lse_ptrs = lse_ptr + (b * H + heads).to(tl.int64) * T + t
    tl.store(lse_ptrs, tl.where(has_keys, lse2 / _LOG2E, float("-inf")), mask=head_ok)
    if WRITE_PROB:
        for j0 in range(0, K, BLOCK_K):
            j = j0 + tl.arange(0, BLOCK_K)
            key = tl.load(idx_base + j * i_k, mask=j < K, other=-1)
            ok = (key >= start) & (key <= t)
            s = _main_scores(qa, qb, kv_base, key, ok, kv_t, kv_d, DA, DB, DK, PREC, DOT)
            p = tl.where(head_ok[:, None] & ok[None, :], tl.exp2(s * scale_log2 - lse2[:, None]), 0.0)
            tl.atomic_add(prob_ptr + r.to(tl.int64) * K + j, tl.sum(p, 0) * prob_scale, mask=ok)


def sparse_mqa_attention(q: torch.Tensor, kv: torch.Tensor, topk_indices: torch.Tensor, scale: float, v_dim: int,
                         *, prob_out: torch.Tensor | None = None, prob_weight: float = 1.0,
                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `kernels.reference.sparse_mqa_attention` (same arguments and semantics): (out, lse).

    q and kv share one dtype (bf16, fp16 or fp32); prob_out must be contiguous. No autograd (the backbone is
    frozen): call it under no_grad.
    """
    check_sparse_attention(q, kv, topk_indices, v_dim, prob_out)
    if q.dtype not in TL_DTYPES or kv.dtype != q.dtype:
        raise ValueError(f"the fused sparse_mqa_attention takes q and kv of one dtype of bf16, fp16, fp32; got "
                         f"{q.dtype}, {kv.dtype}")
    if prob_out is not None and not prob_out.is_contiguous():
        raise ValueError("prob_out must be contiguous")
    cfg = tile_config(q.device)
    B, T, H, DK = q.shape
    K = topk_indices.shape[-1]
    dev = q.device
    doc = document_starts(cu_seqlens, B, T, dev).to(torch.int32).contiguous()
    idx = topk_indices.to(torch.int32)
    out = torch.empty(B, T, H, v_dim, device=dev, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    da, db = _pow2_pieces(DK, cfg["min_dot"])
    dv = max(cfg["min_dot"], triton.next_power_of_2(v_dim))
    block_h = min(cfg["sparse_block_h"], max(cfg["min_dot"], triton.next_power_of_2(H)))
    n_hb = triton.cdiv(H, block_h)
    _sparse_mqa_kernel[(B * T * n_hb,)](
        q, kv, idx, doc, out, lse, out if prob_out is None else prob_out,
        *q.stride(), *kv.stride(), *idx.stride(), *out.stride(),
        T=T, H=H, K=K, n_hb=n_hb, scale_log2=float(scale) * LOG2E, prob_scale=float(prob_weight) / H,
        DK=DK, V=v_dim, DA=da, DB=db, DV=dv, BLOCK_H=block_h, BLOCK_K=cfg["sparse_block_k"], V_IS_A=v_dim == da,
        WRITE_PROB=prob_out is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32", DOT=dot_dtype(q),
        num_warps=cfg["sparse_warps"], num_stages=cfg["sparse_stages"])
    return out, lse
