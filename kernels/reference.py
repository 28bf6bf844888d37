"""Plain-PyTorch references of the fused kernels (same signatures, same semantics), and the target math.

Targets (docs/DESIGN.md section 2):
    a^l_t(s) = (1/H) sum_h softmax_s(scale * q^l_{t,h} . k^l_{s,h})   over the allowed keys of row t,
    pbar^f_t = sum_{l in G(f)} w_l a^l_t                             (w_l = 1/|G| unless given).
Allowed keys: s <= t (dense stage), intersected with the row's top-k set (sparse stage; -1 = no key).
Compressed keys (`ratio` > 1, DeepSeek-V4's CSA): the keys are S = T // ratio compressed entries, entry w
pooling tokens w*ratio .. w*ratio + ratio - 1, and query t sees entry w iff w < (t + 1) // ratio (the entries
whose tokens are all causal); ratio 1 is the token rule s <= t. Rows t < ratio - 1 see no key: they carry no
loss (0, not NaN). One key head (main_k [G, B, S, 1, Dq]) is broadcast to all H query heads.
Packed sequences (`cu_seqlens`, int [num_docs + 1]: document offsets over the flattened B*T tokens, the
flash-attention varlen convention, 0 first and B*T last): a key must also lie in the query's document;
each batch row's start is a document boundary whether listed or not.

Shapes (B batch, T tokens, HI indexer heads, D indexer dim, G served layers, H heads, Dq head dim):
    index_q [B, T, HI, D], index_k [B, S, D], index_w [B, T, HI] (already scaled),
    main_q [G, B, T, H, Dq], main_k [G, B, S, H or 1, Dq], topk_indices [B, T, K] int (-1 = no key),
    with S = T // ratio keys (S = T for token keys).

Everything is computed in query-row chunks, so memory is O(chunk * T) per (G, B, H), never
B * H * T * T; the indexer side is recomputed per chunk in backward (activation checkpointing).

Sparse stage at scale (docs/DESIGN.md section 3): `sparse_mqa_attention` and `sparse_centroid_kl` work on the
rows' top-k entries only (topk_indices [B, T, K]; entry j of row t is valid iff doc_start(t) <= idx_j <= t),
gathering the K keys of each row of a chunk: memory O(chunk * K * width), never T x T.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 64 << 20  # elements of a chunk's largest intermediates (256 MiB in fp32)


def document_starts(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int,
                    device: torch.device) -> torch.Tensor:
    """Int64 [B, T]: the position (within its batch row) where each token's document starts. Every kernel calls
    this once per layer, so cu_seqlens' values are checked without a host sync (torch._assert_async)."""
    if cu_seqlens is None:
        return torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens must be offsets [num_docs + 1]; got shape {tuple(cu.shape)}")
    torch._assert_async((cu[0] == 0) & (cu[-1] == batch * seq_len) & (cu[1:] >= cu[:-1]).all(),
                        f"cu_seqlens must be non-decreasing offsets from 0 to B*T = {batch * seq_len}")
    flat = torch.arange(batch * seq_len, device=device)
    start = cu[torch.searchsorted(cu, flat, right=True) - 1]
    row_start = flat - flat % seq_len
    return (torch.maximum(start, row_start) - row_start).view(batch, seq_len)


def check_ratio(ratio: int, cu_seqlens: torch.Tensor | None) -> None:
    """A key ratio is a positive int; compressed keys (ratio > 1) come from unpacked rows only."""
    if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1:
        raise ValueError(f"the key ratio (tokens per key) must be a positive int, got {ratio!r}")
    if ratio > 1 and cu_seqlens is not None:
        raise ValueError(f"packed documents (cu_seqlens) with compressed keys (ratio {ratio}) are not supported: the "
                         "compressor pools windows from the row start, across document boundaries; give "
                         "unpacked rows (one document per row)")


def allowed_keys(batch: int, seq_len: int, rows: slice, topk_indices: torch.Tensor | None,
                 device: torch.device, *, cu_seqlens: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """Bool [B, rows, S = seq_len // ratio]: which keys each query row may attend to."""
    check_ratio(ratio, cu_seqlens)
    num_keys = seq_len // ratio
    t = torch.arange(seq_len, device=device)[rows]
    keys = torch.arange(num_keys, device=device)
    causal = (keys[None, :] < ((t + 1) // ratio)[:, None]).expand(batch, -1, -1)
    if cu_seqlens is not None:
        start = document_starts(cu_seqlens, batch, seq_len, device)[:, rows]
        causal = causal & (keys[None, None, :] >= start[..., None])
    if topk_indices is None:
        return causal
    idx = topk_indices[:, rows].long()
    idx = torch.where(idx < 0, num_keys, idx)  # -1 ("no key") lands in a spare column, dropped below
    chosen = torch.zeros(*causal.shape[:2], num_keys + 1, dtype=torch.bool, device=device)
    chosen.scatter_(-1, idx, True)
    return causal & chosen[..., :num_keys]


def layer_attention(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor,
                    rows: slice, *, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of one layer: q [B, T, H, Dq], k [B, S, H or 1, Dq] -> [B, rows, S] (fp32 or
    wider); a row without allowed keys is 0.

    lse [B, H, T]: the heads' log-sum-exp of scale*q.k over the allowed keys, when the caller has it
    (probabilities are then exp(scale*q.k - lse) instead of a softmax).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = k.expand(-1, -1, q.shape[2], -1)
    scores = torch.einsum("bthd,bshd->bhts", q[:, rows].to(dtype), k.to(dtype)) * scale
    if lse is not None:
        probs = torch.exp(scores - lse[:, :, rows, None].to(dtype))
        return probs.masked_fill(~allowed[:, None], 0.0).mean(dim=1)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0).mean(dim=1)


@torch.no_grad()
def centroid_target(main_q: torch.Tensor, main_k: torch.Tensor, scale: float,
                    topk_indices: torch.Tensor | None = None, rows: slice = slice(None),
                    layer_weights: list[float] | None = None, *, cu_seqlens: torch.Tensor | None = None,
                    main_lse: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """The centroid pbar of the G served layers for the query rows `rows`: [B, rows, S].

    main_q [G, B, T, H, Dq], main_k [G, B, S, H or 1, Dq]; topk_indices [B, T, K] or None (dense); cu_seqlens,
    ratio: see the module docstring; main_lse [G, B, H, T]: each head's natural-log LSE of scale*q.k over the
    allowed keys.
    """
    G, B, T = main_q.shape[:3]
    weights = layer_weights if layer_weights is not None else [1.0 / G] * G
    if len(weights) != G:
        raise ValueError(f"{len(weights)} layer weights for {G} served layers")
    allowed = allowed_keys(B, T, rows, topk_indices, main_q.device, cu_seqlens=cu_seqlens, ratio=ratio)
    target = None
    for g in range(G):
        lse = None if main_lse is None else main_lse[g]
        a = layer_attention(main_q[g], main_k[g], scale, allowed, rows, lse=lse) * weights[g]
        target = a if target is None else target + a
    return target



def indexer_logits(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor,
                   rows: slice = slice(None)) -> torch.Tensor:
    """I_t(s) = sum_j w_{t,j} ReLU(q_{t,j} . k_s) for the query rows `rows`: [B, rows, S] (fp32 or wider)."""
    dtype = torch.promote_types(index_q.dtype, torch.float32)
    q = index_q[:, rows].to(dtype)
    scores = torch.einsum("bthd,bsd->bths", q, index_k.to(dtype)).relu()
    return torch.einsum("bths,bth->bts", scores, index_w[:, rows].to(dtype))


def _chunk_kl_sum(index_q, index_k, index_w, main_q, main_k, scale, topk_indices, rows: slice, cu_seqlens,
                  main_lse, ratio) -> torch.Tensor:
    """sum over the chunk's rows of KL(target || softmax(I) over allowed keys); the target is computed here
    (no grad), so that checkpointing keeps only the inputs, not a [B, chunk, S] target per chunk."""
    B, T = index_q.shape[:2]
    with torch.no_grad():
        allowed = allowed_keys(B, T, rows, topk_indices, index_q.device, cu_seqlens=cu_seqlens, ratio=ratio)
        target = centroid_target(main_q, main_k, scale, topk_indices, rows, cu_seqlens=cu_seqlens,
                                 main_lse=main_lse, ratio=ratio).to(torch.promote_types(index_q.dtype, torch.float32))
    logits = indexer_logits(index_q, index_k, index_w, rows)
    # a row without allowed keys gets finite logits (then masked to 0): no NaN in its loss or gradients
    logits = torch.where(allowed, logits, float("-inf")).where(allowed.any(-1, keepdim=True), 0.0)
    log_q = torch.log_softmax(logits, dim=-1).masked_fill(~allowed, 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum()


def centroid_kl(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor,
                main_q: torch.Tensor, main_k: torch.Tensor, scale: float,
                topk_indices: torch.Tensor | None = None, chunk_size: int | None = None, *,
                cu_seqlens: torch.Tensor | None = None, main_lse: torch.Tensor | None = None,
                ratio: int = 1, main_k_rope: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the B*T rows of KL(centroid || softmax(indexer logits)): a scalar (fp32 or wider).

    Dense stage (`topk_indices=None`): every causal key. Sparse stage: only each row's top-k keys,
    for the heads' softmax (the target) and the indexer's softmax alike. Gradients flow to
    index_q, index_k and index_w; main_q and main_k are the frozen backbone's and get none.
    cu_seqlens (int [num_docs + 1], offsets over the flattened B*T tokens): keys stay in the query's
    document. main_lse [G, B, H, T]: the heads' natural-log LSE of scale*q.k over the allowed keys
    (dense: the causal keys of the document; sparse: the row's top-k set), used instead of a softmax.
    ratio: tokens per key (compressed keys, S = T // ratio of them; see the module docstring).
    main_k_rope [G, B, S, 1, Dr]: key columns every head shares (MLA's rope part), after main_k's [.., Dq - Dr]
    per-head ones: head h's key is cat(main_k[..., h, :], main_k_rope[..., 0, :]) (`joined_keys`).
    """
    check_centroid_kl(index_q, index_k, index_w, main_q, main_k, topk_indices, main_lse, ratio, main_k_rope)
    check_ratio(ratio, cu_seqlens)
    main_k = joined_keys(main_k, main_k_rope)
    B, T = index_q.shape[:2]
    G, H, S = main_q.shape[0], main_q.shape[3], index_k.shape[1]
    if chunk_size is None:  # keep each chunk's [G, B, H, chunk, S] fp32 scores near 256 MiB
        chunk_size = max(1, min(T, CHUNK_ELEMENTS // max(1, G * B * H * S)))
    total = index_q.new_zeros((), dtype=torch.promote_types(index_q.dtype, torch.float32))
    for start in range(0, T, chunk_size):
        rows = slice(start, min(T, start + chunk_size))
        args = (index_q, index_k, index_w, main_q, main_k, scale, topk_indices, rows, cu_seqlens, main_lse, ratio)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (index_q, index_k, index_w)):
            part = checkpoint(_chunk_kl_sum, *args, use_reentrant=False)
        else:
            part = _chunk_kl_sum(*args)
        total = total + part
    return total / (B * T)


def sparse_entries(topk_indices: torch.Tensor, rows: slice, doc_start: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys int64 [B, rows, K] with -1 and other invalid entries clamped to 0, valid bool [B, rows, K]) of the
    top-k entries of the query rows `rows`: valid iff doc_start <= key <= row (so -1 never is)."""
    T = topk_indices.shape[1]
    keys = topk_indices[:, rows].long()
    t = torch.arange(T, device=keys.device)[rows]
    valid = (keys >= doc_start[:, rows, None]) & (keys <= t[None, :, None])
    return keys.clamp(min=0), valid


def _gather(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] gathered at keys [B, R, K] -> [B, R, K, D] (differentiable)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None, None], keys]


@torch.no_grad()
def sparse_mqa_attention(q: torch.Tensor, kv: torch.Tensor, topk_indices: torch.Tensor, scale: float, v_dim: int,
                         *, prob_out: torch.Tensor | None = None, prob_weight: float = 1.0,
                         cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MQA attention forward over each row's valid top-k keys: (out [B, T, H, v_dim] in q's dtype,
    lse [B, H, T] fp32, natural log; -inf and out 0 for a row without valid keys).

    q [B, T, H, Dk]; kv [B, S, Dk], one key per token (S = T) or compressed entry shared by all heads, whose
    first v_dim columns are its value; topk_indices [B, T, K] int, distinct entries, -1 = no key;
    cu_seqlens: see the module docstring. prob_out [B, T, K] fp32: when given, gets
    prob_weight * (1/H) sum_h softmax_j(scale q_h . kv_{idx_j}) added in place (0 at invalid entries).
    """
    check_sparse_attention(q, kv, topk_indices, v_dim, prob_out)
    B, T, H, Dk = q.shape
    K = topk_indices.shape[-1]
    dtype = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(B, T, H, v_dim)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    doc = document_starts(cu_seqlens, B, T, q.device)
    chunk = max(1, min(T, CHUNK_ELEMENTS // (B * (K * (Dk + 2 * H) + H * v_dim))))
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        keys, valid = sparse_entries(topk_indices, rows, doc)
        kv_rows = _gather(kv, keys).to(dtype)  # [B, R, K, Dk]
        scores = torch.einsum("brhd,brkd->brhk", q[:, rows].to(dtype), kv_rows) * scale
        scores = scores.masked_fill(~valid[:, :, None], float("-inf"))
        row_lse = scores.logsumexp(-1)  # [B, R, H]
        probs = torch.exp(scores - row_lse[..., None]).masked_fill(~valid[:, :, None], 0.0)
        out[:, rows] = torch.einsum("brhk,brkv->brhv", probs, kv_rows[..., :v_dim]).to(q.dtype)
        lse[:, :, rows] = row_lse.transpose(1, 2).float()
        if prob_out is not None:
            prob_out[:, rows] += prob_weight * probs.mean(dim=2)
    return out, lse


def _sparse_chunk_kl_sum(index_q, index_k, index_w, target, keys, valid, rows: slice) -> torch.Tensor:
    """sum over the chunk's rows of KL(target || softmax(I) over the valid top-k entries); 0 for empty rows."""
    dtype = torch.promote_types(index_q.dtype, torch.float32)
    scores = torch.einsum("brhd,brkd->brhk", index_q[:, rows].to(dtype), _gather(index_k, keys).to(dtype)).relu()
    logits = torch.einsum("brhk,brh->brk", scores, index_w[:, rows].to(dtype)).masked_fill(~valid, float("-inf"))
    logits = logits.masked_fill(~valid.any(-1, keepdim=True), 0.0)  # empty rows: finite, masked out below
    log_q = torch.log_softmax(logits, dim=-1).masked_fill(~valid, 0.0)
    p = target[:, rows].to(dtype).masked_fill(~valid, 0.0)
    return (torch.xlogy(p, p) - p * log_q).sum()


def sparse_centroid_kl(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, target: torch.Tensor,
                       topk_indices: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the B*T rows of KL(target_t || softmax_j I_t(idx_j)) over each row's valid top-k entries j:
    a scalar (fp32 or wider); rows without valid entries contribute 0.

    index_q [B, T, HI, D], index_k [B, T, D], index_w [B, T, HI] (already scaled); target [B, T, K] fp32, the
    group's sparse centroid aligned with topk_indices [B, T, K] (e.g. summed by `sparse_mqa_attention`'s
    prob_out); cu_seqlens: see the module docstring. Gradients flow to index_q, index_k and index_w
    (recomputed per row chunk in backward).
    """
    check_sparse_kl(index_q, index_k, index_w, target, topk_indices)
    B, T, HI, D = index_q.shape
    K = topk_indices.shape[-1]
    doc = document_starts(cu_seqlens, B, T, index_q.device)
    chunk = max(1, min(T, CHUNK_ELEMENTS // (B * K * (D + 2 * HI))))
    total = index_q.new_zeros((), dtype=torch.promote_types(index_q.dtype, torch.float32))
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        keys, valid = sparse_entries(topk_indices, rows, doc)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (index_q, index_k, index_w)):
            part = checkpoint(_sparse_chunk_kl_sum, index_q, index_k, index_w, target, keys, valid, rows,
                              use_reentrant=False)
        else:
            part = _sparse_chunk_kl_sum(index_q, index_k, index_w, target, keys, valid, rows)
        total = total + part
    return total / (B * T)


def indexer_topk(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, k: int, *,
                 cu_seqlens: torch.Tensor | None = None, ratio: int = 1) -> torch.Tensor:
    """Top-k causal keys per query row by indexer logits: int32 [B, T, k], -1 where a row has fewer than k keys.

    index_k [B, S, D] with S = T // ratio keys (ratio > 1: compressed entries, query t sees w < (t + 1) // ratio).
    Scores a chunk of query rows at a time ([B, chunk, HI, S] within CHUNK_ELEMENTS), then torch.topk.
    cu_seqlens (int [num_docs + 1], offsets over the flattened B*T tokens): keys stay in the query's document.
    """
    check_indexer_inputs(index_q, index_k, index_w, ratio)
    B, T, HI = index_q.shape[:3]
    S = index_k.shape[1]
    kk = min(k, S)
    out = torch.full((B, T, k), -1, dtype=torch.int32, device=index_q.device)
    chunk = max(1, min(T, CHUNK_ELEMENTS // max(1, B * HI * S)))
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        causal = allowed_keys(B, T, rows, None, index_q.device, cu_seqlens=cu_seqlens, ratio=ratio)
        logits = indexer_logits(index_q, index_k, index_w, rows).masked_fill(~causal, float("-inf"))
        if kk == 0:
            continue
        values, indices = logits.topk(kk, dim=-1)
        out[:, rows, :kk] = indices.to(torch.int32).masked_fill(values == float("-inf"), -1)
    return out


def check_indexer_inputs(index_q, index_k, index_w, ratio: int = 1):
    """index_q [B, T, HI, D], index_k [B, T // ratio, D], index_w [B, T, HI], else a ValueError naming the shapes."""
    check_ratio(ratio, None)
    if index_q.dim() != 4 or index_k.dim() != 3 or index_w.dim() != 3:
        raise ValueError("expected index_q [B,T,HI,D], index_k [B,S,D], index_w [B,T,HI]; got "
                         f"{tuple(index_q.shape)}, {tuple(index_k.shape)}, {tuple(index_w.shape)}")
    B, T, HI, D = index_q.shape
    if index_k.shape != (B, T // ratio, D) or index_w.shape != (B, T, HI):
        raise ValueError(f"expected index_q [B,T,HI,D], index_k [B,T//ratio,D], index_w [B,T,HI]: index_k "
                         f"{tuple(index_k.shape)} / index_w {tuple(index_w.shape)} do not match index_q "
                         f"{tuple(index_q.shape)} with {T // ratio} keys (ratio {ratio})")


def joined_keys(main_k: torch.Tensor, main_k_rope: torch.Tensor | None) -> torch.Tensor:
    """main_k [G, B, S, H or 1, Dk] with the shared columns main_k_rope [G, B, S, 1, Dr] after each head's own:
    [G, B, S, H or 1, Dk + Dr] (main_k itself when there are none)."""
    if main_k_rope is None:
        return main_k
    return torch.cat([main_k, main_k_rope.expand(*main_k.shape[:4], -1)], dim=-1)


def check_centroid_kl(index_q, index_k, index_w, main_q, main_k, topk_indices, main_lse=None, ratio: int = 1,
                      main_k_rope=None):
    check_indexer_inputs(index_q, index_k, index_w, ratio)
    B, T = index_q.shape[:2]
    S = index_k.shape[1]
    rope = 0 if main_k_rope is None else main_k_rope.shape[-1]
    if main_k_rope is not None and (main_k_rope.dim() != 5 or main_k_rope.shape[:4] != (main_q.shape[0], B, S, 1)):
        raise ValueError(f"expected main_k_rope [G,B,S,1,Dr] with G={main_q.shape[0]}, B={B}, S={S}; got "
                         f"{tuple(main_k_rope.shape)}")
    if main_q.dim() != 5 or main_k.dim() != 5 or main_q.shape[1:3] != (B, T) \
            or main_k.shape[:3] != (main_q.shape[0], B, S) or main_k.shape[3] not in (1, main_q.shape[3]) \
            or main_k.shape[4] + rope != main_q.shape[4]:
        keys = "main_k [G,B,S,H or 1,Dq]" if main_k_rope is None else f"main_k [G,B,S,H or 1,Dq-{rope}]"
        raise ValueError(f"expected main_q and main_k: main_q [G,B,T,H,Dq], {keys} with B={B}, T={T}, S={S}; got "
                         f"{tuple(main_q.shape)}, {tuple(main_k.shape)}")
    if topk_indices is not None and (topk_indices.dim() != 3 or topk_indices.shape[:2] != (B, T)):
        raise ValueError(f"expected topk_indices [B,T,K] with B={B}, T={T}; got {tuple(topk_indices.shape)}")
    G, H = main_q.shape[0], main_q.shape[3]
    if main_lse is not None and main_lse.shape != (G, B, H, T):
        raise ValueError(f"expected main_lse [G,B,H,T] = {(G, B, H, T)}; got {tuple(main_lse.shape)}")


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                     cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None):
    """Reference of `kernels.dense_attention.causal_attention`: (out [B, T, H, Dv], lse [B, H, T] fp32).

    q, k [B, T, H, Dq], v [B, T, H, Dv]; keys causal and in the query's document. Rows in chunks: memory
    O(B * H * chunk * T), never B * H * T * T.
    """
    B, T, H = q.shape[:3]
    chunk = chunk_size or max(1, min(T, CHUNK_ELEMENTS // max(1, B * H * T)))
    dtype = torch.promote_types(q.dtype, torch.float32)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        allowed = allowed_keys(B, T, rows, None, q.device, cu_seqlens=cu_seqlens)
        scores = torch.einsum("bthd,bshd->bhts", q[:, rows].to(dtype), k.to(dtype)) * scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        lse[:, :, rows] = torch.logsumexp(scores, dim=-1).float()
        out[:, rows] = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v.to(dtype)).to(q.dtype)
    return out, lse


def check_sparse_attention(q, kv, topk_indices, v_dim, prob_out=None):
    """q [B, T, H, Dk], kv [B, S, Dk] with S <= T keys (tokens, or compressed entries: then the top-k lists hold
    only visible entries or -1), topk_indices [B, T, K], prob_out fp32 [B, T, K]."""
    if q.dim() != 4 or kv.dim() != 3 or kv.shape[0] != q.shape[0] or kv.shape[1] > q.shape[1] \
            or kv.shape[2] != q.shape[3]:
        raise ValueError(f"expected q [B,T,H,Dk] and kv [B,S,Dk] (S <= T keys); got {tuple(q.shape)}, "
                         f"{tuple(kv.shape)}")
    B, T, _, Dk = q.shape
    if topk_indices.dim() != 3 or topk_indices.shape[:2] != (B, T):
        raise ValueError(f"expected topk_indices [B,T,K] with B={B}, T={T}; got {tuple(topk_indices.shape)}")
    if not 1 <= v_dim <= Dk:
        raise ValueError(f"v_dim must be in 1..Dk = {Dk}; got {v_dim}")
    if prob_out is not None and (prob_out.shape != topk_indices.shape or prob_out.dtype != torch.float32):
        raise ValueError(f"expected prob_out fp32 {tuple(topk_indices.shape)}; got {prob_out.dtype} "
                         f"{tuple(prob_out.shape)}")


def check_sparse_kl(index_q, index_k, index_w, target, topk_indices):
    """index_q [B, T, HI, D], index_k [B, S, D] (S <= T keys, as `check_sparse_attention`), index_w [B, T, HI],
    target and topk_indices [B, T, K]."""
    if index_q.dim() != 4 or index_k.dim() != 3 or index_k.shape[0] != index_q.shape[0] \
            or index_k.shape[1] > index_q.shape[1] or index_k.shape[2] != index_q.shape[3] \
            or index_w.shape != index_q.shape[:3]:
        raise ValueError("expected index_q [B,T,HI,D], index_k [B,S,D] (S <= T keys), index_w [B,T,HI]; got "
                         f"{tuple(index_q.shape)}, {tuple(index_k.shape)}, {tuple(index_w.shape)}")
    B, T = index_q.shape[:2]
    if topk_indices.dim() != 3 or topk_indices.shape[:2] != (B, T) or target.shape != topk_indices.shape:
        raise ValueError(f"expected topk_indices and target [B,T,K] with B={B}, T={T}; got "
                         f"{tuple(topk_indices.shape)}, {tuple(target.shape)}")


# ---- block-scaled FP8 weights (kernels/block_fp8.py) -------------------------------------------------------
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x [N, K] zero-padded to whole blocks, viewed as [N / bn, bn, K / bk, bk]."""
    (bn, bk), (N, K) = block, x.shape
    padded = x.new_zeros(-(-N // bn) * bn, -(-K // bk) * bk)
    padded[:N, :K] = x
    return padded.view(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """weight [N, K] float8 with scale_inv [ceil(N / bn), ceil(K / bk)] fp32 per `block` -> [N, K] in `dtype`
    (the products are taken in fp32)."""
    (bn, bk), (N, K) = block, weight.shape
    scales = scale_inv.float().repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    return (weight.float() * scales).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int],
                       power_of_two: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (float8_e4m3fn [N, K], scale_inv [ceil(N / bn), ceil(K / bk)] fp32) with each block's
    scale amax / 448 (1 for an all-zero block; with `power_of_two`, rounded up to a power of two, as the `ue8m0`
    checkpoints' scales are), as the published checkpoints are made: dequantize_block_fp8 of the result is the
    weight within float8's rounding (3 mantissa bits: relative error <= 2^-4 per element)."""
    N, K = weight.shape
    blocks = _blocks(weight.detach().float(), block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if power_of_two:
        scale_inv = torch.exp2(torch.ceil(torch.log2(scale_inv)))
    quantized = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    quantized = quantized.reshape(blocks.shape[0] * blocks.shape[1], -1)[:N, :K]
    return quantized.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()


def quantize_rows(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], scale [M, ceil(K / block)] fp32): one scale per row and `block` columns,
    amax / 448 (1 where the block is all zero)."""
    q, scale = quantize_block_fp8(x, (1, block))
    return q, scale


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, gemm_scale: torch.Tensor | None = None,
                     quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize_block_fp8(weight, scale_inv, block)^T (+ bias), in x's dtype: the
    weight dequantised to x's dtype for the call (gemm_scale, quantized: unused, the fused path's)."""
    return torch.nn.functional.linear(x, dequantize_block_fp8(weight, scale_inv, block, x.dtype),
                                      None if bias is None else bias.to(x.dtype))
