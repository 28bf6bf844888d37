"""Fused multi-layer centroid KL (docs/DESIGN.md sections 2-3): Triton kernels and their autograd Function.

    loss = (1 / (B T)) sum_{b,t} KL(pbar_t || softmax_s I_t(s))      over the allowed keys s of row t
    pbar_t(s) = 1/(G H) sum_{g,h} exp(scale q_{g,t,h} . k_{g,s,h} - lse_{g,h,t})
    I_t(s)    = sum_j w_{t,j} relu(qI_{t,j} . kI_s)

Shapes: index_q [B, T, HI, D], index_k [B, S, D], index_w [B, T, HI], main_q [G, B, T, H, Dq], main_k
[G, B, S, H or 1, Dq] (one key head: broadcast to the H query heads; or [.., Dq - Dr] with main_k_rope [G, B, S,
1, Dr] the columns all heads share, MLA's rope part), topk_indices [B, T, K] (-1 = no key),
cu_seqlens int [num_docs + 1] (offsets over the flattened B*T tokens; see kernels.reference), main_lse
[G, B, H, T] (natural log, over the allowed keys). Keys: S = T tokens (ratio 1), or S = T // ratio compressed
entries (DeepSeek-V4's CSA; no documents), key s covering tokens s*ratio .. s*ratio + ratio - 1, seen by row t
iff all of them are causal (s < (t + 1) // ratio); a row that sees no key contributes 0. The ratio is a
constexpr (RATIO) of every kernel, so that token keys (RATIO 1) compile to a token-only kernel.

The loss is terminal, so dL/dI = softmax(I) - pbar is known in the forward and the forward computes
the gradients of index_q/k/w right away; backward only scales them by grad_output. No T x T tensor is
ever built: besides inputs and gradients the memory is the per-row LSEs and one R x S fp32 scratch (I, then
dL/dI) for a chunk of R query rows (R from a 1 GiB budget, or `chunk_size`). Passes:

1. `_main_lse_kernel`, grid (row blocks, G*B*H): flash-style online LSE of each head of each served
   layer (skipped when main_lse is given).
2. For each chunk of R query rows:
   a. `_index_logits_kernel`, grid (key splits, row blocks, B): I (HI dots) written to the scratch, a flag for
      each non-empty tile, and partial online LSEs of I, joined by `index_logits`.
   b. `_centroid_kernel`, one program per (row block, key block) tile (grouped launch order so that
      concurrent programs share q and k tiles in L2): pbar (G*H dots), the rows' KL terms against the scratch's
      I, and dL/dI written over it.
   c. `_index_dq_kernel`, grid (HI, row blocks, B): recompute qI_j . kI on the flagged tiles; d qI_j
      and d w_j of a row block are complete in one program (registers, no atomics).
   d. `_index_dk_kernel`, grid (key blocks, row splits, B): recompute kI . qI_j; d kI summed over
      the chunk's rows and all HI heads in registers, one fp32 atomic add per program.
The centroid tiles and the indexer tiles are sized apart (kernels.tiles): the first is G*H dots of Dq per pair, the
others HI dots of D. The indexer logits are computed three times per pair (a, c, d), their gradient dots twice.
Dense stage: every causal key of the row's document. Sparse stage: the same tiles masked to the rows'
top-k sets (sorted once; a tile's mask is a binary search plus a merge walk), empty tiles skipped.
Dots take the input dtype (bf16/fp16/fp32) and accumulate in fp32; fp32 inputs use IEEE dots. dL/dI
enters the gradient dots as bf16 for bf16 inputs and as fp32 (TF32) for fp16, whose range it would
underflow. Tile shapes (kernels.tiles) were chosen with bench/tune_tiles.py; timings are in docs/BENCHMARKS.md.
On Hopper GPUs (and the CPU interpreter) bf16/fp16 tiles of main q/k, index q/k and of the scratch (in d qI) are
read by TMA through TensorDescriptors over the tensors flattened to rows of tokens (`tma_tiles`, `index_tiles`),
where their strides allow it; otherwise, and with Tiles.tma off, through pointers. A key column piece all heads
share (main_k_rope, MLA's rope part; all of a one-head main_k) is read once per served layer and tile, not once per
head (`key_pieces`): at DeepSeek-V3.2's shapes a head's q and k tiles are 80 KiB instead of 96.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.reference import check_centroid_kl, check_ratio, document_starts, joined_keys
from kernels.tiles import SCRATCH_BYTES, Tiles, device_kind, tile_config, tiles
from kernels.triton_utils import (
    LOG2E,
    TL_DTYPES,
    TL_LOG2E,
    dot_dtype,
    load_rows,
    load_tile,
    online_lse,
    pow2_pieces,
    row_tiles,
    scale_saved_grads,
    sm_count,
    strides,
    tma_ready,
)

NO_KEY = tl.constexpr(2**31 - 1)  # sorted top-k lists put invalid entries last


@triton.jit
def _last_token(keys, RATIO: tl.constexpr):
    """The last token of each key (RATIO tokens per key; token keys: the key itself): row t sees key s iff
    _last_token(s) <= t, i.e. s < (t + 1) // RATIO."""
    return keys * RATIO + (RATIO - 1)


@triton.jit
def _causal_in_document(keys, rows, doc, RATIO: tl.constexpr):
    """[M, N] bool: row t sees key s (its last token causal, not before the row's document start doc [M])."""
    return (_last_token(keys, RATIO)[None, :] <= rows[:, None]) & (keys[None, :] >= doc[:, None])


@triton.jit
def _walk_start(keys_ptr, b, T, rows, row_ok, K):
    """The merge walk over rows' sorted top-k lists ([B, T, K]) from their first entries: (base, cur, v) for
    `_walk`."""
    base = keys_ptr + (b * T + rows).to(tl.int64) * K
    cur = tl.zeros_like(rows)
    return base, cur, tl.load(base, mask=row_ok, other=NO_KEY)


@triton.jit
def _walk(base, cur, v, row_ok, n0, K, BLOCK_N: tl.constexpr):
    """Advance each row's cursor over its sorted keys in [n0, n0 + BLOCK_N); return (mask [M, N] int32, cur, v)."""
    keys = n0 + tl.arange(0, BLOCK_N)
    mask = tl.zeros((cur.shape[0], BLOCK_N), dtype=tl.int32)
    hit = v < n0 + BLOCK_N
    while tl.max(hit.to(tl.int32), 0) > 0:
        mask = mask | (hit[:, None] & (v[:, None] == keys[None, :])).to(tl.int32)
        cur = cur + hit.to(tl.int32)
        v = tl.load(base + cur, mask=row_ok & (cur < K), other=NO_KEY)
        hit = v < n0 + BLOCK_N
    return mask, cur, v


@triton.jit
def _sparse_tile_mask(keys_ptr, rows, row_ok, n0, K, BLOCK_N: tl.constexpr, LOG2K: tl.constexpr):
    """[M, N] int32: which keys n0 .. n0+N-1 are in each row's sorted top-k list (binary search, then walk)."""
    base = keys_ptr + rows.to(tl.int64) * K
    lo = tl.zeros_like(rows)
    hi = tl.zeros_like(rows) + K
    for _ in tl.static_range(LOG2K):
        mid = (lo + hi) // 2
        v = tl.load(base + mid, mask=row_ok & (mid < hi), other=NO_KEY)
        right = v < n0
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    v = tl.load(base + lo, mask=row_ok & (lo < K), other=NO_KEY)
    mask, _, _ = _walk(base, lo, v, row_ok, n0, K, BLOCK_N)
    return mask


@triton.jit
def _main_scores(qa, qb, ka, kb, DB: tl.constexpr, PREC: tl.constexpr):
    """q . k of one head from its column pieces: qa [M, DA] . ka [N, DA] (+ qb [M, DB] . kb [N, DB]) -> [M, N]
    fp32."""
    s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
    if DB > 0:
        s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
    return s


@triton.jit
def _head_query(mq, tq_a, tq_b, g, b, h, B, T, row0, rows, row_ok, sq_g, sq_b, sq_t, sq_h, sq_d,
                DA: tl.constexpr, DB: tl.constexpr, DQ: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """(qa [M, DA], qb [M, DB] (qa when DB = 0)): head h of served layer g's queries at `rows` (row0 the first), in
    two column pieces. TMA: read through the q descriptors tq_a, tq_b."""
    q_base = mq + tl.cast(g, tl.int64) * sq_g + b.to(tl.int64) * sq_b + h * sq_h
    r = (g * B + b) * T + row0
    qa = load_tile(q_base, tq_a, r, h * sq_h, rows, row_ok, sq_t, sq_d, DA, DQ, DOT, TMA)
    qb = qa
    if DB > 0:
        qb = load_tile(q_base + DA * sq_d, tq_b, r, h * sq_h + DA, rows, row_ok, sq_t, sq_d, DB, DQ - DA, DOT, TMA)
    return qa, qb


@triton.jit
def _scores_reading_b(qa, qb, key_a, kb_base, tk_b, row, col_b, keys, key_ok, sr_t, sr_d, DB: tl.constexpr,
                      WB: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """q . k of one head (`_main_scores`) with its key piece b read after the first dot, which then need not wait
    for that copy: from kb_base, or through tk_b at (row, col_b) (`load_tile`)."""
    s = tl.dot(qa, tl.trans(key_a), input_precision=PREC)
    if DB > 0:
        key_b = load_tile(kb_base, tk_b, row, col_b, keys, key_ok, sr_t, sr_d, DB, WB, DOT, TMA)
        s += tl.dot(qb, tl.trans(key_b), input_precision=PREC)
    return s


@triton.jit
def _index_logits(iq_base, tq, q_row, iw_base, ki, rows, row_ok, HI, D: tl.constexpr, sq_t, sq_h, sq_d, sw_t, sw_h,
                  BLOCK_N: tl.constexpr, DI: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
                  TMA: tl.constexpr):
    """I [M, N] fp32 = sum_j w_j relu(qI_j . kI) for the rows of one block against the key tile ki [N, DI]; TMA:
    qI_j read through the descriptor tq at row q_row (`index_tiles`), else from iq_base."""
    acc = tl.zeros((rows.shape[0], BLOCK_N), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    for j in range(HI):
        qj = load_tile(iq_base + j * sq_h, tq, q_row, j * sq_h, rows, row_ok, sq_t, sq_d, DI, D, DOT, TMA)
        wj = tl.load(iw_base + rows64 * sw_t + j * sw_h, mask=row_ok, other=0.0).to(tl.float32)
        s = tl.dot(qj, tl.trans(ki), input_precision=PREC)
        acc += wj[:, None] * tl.maximum(s, 0.0)
    return acc


@triton.jit
def _main_lse_kernel(mq, mk, mr, tq_a, tq_b, tk_a, tk_b, lse_ptr, doc_ptr, keys_ptr,
                     sq_g, sq_b, sq_t, sq_h, sq_d, sk_g, sk_b, sk_t, sk_h, sk_d, sr_g, sr_b, sr_t, sr_h, sr_d,
                     B, T, H, K, DQ: tl.constexpr, scale_log2,
                     DA: tl.constexpr, DB: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, LOG2K: tl.constexpr, RATIO: tl.constexpr,
                     PREC: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """lse2 [G, B, H, T] (base 2) of scale*q.k over each row's allowed keys; grid (row blocks, G*B*H). Keys: piece a
    from mk, piece b from mr (`key_pieces`)."""
    rb = tl.program_id(0)
    ghb = tl.program_id(1)
    S = T // RATIO
    h = ghb % H
    b = (ghb // H) % B
    g = ghb // (H * B)
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    qa, qb = _head_query(mq, tq_a, tq_b, g, b, h, B, T, rb * BLOCK_M, rows, row_ok, sq_g, sq_b, sq_t, sq_h, sq_d,
                         DA, DB, DQ, DOT, TMA)
    ka_base = mk + g.to(tl.int64) * sk_g + b.to(tl.int64) * sk_b + h * sk_h
    kb_base = mr + g.to(tl.int64) * sr_g + b.to(tl.int64) * sr_b + h * sr_h
    k_row = (g * B + b) * S
    doc = tl.load(doc_ptr + b * T + rows, mask=row_ok, other=T)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    if SPARSE:
        base, cur, v = _walk_start(keys_ptr, b, T, rows, row_ok, K)
        nxt = tl.min(v, 0)
        while nxt < T:
            n0 = (nxt // BLOCK_N) * BLOCK_N
            sel, cur, v = _walk(base, cur, v, row_ok, n0, K, BLOCK_N)
            keys = n0 + tl.arange(0, BLOCK_N)
            key_a = load_tile(ka_base, tk_a, k_row + n0, h * sk_h, keys, keys < S, sk_t, sk_d, DA, WA, DOT, TMA)
            s = _scores_reading_b(qa, qb, key_a, kb_base, tk_b, k_row + n0, h * sr_h, keys, keys < S, sr_t, sr_d, DB,
                                  WB, PREC, DOT, TMA)
            m, l = online_lse(m, l, tl.where(sel != 0, s * scale_log2, float("-inf")))
            nxt = tl.min(v, 0)
    else:
        lo = (tl.min(doc, 0) // BLOCK_N) * BLOCK_N
        hi = tl.minimum((rb + 1) * BLOCK_M, T) // RATIO  # the keys of the block's last row
        for n0 in range(lo, hi, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            key_a = load_tile(ka_base, tk_a, k_row + n0, h * sk_h, keys, keys < S, sk_t, sk_d, DA, WA, DOT, TMA)
            s = _scores_reading_b(qa, qb, key_a, kb_base, tk_b, k_row + n0, h * sr_h, keys, keys < S, sr_t, sr_d, DB,
                                  WB, PREC, DOT, TMA)
            allowed = _causal_in_document(keys, rows, doc, RATIO)
            m, l = online_lse(m, l, tl.where(allowed, s * scale_log2, float("-inf")))
    tl.store(lse_ptr + ghb.to(tl.int64) * T + rows, m + tl.log2(tl.where(l > 0, l, 1.0)), mask=row_ok)


@triton.jit
def _index_logits_kernel(iq, ik, iw, tq, tk, m_ptr, l_ptr, doc_ptr, keys_ptr, logit_ptr, flag_ptr,
                         iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h,
                         B, T, HI, D: tl.constexpr, K, r0, R, n_kb, split_keys,
                         DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPARSE: tl.constexpr, LOG2K: tl.constexpr, RATIO: tl.constexpr, PREC: tl.constexpr,
                         DOT: tl.constexpr, TMA: tl.constexpr):
    """The indexer logits I of chunk rows r0 .. r0+R at their allowed keys among keys split * split_keys ..
    + split_keys (dense; SPARSE: one split walks the rows' top-k lists): into the scratch [B, R, S] fp32, a flag
    [B, row blocks, n_kb] for each tile with an allowed pair, and the partial online LSE (base-2 max m, sum l;
    [splits, B, R] each) that `index_logits` joins. Grid (splits, row blocks, B): every key block reloads the row
    block's queries of all HI heads, so the splits of one row block run side by side (split fastest), sharing them
    in L2, and the row blocks with the most keys run first."""
    split = tl.program_id(0)
    rb = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.program_id(2)
    S = T // RATIO
    rows = r0 + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.minimum(r0 + R, T)
    iq_base = iq + b.to(tl.int64) * iq_b
    iw_base = iw + b.to(tl.int64) * iw_b
    k_base = ik + b.to(tl.int64) * ik_b
    q_row = b * T + r0 + rb * BLOCK_M  # the block's first row in index_q flattened to [B*T, HI*D] (TMA)
    out_rows = logit_ptr + b.to(tl.int64) * R * S + (rows - r0).to(tl.int64)[:, None] * S
    flags = flag_ptr + (b * tl.num_programs(1) + rb).to(tl.int64) * n_kb
    doc = tl.load(doc_ptr + b * T + rows, mask=row_ok, other=T)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    if SPARSE:
        base, cur, v = _walk_start(keys_ptr, b, T, rows, row_ok, K)
        nxt = tl.min(v, 0)
        while nxt < T:
            n0 = (nxt // BLOCK_N) * BLOCK_N
            sel, cur, v = _walk(base, cur, v, row_ok, n0, K, BLOCK_N)
            m, l = _index_logits_tile(iq_base, iw_base, k_base, tq, tk, q_row, b * S, rows,
                                      row_ok, n0, sel != 0, m, l, out_rows, flags, HI, D, S, iq_t, iq_h, iq_d, ik_t,
                                      ik_d, iw_t, iw_h, BLOCK_N, DI, PREC, DOT, TMA)
            nxt = tl.min(v, 0)
    else:
        lo = tl.maximum((tl.min(doc, 0) // BLOCK_N) * BLOCK_N, split * split_keys)
        hi = tl.minimum(tl.minimum(r0 + (rb + 1) * BLOCK_M, T) // RATIO, (split + 1) * split_keys)  # last row's
        for n0 in range(lo, hi, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            allowed = _causal_in_document(keys, rows, doc, RATIO) & row_ok[:, None]
            m, l = _index_logits_tile(iq_base, iw_base, k_base, tq, tk, q_row, b * S, rows,
                                      row_ok, n0, allowed, m, l, out_rows, flags, HI, D, S, iq_t, iq_h, iq_d, ik_t,
                                      ik_d, iw_t, iw_h, BLOCK_N, DI, PREC, DOT, TMA)
    out = (split * B + b).to(tl.int64) * R + rows - r0
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(l_ptr + out, l, mask=row_ok)


@triton.jit
def _index_logits_tile(iq_base, iw_base, k_base, tq, tk, q_row, k_row, rows, row_ok, n0, allowed, m, l, out_rows,
                       flags, HI, D: tl.constexpr, S, iq_t, iq_h, iq_d, ik_t, ik_d, iw_t, iw_h,
                       BLOCK_N: tl.constexpr, DI: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
                       TMA: tl.constexpr):
    """One key tile n0 .. n0+N of `_index_logits_kernel`: I at the allowed pairs [M, N] into the scratch rows
    out_rows, the tile's flag, and the online LSE (m, l) advanced over them. TMA: q and k through the descriptors
    tq, tk from rows q_row and k_row + n0."""
    keys = n0 + tl.arange(0, BLOCK_N)
    ki = load_tile(k_base, tk, k_row + n0, 0, keys, keys < S, ik_t, ik_d, DI, D, DOT, TMA)
    logits = _index_logits(iq_base, tq, q_row, iw_base, ki, rows, row_ok, HI, D, iq_t, iq_h, iq_d, iw_t, iw_h,
                           BLOCK_N, DI, PREC, DOT, TMA)
    tl.store(out_rows + keys[None, :], logits, mask=allowed)
    tl.store(flags + n0 // BLOCK_N, tl.max(allowed.to(tl.int8)))
    return online_lse(m, l, tl.where(allowed, logits * TL_LOG2E, float("-inf")))


@triton.jit
def _chunk_tile(doc_ptr, keys_ptr, b, T, K, r0, R, n_rb, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                GROUP: tl.constexpr, SPARSE: tl.constexpr, LOG2K: tl.constexpr, RATIO: tl.constexpr):
    """This program's (row block, key block) tile of chunk rows r0 .. r0+R of batch row b, in grouped launch order
    (GROUP row blocks walk the key blocks together, so that concurrent programs share tiles in L2):
    (rb, kb, rows [M], keys [N], row_ok, key_ok, allowed [M, N] bool: causal, in the row's document, in its top-k
    set when SPARSE (keys_ptr: sorted lists); all False for a tile above the diagonal)."""
    pid = tl.program_id(0)
    width = GROUP * n_kb
    first = (pid // width) * GROUP
    size = tl.minimum(n_rb - first, GROUP)
    rb = first + (pid % width) % size
    kb = (pid % width) // size
    rows = r0 + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    keys = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_end = tl.minimum(r0 + R, T)
    row_ok = rows < row_end
    key_ok = keys < T // RATIO
    doc = tl.load(doc_ptr + b * T + rows, mask=row_ok, other=T)
    allowed = _causal_in_document(keys, rows, doc, RATIO) & row_ok[:, None]
    if SPARSE:
        n0 = kb * BLOCK_N
        last_row = tl.minimum(r0 + (rb + 1) * BLOCK_M, row_end) - 1
        if (_last_token(n0, RATIO) <= last_row) & (n0 + BLOCK_N > tl.min(doc, 0)):
            sel = _sparse_tile_mask(keys_ptr + b.to(tl.int64) * T * K, rows, row_ok, n0, K, BLOCK_N, LOG2K)
            allowed = allowed & (sel != 0)
    return rb, kb, rows, keys, row_ok, key_ok, allowed


@triton.jit
def _centroid_kernel(mq, mk, mr, tq_a, tq_b, tk_a, tk_b, lse_ptr, doc_ptr, keys_ptr, grad_ptr, ilse_ptr, loss_ptr,
                     sq_g, sq_b, sq_t, sq_h, sq_d, sk_g, sk_b, sk_t, sk_h, sk_d, sr_g, sr_b, sr_t, sr_h, sr_d,
                     B, T, G, H, K, DQ: tl.constexpr, r0, R, n_rb, n_kb, scale_log2, inv_gh,
                     DA: tl.constexpr, DB: tl.constexpr, WA: tl.constexpr, WB: tl.constexpr, A_SHARED: tl.constexpr,
                     B_SHARED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUP: tl.constexpr, SPARSE: tl.constexpr, LOG2K: tl.constexpr, RATIO: tl.constexpr,
                     WRITE_GRAD: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """One (row block, key block) tile of chunk rows r0 .. r0+R: the centroid pbar = 1/(G H) sum_{g,h}
    exp2(scale_log2 q.k - lse2), and against the indexer logits I in the scratch [B, R, S] fp32
    (`_index_logits_kernel`) and their LSE ilse [B, R]: the rows' KL terms into loss [B, T], and (WRITE_GRAD)
    dL/dI = softmax(I) - pbar over I in the scratch (0 at the tile's pairs that are not allowed).
    Keys: piece a from mk, piece b from mr (`key_pieces`); a piece all heads share (A_SHARED, B_SHARED: head
    stride 0) is read once per served layer, not once per head."""
    b = tl.program_id(1)
    S = T // RATIO
    rb, kb, rows, keys, row_ok, key_ok, allowed = _chunk_tile(doc_ptr, keys_ptr, b, T, K, r0, R, n_rb, n_kb, BLOCK_M,
                                                              BLOCK_N, GROUP, SPARSE, LOG2K, RATIO)
    if tl.max(allowed.to(tl.int32)) > 0:
        pbar = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(G):
            k_row = (g * B + b) * S + kb * BLOCK_N
            ka_layer = mk + tl.cast(g, tl.int64) * sk_g + b.to(tl.int64) * sk_b
            kb_layer = mr + tl.cast(g, tl.int64) * sr_g + b.to(tl.int64) * sr_b
            if A_SHARED:  # read once for the layer's heads
                key_a = load_tile(ka_layer, tk_a, k_row, 0, keys, key_ok, sk_t, sk_d, DA, WA, DOT, TMA)
            if B_SHARED and DB > 0:
                key_b = load_tile(kb_layer, tk_b, k_row, 0, keys, key_ok, sr_t, sr_d, DB, WB, DOT, TMA)
            for h in range(H):
                qa, qb = _head_query(mq, tq_a, tq_b, g, b, h, B, T, r0 + rb * BLOCK_M, rows, row_ok, sq_g, sq_b,
                                     sq_t, sq_h, sq_d, DA, DB, DQ, DOT, TMA)
                # before the dots, so that its latency hides behind them (one program fills the SM)
                lse = tl.load(lse_ptr + ((g * B + b) * H + h).to(tl.int64) * T + rows, mask=row_ok, other=0.0)
                if not A_SHARED:
                    key_a = load_tile(ka_layer + h * sk_h, tk_a, k_row, h * sk_h, keys, key_ok, sk_t, sk_d, DA,
                                      WA, DOT, TMA)
                if B_SHARED and DB > 0:
                    s = _main_scores(qa, qb, key_a, key_b, DB, PREC)
                else:
                    s = _scores_reading_b(qa, qb, key_a, kb_layer + h * sr_h, tk_b, k_row, h * sr_h, keys, key_ok,
                                          sr_t, sr_d, DB, WB, PREC, DOT, TMA)
                pbar += tl.exp2(s * scale_log2 - lse[:, None])
        pbar = tl.where(allowed, pbar * inv_gh, 0.0)
        ptrs = grad_ptr + b.to(tl.int64) * R * S + (rows - r0).to(tl.int64)[:, None] * S + keys[None, :]
        ilse = tl.load(ilse_ptr + b.to(tl.int64) * R + rows - r0, mask=row_ok, other=0.0)
        log_q = tl.load(ptrs, mask=allowed, other=0.0) - ilse[:, None]
        if WRITE_GRAD:
            tl.store(ptrs, tl.where(allowed, tl.exp(log_q) - pbar, 0.0), mask=row_ok[:, None] & key_ok[None, :])
        kl = tl.where(pbar > 0, pbar * (tl.log(tl.where(pbar > 0, pbar, 1.0)) - log_q), 0.0)  # pbar is 0 off the mask
        tl.atomic_add(loss_ptr + b * T + rows, tl.sum(kl, 1), mask=row_ok, sem="relaxed")


@triton.jit
def _index_dq_kernel(iq, ik, iw, tq, tk, tg, grad_ptr, order_ptr, count_ptr, dq_ptr, dw_ptr,
                     iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h,
                     T, HI, D: tl.constexpr, r0, R, n_rb, n_kb, inv_rows,
                     DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RATIO: tl.constexpr,
                     GRAD_DTYPE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """d index_q [B, T, HI, D] and d index_w [B, T, HI] of one (row block, indexer head); grid (HI, row blocks, B):
    the HI heads of a row block run side by side (head fastest), so that its dL/dI rows come from HBM once and
    from L2 for the other heads, and the row blocks with the most keys run first."""
    j = tl.program_id(0)
    rb = n_rb - 1 - tl.program_id(1)
    b = tl.program_id(2)
    S = T // RATIO
    rows = r0 + rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.minimum(r0 + R, T)
    qj = load_rows(iq + b.to(tl.int64) * iq_b + j * iq_h, rows, row_ok, iq_t, iq_d, 0, DI, D, DOT)
    w_ptrs = iw + b.to(tl.int64) * iw_b + rows.to(tl.int64) * iw_t + j * iw_h
    wj = tl.load(w_ptrs, mask=row_ok, other=0.0).to(tl.float32)
    k_base = ik + b.to(tl.int64) * ik_b
    dq = tl.zeros((BLOCK_M, DI), dtype=tl.float32)
    dw = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tile = b * n_rb + rb
    for i in range(tl.load(count_ptr + tile)):
        kb = tl.load(order_ptr + tile.to(tl.int64) * n_kb + i)
        keys = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        key_ok = keys < S
        if TMA:  # rows past the chunk read other rows (their dq, dw are not stored), keys past S TMA's zeros
            grad = tg.load([b * R + rb * BLOCK_M, kb * BLOCK_N])
        else:
            g_ptrs = grad_ptr + b.to(tl.int64) * R * S + (rows - r0).to(tl.int64)[:, None] * S + keys[None, :]
            grad = tl.load(g_ptrs, mask=row_ok[:, None] & key_ok[None, :], other=0.0)
        ki = load_tile(k_base, tk, b * S + kb * BLOCK_N, 0, keys, key_ok, ik_t, ik_d, DI, D, DOT, TMA)
        s = tl.dot(qj, tl.trans(ki), input_precision=PREC)
        dw += tl.sum(grad * tl.maximum(s, 0.0), 1)
        ds = tl.where(s > 0, grad, 0.0)
        dq += tl.dot(ds.to(GRAD_DTYPE), ki.to(GRAD_DTYPE), input_precision=PREC)
    dq = dq * (wj * inv_rows)[:, None]
    cols = tl.arange(0, DI)
    dq_ptrs = dq_ptr + ((b * T + rows).to(tl.int64) * HI + j)[:, None] * D + cols[None, :]
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < D)[None, :])
    tl.store(dw_ptr + (b * T + rows).to(tl.int64) * HI + j, (dw * inv_rows).to(dw_ptr.dtype.element_ty),
             mask=row_ok)


@triton.jit
def _index_dk_kernel(iq, ik, iw, tq, tk, grad_ptr, flag_ptr, dk_ptr,
                     iq_b, iq_t, iq_h, iq_d, ik_b, ik_t, ik_d, iw_b, iw_t, iw_h,
                     T, HI, D: tl.constexpr, r0, R, n_rb, n_kb, rb_per_split, inv_rows,
                     DI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RATIO: tl.constexpr,
                     GRAD_DTYPE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, TMA: tl.constexpr):
    """Adds one key block's d index_k over a split of the chunk's row blocks into dk [B, S, D] fp32. Each row block
    loads its queries of all HI heads; the split's programs walk its row blocks from the last down, in step, so
    that they share them in L2 (ascending, each key block would start at its own diagonal)."""
    kb = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    S = T // RATIO
    keys = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < S
    ki = load_rows(ik + b.to(tl.int64) * ik_b, keys, key_ok, ik_t, ik_d, 0, DI, D, DOT)
    iq_base = iq + b.to(tl.int64) * iq_b
    iw_base = iw + b.to(tl.int64) * iw_b
    dk = tl.zeros((BLOCK_N, DI), dtype=tl.float32)
    rb_lo = split * rb_per_split
    rb_hi = tl.minimum(rb_lo + rb_per_split, n_rb)
    for i in range(rb_hi - rb_lo):
        rb = rb_hi - 1 - i
        if tl.load(flag_ptr + (b * n_rb + rb) * n_kb + kb) != 0:
            rows = r0 + rb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < tl.minimum(r0 + R, T)
            g_ptrs = grad_ptr + b.to(tl.int64) * R * S + (rows - r0).to(tl.int64)[None, :] * S + keys[:, None]
            grad_t = tl.load(g_ptrs, mask=row_ok[None, :] & key_ok[:, None], other=0.0)
            q_row = b * T + r0 + rb * BLOCK_M  # TMA: rows past the chunk read other rows, whose grad_t and wj are 0
            for j in range(HI):
                qj = load_tile(iq_base + j * iq_h, tq, q_row, j * iq_h, rows, row_ok, iq_t, iq_d, DI, D, DOT, TMA)
                wj = tl.load(iw_base + rows.to(tl.int64) * iw_t + j * iw_h, mask=row_ok, other=0.0)
                s_t = tl.dot(ki, tl.trans(qj), input_precision=PREC)
                ds_t = tl.where(s_t > 0, grad_t * wj.to(tl.float32)[None, :], 0.0)
                dk += tl.dot(ds_t.to(GRAD_DTYPE), qj.to(GRAD_DTYPE), input_precision=PREC)
    cols = tl.arange(0, DI)
    dk_ptrs = dk_ptr + (b * S + keys).to(tl.int64)[:, None] * D + cols[None, :]
    tl.atomic_add(dk_ptrs, dk * inv_rows, mask=key_ok[:, None] & (cols < D)[None, :], sem="relaxed")


def wide_head_tiles(cfg: Tiles, width: int) -> Tiles:
    """cfg for main heads `width` wide, so that the kernels' q and k tiles fit in shared memory: the centroid
    tiles are sized for DeepSeek-V3.2's 192; wider heads (GLM-5's and HY-V4's 256) take 64 x 64 centroid tiles, and
    heads wider than 256 (DeepSeek-V4's 512) also 64-row main-LSE tiles and one pipeline stage in both kernels."""
    if width > 192:
        cfg = cfg.replace(centroid_block_m=64, centroid_block_n=64, centroid_warps=4)
    if width > 256:
        cfg = cfg.replace(lse_block_m=min(cfg.lse_block_m, 64), lse_stages=1, centroid_stages=1)
    return cfg


def index_strides(iq: torch.Tensor, ik: torch.Tensor, iw: torch.Tensor) -> dict:
    """The indexer kernels' stride arguments: iq_b .. iq_d, ik_b .. ik_d, iw_b .. iw_h."""
    return dict(**strides(iq, "iq_", "bthd"), **strides(ik, "ik_", "btd"), **strides(iw, "iw_", "bth"))


def tma_tiles(mq: torch.Tensor, mk: torch.Tensor, mr: torch.Tensor, bm: int, bn: int, da: int, db: int,
              enabled: bool) -> dict:
    """The main kernels' descriptor arguments and TMA flag: tq_a, tq_b, tk_a, tk_b, `row_tiles` of q [bm, da],
    q [bm, db], k piece a [bn, da] and k piece b [bn, db] (the `da` ones again when db = 0) over main_q [G, B, T, H,
    Dq] and the key pieces mk, mr [G, B, S, H (head stride 0 if shared), *] (`key_pieces`) flattened to [G*B*T, token
    row]; rows past T (keys past S) read the next layer's or batch row's tokens, which the kernels mask like any
    pair they do not allow. All None (TMA False: the kernels read through pointers) unless `tma_ready`, the column
    pieces make up Dq in TMA boxes (<= 256 wide), and all three tensors flatten."""
    pointers = dict(tq_a=None, tq_b=None, tk_a=None, tk_b=None, TMA=False)
    if not tma_ready(mq, enabled) or da + db != mq.shape[-1] or max(da, db) > 256:
        return pointers
    tiles = dict(tq_a=row_tiles(mq, 3, (bm, da)), tq_b=row_tiles(mq, 3, (bm, db or da)),
                 tk_a=row_tiles(mk, 3, (bn, da)), tk_b=row_tiles(mr, 3, (bn, db or da)))
    return pointers if None in tiles.values() else dict(tiles, TMA=True)


def keys_apart(per_head: int, shared: int, device: torch.device) -> bool:
    """Whether the fused kernels on `device` take main_k_rope as a key piece of its own, read once per layer and
    tile: both widths powers of two of at least the device's smallest dot. Otherwise `key_pieces` joins the shared
    columns back into every head's key, a copy the size of main_k (a capture then keeps its keys joined instead)."""
    min_dot = tiles(device_kind(device)).min_dot
    return all(pow2_pieces(width, min_dot) == (width, 0) for width in (per_head, shared))


def key_pieces(mk: torch.Tensor, mk_rope: torch.Tensor | None, H: int, min_dot: int) -> dict:
    """main_k [G, B, S, H or 1, Dk] (and main_k_rope [G, B, S, 1, Dr], the columns every head shares) as the kernels'
    two column pieces: mk (piece a, WA columns in DA-wide tiles) and mr (piece b, WB columns in DB-wide tiles; DB 0:
    none), both [G, B, S, H, *] views with head stride 0 where all heads share them (A_SHARED, B_SHARED: the
    centroid kernel reads such a piece once per layer). Without main_k_rope, or where it cannot be a piece of its own
    (`keys_apart`), Dk (+ Dr) splits into `pow2_pieces` and mr is main_k[..., DA:]; with it, Dk is piece a and Dr
    piece b (DeepSeek-V3.2's nope 128 and shared rope 64)."""
    mk = mk.expand(-1, -1, -1, H, -1)  # one key head: head stride 0, no copy
    if mk_rope is not None:
        dk, dr = mk.shape[-1], mk_rope.shape[-1]
        if keys_apart(dk, dr, mk.device):
            return dict(mk=mk, mr=mk_rope.expand(-1, -1, -1, H, -1), DA=dk, DB=dr, WA=dk, WB=dr,
                        A_SHARED=mk.stride(3) == 0, B_SHARED=True)
        mk = joined_keys(mk, mk_rope)
    width = mk.shape[-1]
    da, db = pow2_pieces(width, min_dot)
    mr = mk[..., da:] if db else mk
    return dict(mk=mk, mr=mr, DA=da, DB=db, WA=min(da, width), WB=max(0, width - da), A_SHARED=mk.stride(3) == 0,
                B_SHARED=db > 0 and mr.stride(3) == 0)


def index_tiles(iq: torch.Tensor, ik: torch.Tensor, scratch: torch.Tensor, bm: int, bn: int, enabled: bool) -> dict:
    """The indexer kernels' descriptor arguments and TMA flag: tq, tk, tg, `row_tiles` of index_q [B, T, HI, D]
    as [B*T, HI*D] ([bm, D] tiles, head j at column j * head stride), index_k [B, S, D] as [B*S, D] ([bn, D]) and
    the dL/dI scratch [B, R, S] fp32 as [B*R, S] ([bm, bn]; d qI's alone). All None (TMA False) unless `tma_ready`,
    D is a power of two <= 256, and all three flatten."""
    pointers = dict(tq=None, tk=None, tg=None, TMA=False)
    D = iq.shape[-1]
    if not tma_ready(iq, enabled) or D & (D - 1) or D > 256:
        return pointers
    tiles = dict(tq=row_tiles(iq, 2, (bm, D)), tk=row_tiles(ik, 2, (bn, D)), tg=row_tiles(scratch, 2, (bm, bn)))
    return pointers if None in tiles.values() else dict(tiles, TMA=True)


def sorted_topk(topk_indices: torch.Tensor, doc_start: torch.Tensor, ratio: int) -> torch.Tensor:
    """Int32 [B, T, K]: each row's allowed top-k keys ascending (causal, in-document), NO_KEY after them."""
    T = topk_indices.shape[1]
    idx = topk_indices.to(torch.int32)
    rows = torch.arange(T, device=idx.device, dtype=torch.int32)[None, :, None]
    valid = (idx >= doc_start[..., None]) & (idx * ratio + ratio - 1 <= rows)  # the key's last token is causal
    return torch.where(valid, idx, NO_KEY.value).sort(dim=-1).values.contiguous()


def index_logits(iq, ik, iw, indexer_args, doc, keys, K, sparse, ratio, cfg, prec, dot, r0, R, scratch,
                 flags) -> torch.Tensor:
    """The indexer logits of chunk rows r0 .. r0+R into scratch [B, R, S] fp32 at their allowed pairs (indexer_args:
    the indexer kernels' strides and descriptors, `index_strides` and `index_tiles`), flags
    [B, row blocks, key blocks] int8 set on the indexer tiles that hold one; returns their natural-log LSE [B, R]
    fp32 over each row's allowed keys (0 for a row without keys, so that its masked-out terms stay finite:
    compressed keys' rows t < ratio - 1, top-k lists without a valid key): `_index_logits_kernel`'s partials over
    key splits (one split in the sparse stage), joined here."""
    B, T, HI, D = iq.shape
    bm, bn = cfg.block_m, cfg.block_n
    rows_per_chunk = scratch.shape[1]
    # at least index_lse_split keys per program, at most index_lse_splits partials per row (memory O(T), not T^2):
    # whole key blocks, so that no block straddles two splits
    chunk_keys = (r0 + R) // ratio
    split_keys = triton.cdiv(max(cfg.index_lse_split, triton.cdiv(chunk_keys, cfg.index_lse_splits)), bn) * bn
    splits = 1 if sparse else max(1, triton.cdiv(chunk_keys, split_keys))
    m = torch.empty(splits, B, rows_per_chunk, device=iq.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _index_logits_kernel[(splits, triton.cdiv(R, bm), B)](
        iq=iq, ik=ik, iw=iw, **indexer_args, m_ptr=m, l_ptr=l, doc_ptr=doc, keys_ptr=keys, logit_ptr=scratch,
        flag_ptr=flags, B=B, T=T, HI=HI, D=D, K=K, r0=r0, R=rows_per_chunk, n_kb=flags.shape[-1], split_keys=split_keys,
        DI=max(cfg.min_dot, triton.next_power_of_2(D)), BLOCK_M=bm, BLOCK_N=bn, SPARSE=sparse, LOG2K=K.bit_length(),
        RATIO=ratio, PREC=prec, DOT=dot, num_warps=cfg.warps, num_stages=cfg.stages)
    top = m.amax(0)
    top = torch.where(torch.isinf(top), 0.0, top)
    total = (l * torch.exp2(m - top)).sum(0)
    return torch.where(total > 0, (top + torch.log2(total.clamp(min=1e-30))) / LOG2E, 0.0)


def _fused_forward(iq, ik, iw, mq, mk, mk_rope, scale, topk_indices, chunk_size, cu_seqlens, main_lse, ratio,
                   need_grad):
    """(loss fp32 scalar, (d index_q, d index_k, d index_w) or None) of the centroid KL."""
    if iq.dtype not in TL_DTYPES or iw.dtype not in TL_DTYPES:
        raise ValueError(f"the fused centroid_kl takes bf16, fp16 or fp32 inputs, not {iq.dtype} / {iw.dtype}")
    main = (iq, ik, mq, mk) + (() if mk_rope is None else (mk_rope,))
    if len({t.dtype for t in main}) != 1:
        raise ValueError("index_q, index_k, main_q, main_k (and main_k_rope) must share one dtype; got "
                         f"{[t.dtype for t in main]}")
    B, T, HI, D = iq.shape
    G, H, DQ = mq.shape[0], mq.shape[3], mq.shape[4]
    cfg = wide_head_tiles(tile_config(iq.device), DQ)
    S = ik.shape[1]
    pieces = key_pieces(mk, mk_rope, H, cfg.min_dot)
    mk, mr = pieces.pop("mk"), pieces.pop("mr")
    main_strides = dict(**strides(mq, "sq_", "gbthd"), **strides(mk, "sk_", "gbthd"), **strides(mr, "sr_", "gbthd"))
    da, db = pieces["DA"], pieces["DB"]
    widths = dict(DA=da, DB=db, WA=pieces["WA"], WB=pieces["WB"])
    dev = iq.device
    doc = document_starts(cu_seqlens, B, T, dev).to(torch.int32).contiguous()
    sparse = topk_indices is not None
    keys = sorted_topk(topk_indices, doc, ratio) if sparse else doc  # doc: a placeholder pointer when dense
    K = keys.shape[-1] if sparse else 1
    log2k = K.bit_length()
    prec = "ieee" if iq.dtype == torch.float32 else "tf32"
    dot = dot_dtype(iq)
    grad_dtype = tl.bfloat16 if dot == tl.bfloat16 else tl.float32
    di = max(cfg.min_dot, triton.next_power_of_2(D))
    scale_log2 = float(scale) * LOG2E
    common = dict(num_warps=cfg.warps, num_stages=cfg.stages)

    if main_lse is None:
        lse = torch.empty(G, B, H, T, device=dev, dtype=torch.float32)
        bm, bn = cfg.lse_block_m, cfg.lse_block_n
        _main_lse_kernel[(triton.cdiv(T, bm), G * B * H)](
            mq=mq, mk=mk, mr=mr, **tma_tiles(mq, mk, mr, bm, bn, da, db, cfg.tma), lse_ptr=lse, doc_ptr=doc,
            keys_ptr=keys, **main_strides, B=B, T=T, H=H, K=K, DQ=DQ, scale_log2=scale_log2, **widths, BLOCK_M=bm,
            BLOCK_N=bn, SPARSE=sparse, LOG2K=log2k, RATIO=ratio, PREC=prec, DOT=dot, num_warps=cfg.lse_warps,
            num_stages=cfg.lse_stages)
    else:
        lse = (main_lse.float() * LOG2E).contiguous()

    bm, bn = cfg.block_m, cfg.block_n
    cbm, cbn = cfg.centroid_block_m, cfg.centroid_block_n
    centroid_tma = tma_tiles(mq, mk, mr, cbm, cbn, da, db, cfg.tma)
    if chunk_size is None:
        row_tile = max(bm, cbm)  # both powers of two: chunks of whole tiles of both kernels
        rows_per_chunk = max(row_tile, min(triton.cdiv(T, row_tile) * row_tile,
                                           SCRATCH_BYTES // (4 * B * max(S, 1)) // row_tile * row_tile))
    else:
        rows_per_chunk = max(1, min(T, chunk_size))
    loss_rows = torch.zeros(B, T, device=dev, dtype=torch.float32)
    scratch = torch.empty(B, rows_per_chunk, S, device=dev, dtype=torch.float32)  # I, then dL/dI
    if need_grad:
        d_iq = torch.empty_like(iq, memory_format=torch.contiguous_format)
        d_iw = torch.empty_like(iw, memory_format=torch.contiguous_format)
        d_ik = torch.zeros(B, S, D, device=dev, dtype=torch.float32)
    inv_rows = 1.0 / (B * T)
    indexer_args = dict(**index_strides(iq, ik, iw), **index_tiles(iq, ik, scratch, bm, bn, cfg.tma))
    scratch_tiles = indexer_args.pop("tg")  # read by d qI alone
    for r0 in range(0, T, rows_per_chunk):
        R = min(rows_per_chunk, T - r0)
        chunk_keys = (r0 + R) // ratio  # the keys the chunk's rows can see (rows seeing none: one empty block)
        n_rb, n_kb = triton.cdiv(R, bm), max(1, triton.cdiv(chunk_keys, bn))
        flags = torch.zeros(B, n_rb, n_kb, device=dev, dtype=torch.int8)
        ilse = index_logits(iq, ik, iw, indexer_args, doc, keys, K, sparse, ratio, cfg, prec, dot, r0, R, scratch,
                            flags)
        n_crb, n_ckb = triton.cdiv(R, cbm), max(1, triton.cdiv(chunk_keys, cbn))
        _centroid_kernel[(n_crb * n_ckb, B)](
            mq=mq, mk=mk, mr=mr, **centroid_tma, lse_ptr=lse, doc_ptr=doc, keys_ptr=keys, grad_ptr=scratch,
            ilse_ptr=ilse, loss_ptr=loss_rows, **main_strides, B=B, T=T, G=G, H=H, K=K, DQ=DQ, r0=r0, R=rows_per_chunk,
            n_rb=n_crb, n_kb=n_ckb, scale_log2=scale_log2, inv_gh=1.0 / (G * H), **pieces, BLOCK_M=cbm, BLOCK_N=cbn,
            GROUP=cfg.group, SPARSE=sparse, LOG2K=log2k, RATIO=ratio, WRITE_GRAD=need_grad, PREC=prec, DOT=dot,
            num_warps=cfg.centroid_warps, num_stages=cfg.centroid_stages)
        if not need_grad:
            continue
        count = flags.sum(-1, dtype=torch.int32)
        order = torch.argsort(flags, dim=-1, descending=True, stable=True).to(torch.int32)
        _index_dq_kernel[(HI, n_rb, B)](
            iq=iq, ik=ik, iw=iw, **indexer_args, tg=scratch_tiles, grad_ptr=scratch, order_ptr=order, count_ptr=count,
            dq_ptr=d_iq, dw_ptr=d_iw, T=T, HI=HI, D=D, r0=r0, R=rows_per_chunk, n_rb=n_rb, n_kb=n_kb, inv_rows=inv_rows,
            DI=di, BLOCK_M=bm, BLOCK_N=bn, RATIO=ratio, GRAD_DTYPE=grad_dtype, PREC=prec, DOT=dot, **common)
        splits = max(1, min(n_rb, triton.cdiv(4 * sm_count(dev), n_kb * B)))
        rb_per_split = triton.cdiv(n_rb, splits)
        _index_dk_kernel[(n_kb, triton.cdiv(n_rb, rb_per_split), B)](
            iq=iq, ik=ik, iw=iw, **indexer_args, grad_ptr=scratch, flag_ptr=flags, dk_ptr=d_ik, T=T, HI=HI, D=D,
            r0=r0, R=rows_per_chunk, n_rb=n_rb, n_kb=n_kb, rb_per_split=rb_per_split, inv_rows=inv_rows,
            DI=di, BLOCK_M=bm, BLOCK_N=bn, RATIO=ratio, GRAD_DTYPE=grad_dtype, PREC=prec, DOT=dot, **common)
    loss = loss_rows.sum() * inv_rows
    return loss, ((d_iq, d_ik.to(ik.dtype), d_iw) if need_grad else None)


class CentroidKL(torch.autograd.Function):
    """Autograd Function of the fused loss: forward computes loss and input gradients, backward scales them."""

    @staticmethod
    def forward(ctx, index_q, index_k, index_w, main_q, main_k, main_k_rope, scale, topk_indices, chunk_size,
                cu_seqlens, main_lse, ratio):
        need_grad = any(ctx.needs_input_grad[:3])
        loss, grads = _fused_forward(index_q, index_k, index_w, main_q, main_k, main_k_rope, scale, topk_indices,
                                     chunk_size, cu_seqlens, main_lse, ratio, need_grad)
        if need_grad:
            ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return scale_saved_grads(ctx, grad_loss) + (None,) * 9


def centroid_kl(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor,
                main_q: torch.Tensor, main_k: torch.Tensor, scale: float,
                topk_indices: torch.Tensor | None = None, chunk_size: int | None = None, *,
                cu_seqlens: torch.Tensor | None = None, main_lse: torch.Tensor | None = None,
                ratio: int = 1, main_k_rope: torch.Tensor | None = None) -> torch.Tensor:
    """Fused `kernels.reference.centroid_kl` (same arguments and semantics): an fp32 scalar.

    index_q, index_k, main_q, main_k (and main_k_rope) share one dtype (bf16, fp16 or fp32); index_w may be any of
    them (the Distiller passes fp32 head weights); each gradient comes back in its input's dtype.
    chunk_size: query rows per dL/dI scratch chunk, exactly (the scratch is [B, chunk_size, T] fp32; default:
    a multiple of the row tile within 1 GiB). Rows must have at least one allowed key (a row whose top-k
    list holds no causal in-document key contributes 0 here).
    ratio: tokens per key; index_k [B, T // ratio, D] and main_k [G, B, T // ratio, H or 1, Dq] then hold
    compressed entries (no cu_seqlens), and rows that see no entry contribute 0 (loss and gradients).
    """
    check_centroid_kl(index_q, index_k, index_w, main_q, main_k, topk_indices, main_lse, ratio, main_k_rope)
    check_ratio(ratio, cu_seqlens)
    return CentroidKL.apply(index_q, index_k, index_w, main_q, main_k, main_k_rope, scale, topk_indices, chunk_size,
                            cu_seqlens, main_lse, ratio)
