"""Fused indexer scores + top-k (the DSA key selection) without a T x T score matrix.

    I_t(s) = sum_j w_{t,j} relu(qI_{t,j} . kI_s),   top-k over the causal keys s of row t's document.

Shapes: index_q [B, T, HI, D], index_k [B, S, D], index_w [B, T, HI] -> int32 [B, T, k] (-1 = no key), with
S = T // ratio keys (ratio > 1: compressed entries; row t sees keys w < (t + 1) // ratio).

One persistent program walks query rows; per row it keeps the best KP = next_pow2(k) keys as packed
int64 (order-preserving score bits << 32 | key index) sorted descending in registers. Scores come
KP keys at a time (dots of the row's [HI, D] query heads against [BLOCK_S, D] key tiles, reduced over
heads in fp32) into a per-program KP slot, then are sorted and merged: the elementwise max of the
descending best list and the ascending new list is bitonic and holds the top KP of both, and one
bitonic merge sorts it. A chunk whose best score cannot enter is skipped. Rows with at most k keys
need no scores (all their keys, then -1).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_indexer_inputs, check_ratio, document_starts
from kernels.centroid_kl import TL_DTYPES, dot_dtype, tile_config

EMPTY = tl.constexpr(-(2**63))  # packed sentinel: below every score


@triton.jit
def _pack(score, keys):
    """Order-preserving int64: fp32 score bits (sign-folded) in the high word, key index in the low word."""
    bits = score.to(tl.int32, bitcast=True)
    bits = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits.to(tl.int64) << 32) | keys.to(tl.int64)


@triton.jit
def _topk_kernel(iq, ik, iw, doc_ptr, out_ptr, slot_ptr,
                 iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h,
                 B, T, HI, D: tl.constexpr, K, n_prog, RATIO: tl.constexpr,
                 BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_S: tl.constexpr, KP: tl.constexpr,
                 PREC: tl.constexpr, DOT: tl.constexpr):
    """Rows pid, pid + n_prog, ... of the flattened B*T: out [B*T, K] int32."""
    pid = tl.program_id(0)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, DI)
    sub = tl.arange(0, BLOCK_S)
    slots = tl.arange(0, KP)
    slot = slot_ptr + pid.to(tl.int64) * KP
    for r in range(pid, B * T, n_prog):
        b = r // T
        t = r % T
        start = tl.load(doc_ptr + r)
        end = start + (t - start + 1) // RATIO  # row t sees keys start .. end - 1
        out = out_ptr + tl.cast(r, tl.int64) * K
        if end - start <= K:
            tl.store(out + slots, tl.where(slots < end - start, start + slots, -1), mask=slots < K)
        else:
            q_ptrs = (iq + tl.cast(b, tl.int64) * iq_b + tl.cast(t, tl.int64) * iq_t + heads[:, None] * iq_h
                      + cols[None, :] * iq_d)
            q = tl.load(q_ptrs, mask=(heads < HI)[:, None] & (cols < D)[None, :], other=0.0).to(DOT)
            w_ptrs = iw + tl.cast(b, tl.int64) * iw_b + tl.cast(t, tl.int64) * iw_t + heads * iw_h
            w = tl.load(w_ptrs, mask=heads < HI, other=0.0).to(tl.float32)
            k_base = ik + tl.cast(b, tl.int64) * ik_b
            best = tl.full((KP,), EMPTY, tl.int64)
            for c0 in range(start, end, KP):
                for s0 in range(0, KP, BLOCK_S):
                    keys = c0 + s0 + sub
                    ok = keys < end
                    k_ptrs = k_base + keys.to(tl.int64)[:, None] * ik_t + cols[None, :] * ik_d
                    kt = tl.load(k_ptrs, mask=ok[:, None] & (cols < D)[None, :], other=0.0).to(DOT)
                    s = tl.dot(q, tl.trans(kt), input_precision=PREC)
                    score = tl.sum(w[:, None] * tl.maximum(s, 0.0), 0)
                    tl.store(slot + s0 + sub, tl.where(ok, _pack(score, keys), EMPTY))
                tl.debug_barrier()
                new = tl.load(slot + slots)
                tl.debug_barrier()
                if tl.max(new, 0) > tl.min(best, 0):
                    best = tl.bitonic_merge(tl.maximum(best, tl.sort(new)), descending=True)
            idx = (best & 0xFFFFFFFF).to(tl.int32)
            tl.store(out + slots, idx, mask=slots < K)


def indexer_topk(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, k: int, *,
                 cu_seqlens: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """Fused `kernels.reference.indexer_topk`: int32 [B, T, k], the same key sets up to ties, -1 padded.

    k up to 2048 (the per-row list lives in registers); cu_seqlens: offsets over the flattened B*T tokens;
    index_w may be fp32 with bf16/fp16 index_q and index_k (scores accumulate in fp32 either way);
    ratio: index_k holds T // ratio compressed keys, row t sees the first (t + 1) // ratio.
    """
    check_indexer_inputs(index_q, index_k, index_w, ratio)
    check_ratio(ratio, cu_seqlens)
    if not 1 <= k <= 2048:
        raise ValueError(f"the fused indexer_topk takes 1 <= k <= 2048, got k={k}")
    if index_q.dtype not in TL_DTYPES or index_k.dtype != index_q.dtype or index_w.dtype not in TL_DTYPES:
        raise ValueError("index_q and index_k must share one dtype of bf16, fp16, fp32 (index_w any of them); got "
                         f"{index_q.dtype}, {index_k.dtype}, {index_w.dtype}")
    cfg = tile_config(index_q.device)
    B, T, HI, D = index_q.shape
    dev = index_q.device
    doc = document_starts(cu_seqlens, B, T, dev).to(torch.int32).contiguous()
    out = torch.empty(B, T, k, device=dev, dtype=torch.int32)
    kp = triton.next_power_of_2(k)
    block_s = min(kp, cfg["topk_block_s"])
    n_prog = min(B * T, cfg["topk_programs"] * (torch.cuda.get_device_properties(dev).multi_processor_count
                                                 if dev.type == "cuda" else 1))
    slots = torch.empty(n_prog, kp, device=dev, dtype=torch.int64)
    _topk_kernel[(n_prog,)](
        index_q, index_k, index_w, doc, out, slots, *index_q.stride(), *index_k.stride(), *index_w.stride(),
        B, T, HI, D, k, n_prog, RATIO=ratio,
        BLOCK_H=max(cfg["min_dot"], triton.next_power_of_2(HI)), DI=max(cfg["min_dot"], triton.next_power_of_2(D)),
        BLOCK_S=block_s, KP=kp, PREC="ieee" if index_q.dtype == torch.float32 else "tf32", DOT=dot_dtype(index_q),
        num_warps=cfg["topk_warps"])
    return out
