"""Fused indexer scores + top-k (the DSA key selection) without a T x T score matrix.

    I_t(s) = sum_j w_{t,j} relu(qI_{t,j} . kI_s),   top-k over the visible keys s of row t
    (causal, in row t's document: start(t) <= s <= t; compressed keys, ratio > 1: s < (t + 1) // ratio).

Shapes: index_q [B, T, HI, D], index_k [B, T // ratio, D], index_w [B, T, HI] -> int32 [B, T, k] (-1 = no key).

A radix select, as inference top-k kernels do it (a threshold, not a sort). Persistent programs walk
blocks of BLOCK_T consecutive query rows, longest rows first. Per block:

1. Scores: each [BLOCK_S, D] key tile is multiplied with the block's [BLOCK_T * HI, D] query heads (one
   dot; key tiles are shared by the block's rows), relu, weighted sum over heads in fp32. Each row's
   scores go to the program's scratch row in global memory as order keys: int32 whose signed order is
   the fp32 order (sign-folded bits).
2. Threshold: per row, the k-th largest order key is found one byte at a time from the top: a
   256-bin histogram of the next byte over the keys that match the bytes fixed so far, then the bucket
   where the count from the top reaches k. It stops early once the boundary bucket is taken whole, at
   most four passes over the row's scratch.
3. Output: one more pass writes the keys above the threshold (at cumsum positions), then the first
   of the keys equal to it until k are written (ties broken by key index). The order within a row is
   ascending key index, ties last.

Rows with at most k visible keys need no scores: all their keys, then -1. The visible keys of a row are
`_visible(start, t, RATIO)`: the one place that says which keys a row sees.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_indexer_inputs, check_ratio, document_starts
from kernels.tiles import tile_config
from kernels.triton_utils import TL_DTYPES, dot_dtype, sm_count


@triton.jit
def _visible(start, t, RATIO: tl.constexpr):
    """(first, last) visible key of rows t whose document starts at `start`: causal, in-document; with RATIO
    tokens per key (compressed entries, no documents) the entries complete by token t."""
    return start, start + (t - start + 1) // RATIO - 1


@triton.jit
def _order_key(score):
    """Int32 whose signed order is the fp32 order of `score` (negative floats' magnitude bits flipped)."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _score_block(iq, ik, iw, scr, b, t0, first, last, lo, hi, T,
                 iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h, HI, D: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_S: tl.constexpr,
                 PREC: tl.constexpr, DOT: tl.constexpr):
    """scr[r, s] = order key of I_{t0+r}(s) for every visible key s of the block's rows r (keys lo .. hi)."""
    m = tl.arange(0, BLOCK_T * BLOCK_H)  # query head m % BLOCK_H of row t0 + m // BLOCK_H
    head, row = m % BLOCK_H, t0 + m // BLOCK_H
    cols = tl.arange(0, DI)
    m_ok = (head < HI) & (row < T)
    q_ptrs = (iq + tl.cast(b, tl.int64) * iq_b + row.to(tl.int64)[:, None] * iq_t + head[:, None] * iq_h
              + cols[None, :] * iq_d)
    q = tl.load(q_ptrs, mask=m_ok[:, None] & (cols < D)[None, :], other=0.0).to(DOT)
    w = tl.load(iw + tl.cast(b, tl.int64) * iw_b + row.to(tl.int64) * iw_t + head * iw_h, mask=m_ok,
                other=0.0).to(tl.float32)
    k_base = ik + tl.cast(b, tl.int64) * ik_b
    rows = tl.arange(0, BLOCK_T)
    sub = tl.arange(0, BLOCK_S)
    for s0 in range(lo, hi + 1, BLOCK_S):
        keys = s0 + sub
        k_ptrs = k_base + keys.to(tl.int64)[:, None] * ik_t + cols[None, :] * ik_d
        kt = tl.load(k_ptrs, mask=(keys <= hi)[:, None] & (cols < D)[None, :], other=0.0).to(DOT)
        heads = tl.maximum(tl.dot(kt, tl.trans(q), input_precision=PREC), 0.0) * w[None, :]  # [S, T * H]
        if BLOCK_T == 1:
            score = tl.sum(heads, 1)[:, None]
        else:
            score = tl.sum(tl.reshape(heads, (BLOCK_S, BLOCK_T, BLOCK_H)), 2)  # [S, T]
        ok = (keys[:, None] >= first[None, :]) & (keys[:, None] <= last[None, :])
        tl.store(scr + rows[None, :] * T + keys[:, None], _order_key(score), mask=ok)


@triton.jit
def _threshold(scr_row, lo, hi, K, SEL: tl.constexpr):
    """(thr, known, need): the k-th largest order key of scr_row[lo .. hi] agrees with thr on the bits of
    `known`; `need` keys of that bucket (thr on known) belong to the top k, all keys above it do."""
    sel = tl.arange(0, SEL)
    bins = tl.arange(0, 256)
    thr = tl.full([], 0, tl.int32)
    known = tl.full([], 0, tl.int32)
    shift = tl.full([], 24, tl.int32)
    need = K + 0 * lo
    go = hi >= lo
    while go:
        flip = tl.where(shift == 24, 128, 0)  # the top byte holds the sign: signed order -> unsigned bins
        hist = tl.zeros((256,), tl.int32)
        for s0 in range(lo, hi + 1, SEL):
            keys = s0 + sel
            v = tl.load(scr_row + keys, mask=keys <= hi, other=0)
            match = (keys <= hi) & ((v & known) == thr)
            hist += tl.histogram(((v >> shift) & 0xFF) ^ flip, 256, mask=match)
        at_or_above = tl.cumsum(hist, 0, reverse=True)
        bucket = tl.sum((at_or_above >= need).to(tl.int32), 0) - 1  # the bucket holding the k-th key
        in_bucket = tl.sum(tl.where(bins == bucket, hist, 0), 0)
        need -= tl.sum(tl.where(bins == bucket, at_or_above, 0), 0) - in_bucket
        thr = thr | ((bucket ^ flip) << shift)
        known = known | (0xFF << shift)
        go = (in_bucket > need) & (shift > 0)
        shift -= 8
    return thr, known, need


@triton.jit
def _write_selected(scr_row, out, lo, hi, K, thr, known, need, SEL: tl.constexpr):
    """out[0 : K - need] = the keys above thr (ascending), out[K - need : K] = the first `need` keys at thr."""
    sel = tl.arange(0, SEL)
    n_above = 0 * lo
    n_at = 0 * lo
    for s0 in range(lo, hi + 1, SEL):
        keys = s0 + sel
        v = tl.load(scr_row + keys, mask=keys <= hi, other=0) & known
        above = (keys <= hi) & (v > thr)
        at = (keys <= hi) & (v == thr)
        pos_above = n_above + tl.cumsum(above.to(tl.int32), 0) - 1
        pos_at = n_at + tl.cumsum(at.to(tl.int32), 0) - 1
        tl.store(out + pos_above, keys, mask=above)
        tl.store(out + (K - need) + pos_at, keys, mask=at & (pos_at < need))
        n_above += tl.sum(above.to(tl.int32), 0)
        n_at += tl.sum(at.to(tl.int32), 0)


@triton.jit
def _topk_kernel(iq, ik, iw, doc_ptr, out_ptr, scr_ptr,
                 iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h,
                 B, T, HI, D: tl.constexpr, K, n_prog, RATIO: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, DI: tl.constexpr, BLOCK_S: tl.constexpr,
                 SEL: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    """Row blocks pid, pid + n_prog, ... (longest first) of B x cdiv(T, BLOCK_T): out [B*T, K] int32."""
    pid = tl.program_id(0)
    scr = scr_ptr + pid.to(tl.int64) * BLOCK_T * T  # this program's [BLOCK_T, T] scores
    sel = tl.arange(0, SEL)
    rows = tl.arange(0, BLOCK_T)
    n_blocks = tl.cdiv(T, BLOCK_T)
    for i in range(pid, B * n_blocks, n_prog):
        b = i % B
        t0 = (n_blocks - 1 - i // B) * BLOCK_T
        live = t0 + rows < T
        first, last = _visible(tl.load(doc_ptr + b * T + t0 + rows, mask=live, other=0), t0 + rows, RATIO)
        scored = live & (last - first + 1 > K)
        if tl.max(scored.to(tl.int32), 0) > 0:
            lo = tl.min(tl.where(scored, first, T), 0)
            hi = tl.max(tl.where(scored, last, -1), 0)
            _score_block(iq, ik, iw, scr, b, t0, first, last, lo, hi, T,
                         iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h, HI, D,
                         BLOCK_T, BLOCK_H, DI, BLOCK_S, PREC, DOT)
            tl.debug_barrier()  # the scores are read back by other threads of the program
        for r in range(0, BLOCK_T):
            t = t0 + r
            if t < T:
                lo, hi = _visible(tl.load(doc_ptr + b * T + t), t, RATIO)
                out = out_ptr + (tl.cast(b, tl.int64) * T + t) * K
                if hi - lo + 1 <= K:
                    for j0 in range(0, K, SEL):
                        j = j0 + sel
                        tl.store(out + j, tl.where(j <= hi - lo, lo + j, -1), mask=j < K)
                else:
                    thr, known, need = _threshold(scr + r * T, lo, hi, K, SEL)
                    _write_selected(scr + r * T, out, lo, hi, K, thr, known, need, SEL)
        tl.debug_barrier()  # the next block overwrites the scratch


def indexer_topk(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, k: int, *,
                 cu_seqlens: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """Fused `kernels.reference.indexer_topk`: int32 [B, T, k], the same key sets up to ties, -1 padded.

    Each row's keys come in ascending index order (ties at the threshold last), not by score.
    cu_seqlens: offsets over the flattened B*T tokens; index_w may be fp32 with bf16/fp16 index_q and
    index_k (scores accumulate in fp32 either way); ratio: index_k holds T // ratio compressed keys, row t
    sees the first (t + 1) // ratio. Memory: the output and an int32 [programs, BLOCK_T, T] scratch.
    """
    check_indexer_inputs(index_q, index_k, index_w, ratio)
    check_ratio(ratio, cu_seqlens)
    if k < 1:
        raise ValueError(f"the fused indexer_topk takes k >= 1, got k={k}")
    if index_q.dtype not in TL_DTYPES or index_k.dtype != index_q.dtype or index_w.dtype not in TL_DTYPES:
        raise ValueError("index_q and index_k must share one dtype of bf16, fp16, fp32 (index_w any of them); got "
                         f"{index_q.dtype}, {index_k.dtype}, {index_w.dtype}")
    cfg = tile_config(index_q.device)
    B, T, HI, D = index_q.shape
    dev = index_q.device
    doc = document_starts(cu_seqlens, B, T, dev).to(torch.int32).contiguous()
    out = torch.empty(B, T, k, device=dev, dtype=torch.int32)
    block_t = cfg.topk_block_t
    n_prog = min(B * triton.cdiv(T, block_t), cfg.topk_programs * sm_count(dev))
    scratch = torch.empty(n_prog, block_t, T, device=dev, dtype=torch.int32)
    _topk_kernel[(n_prog,)](
        iq=index_q, ik=index_k, iw=index_w, doc_ptr=doc, out_ptr=out, scr_ptr=scratch,
        iq_b=index_q.stride(0), iq_t=index_q.stride(1), iq_h=index_q.stride(2), iq_d=index_q.stride(3),
        ik_b=index_k.stride(0), ik_t=index_k.stride(1), ik_d=index_k.stride(2),
        iw_b=index_w.stride(0), iw_t=index_w.stride(1), iw_h=index_w.stride(2),
        B=B, T=T, HI=HI, D=D, K=k, n_prog=n_prog, RATIO=ratio,
        BLOCK_T=block_t, BLOCK_H=max(cfg.min_dot, triton.next_power_of_2(HI)),
        DI=max(cfg.min_dot, triton.next_power_of_2(D)), BLOCK_S=cfg.topk_block_s, SEL=cfg.topk_select,
        PREC="ieee" if index_q.dtype == torch.float32 else "tf32", DOT=dot_dtype(index_q),
        num_warps=cfg.topk_warps)
    return out
