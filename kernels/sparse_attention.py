"""Sparse MQA attention forward with LSE (docs/DESIGN.md section 3, "Sparse stage at scale"): the Triton kernels.

    out_{t,h}   = sum_j softmax_j(scale q_{t,h} . kv_{idx_j}) kv_{idx_j}[:v_dim]      over row t's valid entries j
    lse_{h,t}   = log sum_j exp(scale q_{t,h} . kv_{idx_j})
    prob_t(j)  += prob_weight / H sum_h exp(scale q_{t,h} . kv_{idx_j} - lse_{h,t})   (optional)

Shapes: q [B, T, H, Dk], kv [B, T, Dk] (one key per token shared by all heads, MLA's absorbed form; its first
v_dim columns are the value), topk_indices [B, T, K] (-1 = no key; entry j is valid iff
doc_start(t) <= idx_j <= t), cu_seqlens int [num_docs + 1] -> out [B, T, H, v_dim] (q's dtype), lse [B, H, T]
fp32 (-inf where a row has no valid entry, out 0 there), prob_out [B, T, K] fp32.

As FlashMLA's sparse prefill: the heads are the rows of the products, [BLOCK_H, Dk] queries of one (query row, head
block) against [BLOCK_K, Dk] keys gathered by index, Dk split into two power-of-two column pieces (576 = 512 + 64);
when v_dim is the first piece, the gathered key tile is the value tile. Online softmax over the row's key blocks
with fp32 accumulation, on a persistent grid (a few programs per SM, each taking items pid, pid + programs, ...).
With 8 warps the two warpgroups split each score tile's keys and the P.V tile's value columns (see `_unchained`:
Triton would otherwise have both compute the whole 64-row score tile). With prob_out the rows go in chunks of R (a
scratch budget): `_sparse_mqa_kernel` also writes every key block's p = exp2(s - m) (m the head's running max after
the block) into a [R, H, K] scratch (fp16 for 16-bit inputs, fp32 for fp32) and m into a [R, K / BLOCK_K, H] one;
then `_sparse_prob_kernel`, one program per (row, PROB_BLOCK entries) with many programs per SM, adds
sum_h p exp2(m - lse) (one exp2 per head and key block; the row's entries are its own, so plain stores). No key is
gathered and no dot recomputed for the probabilities.
Compute O(T K H Dk), memory the inputs, outputs and the R x H x K scratch: no T x T.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.reference import check_sparse_attention, document_starts
from kernels.tiles import Tiles, tile_config
from kernels.triton_utils import LOG2E, TL_DTYPES, TL_LOG2E, dot_dtype, load_rows, pow2_pieces, sm_count, strides


@triton.jit
def _unchained(x, always, SPLIT: tl.constexpr):
    """x (always is true at run time). With SPLIT, x passes through a runtime branch that Triton's choice of dot
    layouts does not look through: a dot whose result reaches another dot (the scores reach the P.V product) is
    laid out with every warp on its rows, so the two warpgroups of 8 warps both compute a 64-row score tile;
    through the branch it is laid out as an unchained dot, the warpgroups splitting its columns (the keys),
    as FlashMLA does. The branch yields a value it computes (x + 0), so canonicalisation keeps it."""
    if SPLIT:
        if always:
            x = x + 0.0
    return x


@triton.jit
def _sparse_mqa_kernel(q, kv, idx_ptr, doc_ptr, out_ptr, lse_ptr, p_scratch, m_scratch,
                       q_b, q_t, q_h, q_d, kv_b, kv_t, kv_d, i_b, i_t, i_k, o_b, o_t, o_h, o_d,
                       T, H, K, n_hb, n_kb, W, row0, n_items, scale_log2,
                       DK: tl.constexpr, V: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, DV: tl.constexpr,
                       BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, V_IS_A: tl.constexpr, WRITE_PROB: tl.constexpr,
                       SPLIT_S: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr):
    """Persistent: program pid takes the (query row, head block) items pid, pid + programs, ... of rows row0 ..
    (the head blocks of a row adjacent; item = (b*T + t - row0) * n_hb + hb). Per item: out, lse and (WRITE_PROB)
    p into p_scratch [R, n_hb * BLOCK_H, W] and m into m_scratch [R, n_kb, n_hb * BLOCK_H] at row b*T + t - row0
    (W >= K)."""
    pid = tl.program_id(0)
    heads_local = tl.arange(0, BLOCK_H)
    H_PAD = n_hb * BLOCK_H
    always = T > 0  # true, but known only at run time (see _unchained)
    for item in range(pid, n_items, tl.num_programs(0)):
        hb = item % n_hb
        i = item // n_hb  # the row in this launch's chunk
        r = row0 + i  # flattened row b*T + t
        b = r // T
        t = r % T
        heads = hb * BLOCK_H + heads_local
        head_ok = heads < H
        p_base = p_scratch + (i.to(tl.int64) * H_PAD + heads[:, None]) * W
        m_base = m_scratch + i.to(tl.int64) * n_kb * H_PAD + heads
        q_base = q + b.to(tl.int64) * q_b + t.to(tl.int64) * q_t
        qa = load_rows(q_base, heads, head_ok, q_h, q_d, 0, DA, DK, DOT)
        qb = qa
        if DB > 0:
            qb = load_rows(q_base, heads, head_ok, q_h, q_d, DA, DB, DK, DOT)
        kv_base = kv + b.to(tl.int64) * kv_b
        idx_base = idx_ptr + b.to(tl.int64) * i_b + t.to(tl.int64) * i_t
        start = tl.load(doc_ptr + r)
        m = tl.full((BLOCK_H,), float("-inf"), tl.float32)  # base-2 running max of each head
        l = tl.zeros((BLOCK_H,), tl.float32)
        acc = tl.zeros((BLOCK_H, DV), tl.float32)
        for kb in range(0, n_kb):
            j = kb * BLOCK_K + tl.arange(0, BLOCK_K)
            key = tl.load(idx_base + j * i_k, mask=j < K, other=-1)
            ok = (key >= start) & (key <= t)
            ka = load_rows(kv_base, key, ok, kv_t, kv_d, 0, DA, DK, DOT)
            s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
            if DB > 0:
                s = _unchained(s, always, SPLIT_S)
                kb_tile = load_rows(kv_base, key, ok, kv_t, kv_d, DA, DB, DK, DOT)
                s += tl.dot(qb, tl.trans(kb_tile), input_precision=PREC)
            s = tl.where(ok[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m - m_use)
            p = tl.exp2(s - m_use[:, None])
            l = l * alpha + tl.sum(p, 1)
            if WRITE_PROB:  # this block's p relative to its running max, rescaled once the row's LSE is known
                tl.store(p_base + j[None, :], p.to(p_scratch.dtype.element_ty))
                tl.store(m_base + kb * H_PAD, m_use)
            if V_IS_A:
                v = ka
            else:
                v = load_rows(kv_base, key, ok, kv_t, kv_d, 0, DV, V, DOT)
            p_dot = _unchained(p, always, SPLIT_S).to(DOT)
            alpha_dot = _unchained(alpha, always, SPLIT_S)
            acc = acc * alpha_dot[:, None] + tl.dot(p_dot, v, input_precision=PREC)
            m = m_new
        has_keys = l > 0
        lse2 = m + tl.log2(tl.where(has_keys, l, 1.0))
        out = acc / tl.where(has_keys, l, 1.0)[:, None]
        cols = tl.arange(0, DV)
        o_ptrs = (out_ptr + b.to(tl.int64) * o_b + t.to(tl.int64) * o_t + heads[:, None] * o_h
                  + cols[None, :] * o_d)
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & (cols < V)[None, :])
        lse_ptrs = lse_ptr + (b * H + heads).to(tl.int64) * T + t
        tl.store(lse_ptrs, tl.where(has_keys, lse2 / TL_LOG2E, float("-inf")), mask=head_ok)


@triton.jit
def _sparse_prob_kernel(idx_ptr, doc_ptr, lse_ptr, prob_ptr, p_scratch, m_scratch, i_b, i_t, i_k,
                        T, H, K, H_PAD, n_kb, W, row0, prob_scale,
                        BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, PROB_BLOCK: tl.constexpr):
    """prob [B*T, K] of row row0 + program_id(0), entries program_id(1) * PROB_BLOCK ...: += prob_scale x
    sum_h exp2(s_hj - lse2_h) = sum_h p_hj exp2(m_h(block of j) - lse2_h), one factor per (head, key block), from
    the scratches _sparse_mqa_kernel wrote for the chunk and the row's lse [B, H, T]; BLOCK_H heads per step."""
    i = tl.program_id(0)
    r = row0 + i
    b = r // T
    t = r % T
    NB: tl.constexpr = PROB_BLOCK // BLOCK_K  # key blocks per program
    j = tl.program_id(1) * PROB_BLOCK + tl.arange(0, PROB_BLOCK)
    key = tl.load(idx_ptr + b.to(tl.int64) * i_b + t.to(tl.int64) * i_t + j * i_k, mask=j < K, other=-1)
    ok = (key >= tl.load(doc_ptr + r)) & (key <= t)
    blocks = tl.program_id(1) * NB + tl.arange(0, NB)
    p_row = p_scratch + i.to(tl.int64) * H_PAD * W
    m_row = m_scratch + i.to(tl.int64) * n_kb * H_PAD
    prob = tl.zeros((NB, BLOCK_K), tl.float32)
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        head_ok = heads < H
        lse = tl.load(lse_ptr + (b * H + heads).to(tl.int64) * T + t, mask=head_ok, other=float("-inf"))
        use = (head_ok & (lse > float("-inf")))[:, None] & (blocks < n_kb)[None, :]
        m = tl.load(m_row + blocks[None, :] * H_PAD + heads[:, None], mask=use, other=0.0)
        factor = tl.where(use, tl.exp2(m - lse[:, None] * TL_LOG2E), 0.0)  # [BLOCK_H, NB]
        p = tl.load(p_row + heads[:, None] * W + j[None, :], mask=head_ok[:, None] & ok[None, :], other=0.0)
        prob += tl.sum(tl.reshape(p.to(tl.float32), (BLOCK_H, NB, BLOCK_K)) * factor[:, :, None], 0)
    prob_ptrs = prob_ptr + r.to(tl.int64) * K + j
    added = tl.load(prob_ptrs, mask=ok, other=0.0) + tl.reshape(prob, (PROB_BLOCK,)) * prob_scale
    tl.store(prob_ptrs, added, mask=ok)


class AttentionTiles(NamedTuple):
    """`_sparse_mqa_kernel`'s tiles: the key's two power-of-two column pieces (da, db), the padded value width dv,
    heads and gathered keys per block, head blocks and key blocks per row, and the scratch row width (K rounded up
    to whole probability programs)."""

    da: int
    db: int
    dv: int
    block_h: int
    block_k: int
    n_hb: int
    n_kb: int
    width: int


def attention_tiles(cfg: Tiles, H: int, K: int, DK: int, v_dim: int) -> AttentionTiles:
    """The tiles for H heads of DK columns (v_dim of them the value) and K entries per row under tile config cfg."""
    da, db = pow2_pieces(DK, cfg.min_dot)
    block_h = min(cfg.sparse_block_h, max(cfg.min_dot, triton.next_power_of_2(H)))
    block_k = cfg.sparse_block_k
    prob_block = cfg.sparse_prob_block  # a multiple of block_k
    return AttentionTiles(da, db, max(cfg.min_dot, triton.next_power_of_2(v_dim)), block_h, block_k,
                          triton.cdiv(H, block_h), triton.cdiv(K, block_k), triton.cdiv(K, prob_block) * prob_block)


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
    da, db, dv, block_h, block_k, n_hb, n_kb, width = attention_tiles(cfg, H, K, DK, v_dim)
    prob_block = cfg.sparse_prob_block
    programs = max(1, cfg.sparse_programs * sm_count(dev))
    rows = B * T
    chunk = rows
    if prob_out is None:
        p_scratch = m_scratch = lse  # unused placeholder pointers
    else:  # p of a chunk of rows: fp16 for 16-bit inputs (p is in [0, 1]), fp32 for fp32 inputs; whole waves
        p_dtype = torch.float32 if q.dtype == torch.float32 else torch.float16
        row_bytes = n_hb * block_h * (width * p_dtype.itemsize + n_kb * 4)
        wave = max(1, programs // n_hb)  # rows whose items fill the programs once
        fit = cfg.sparse_scratch_bytes // row_bytes  # rows the budget holds
        chunk = min(rows, max(wave, fit // wave * wave))
        p_scratch = torch.empty(chunk, n_hb * block_h, width, device=dev, dtype=p_dtype)
        m_scratch = torch.empty(chunk, n_kb, n_hb * block_h, device=dev, dtype=torch.float32)
    idx_strides = strides(idx, "i_", "btk")
    for row0 in range(0, rows, chunk):
        n_rows = min(chunk, rows - row0)
        n_items = n_rows * n_hb
        _sparse_mqa_kernel[(min(programs, n_items),)](
            q=q, kv=kv, idx_ptr=idx, doc_ptr=doc, out_ptr=out, lse_ptr=lse, p_scratch=p_scratch, m_scratch=m_scratch,
            **strides(q, "q_", "bthd"), **strides(kv, "kv_", "btd"), **idx_strides, **strides(out, "o_", "bthd"),
            T=T, H=H, K=K, n_hb=n_hb, n_kb=n_kb, W=width, row0=row0, n_items=n_items,
            scale_log2=float(scale) * LOG2E,
            DK=DK, V=v_dim, DA=da, DB=db, DV=dv, BLOCK_H=block_h, BLOCK_K=block_k, V_IS_A=v_dim == da,
            WRITE_PROB=prob_out is not None, SPLIT_S=bool(cfg.sparse_split_scores),
            PREC="ieee" if q.dtype == torch.float32 else "tf32", DOT=dot_dtype(q),
            num_warps=cfg.sparse_warps, num_stages=cfg.sparse_stages)
        if prob_out is not None:
            _sparse_prob_kernel[(n_rows, triton.cdiv(K, prob_block))](
                idx_ptr=idx, doc_ptr=doc, lse_ptr=lse, prob_ptr=prob_out, p_scratch=p_scratch, m_scratch=m_scratch,
                **idx_strides,
                T=T, H=H, K=K, H_PAD=n_hb * block_h, n_kb=n_kb, W=width, row0=row0,
                prob_scale=float(prob_weight) / H,
                BLOCK_H=min(cfg.sparse_prob_heads, block_h), BLOCK_K=block_k, PROB_BLOCK=prob_block,
                num_warps=cfg.sparse_prob_warps)
    return out, lse
