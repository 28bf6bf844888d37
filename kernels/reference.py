"""Plain-PyTorch references of the fused kernels (same signatures, same semantics).

Shapes (B batch, T tokens, HI indexer heads, D indexer dim, G served layers, H heads, Dq head dim):
    index_q [B, T, HI, D], index_k [B, T, D], index_w [B, T, HI] (already scaled),
    main_q, main_k [G, B, T, H, Dq], topk_indices [B, T, K] int (-1 = no key).

Everything is computed in query-row chunks, so memory is O(chunk * T) per (G, B, H), never
B * H * T * T; the indexer side is recomputed per chunk in backward (activation checkpointing).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill.targets import allowed_keys, centroid_target


def indexer_logits(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor,
                   rows: slice = slice(None)) -> torch.Tensor:
    """I_t(s) = sum_j w_{t,j} ReLU(q_{t,j} . k_s) for the query rows `rows`: [B, rows, T] (fp32 or wider)."""
    dtype = torch.promote_types(index_q.dtype, torch.float32)
    q = index_q[:, rows].to(dtype)
    scores = torch.einsum("bthd,bsd->bths", q, index_k.to(dtype)).relu()
    return torch.einsum("bths,bth->bts", scores, index_w[:, rows].to(dtype))


def _chunk_kl_sum(index_q, index_k, index_w, target, allowed, rows: slice) -> torch.Tensor:
    """sum over the chunk's rows of KL(target || softmax(I) over allowed keys)."""
    logits = indexer_logits(index_q, index_k, index_w, rows).masked_fill(~allowed, float("-inf"))
    log_q = torch.log_softmax(logits, dim=-1).masked_fill(~allowed, 0.0)
    return (torch.xlogy(target, target) - target * log_q).sum()


def centroid_kl(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor,
                main_q: torch.Tensor, main_k: torch.Tensor, scale: float,
                topk_indices: torch.Tensor | None = None, chunk_size: int | None = None, *,
                cu_seqlens: torch.Tensor | None = None, main_lse: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the B*T rows of KL(centroid || softmax(indexer logits)): a scalar (fp32 or wider).

    Dense stage (`topk_indices=None`): every causal key. Sparse stage: only each row's top-k keys,
    for the heads' softmax (the target) and the indexer's softmax alike. Gradients flow to
    index_q, index_k and index_w; main_q and main_k are the frozen backbone's and get none.
    cu_seqlens (int [num_docs + 1], offsets over the flattened B*T tokens): keys stay in the query's
    document. main_lse [G, B, H, T]: the heads' natural-log LSE of scale*q.k over the allowed keys
    (dense: the causal keys of the document; sparse: the row's top-k set), used instead of a softmax.
    """
    _check_shapes(index_q, index_k, index_w, main_q, main_k, topk_indices, main_lse)
    B, T = index_q.shape[:2]
    G, H = main_q.shape[0], main_q.shape[3]
    if chunk_size is None:  # keep each chunk's [G, B, H, chunk, T] fp32 scores near 256 MiB
        chunk_size = max(1, min(T, (64 << 20) // max(1, G * B * H * T)))
    total = index_q.new_zeros((), dtype=torch.promote_types(index_q.dtype, torch.float32))
    for start in range(0, T, chunk_size):
        rows = slice(start, min(T, start + chunk_size))
        with torch.no_grad():
            allowed = allowed_keys(B, T, rows, topk_indices, index_q.device, cu_seqlens=cu_seqlens)
            target = centroid_target(main_q, main_k, scale, topk_indices, rows, cu_seqlens=cu_seqlens,
                                     main_lse=main_lse).to(total.dtype)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (index_q, index_k, index_w)):
            part = checkpoint(_chunk_kl_sum, index_q, index_k, index_w, target, allowed, rows, use_reentrant=False)
        else:
            part = _chunk_kl_sum(index_q, index_k, index_w, target, allowed, rows)
        total = total + part
    return total / (B * T)


def indexer_topk(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, k: int, *,
                 cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Top-k causal keys per query row by indexer logits: int32 [B, T, k], -1 where a row has fewer than k keys.

    Materialises the [B, T, T] scores: the baseline the fused top-k kernel is measured against.
    cu_seqlens (int [num_docs + 1], offsets over the flattened B*T tokens): keys stay in the query's document.
    """
    B, T = index_q.shape[:2]
    logits = indexer_logits(index_q, index_k, index_w)
    causal = allowed_keys(B, T, slice(None), None, index_q.device, cu_seqlens=cu_seqlens)
    logits = logits.masked_fill(~causal, float("-inf"))
    kk = min(k, T)
    values, indices = logits.topk(kk, dim=-1)
    indices = indices.to(torch.int32).masked_fill(values == float("-inf"), -1)
    if kk < k:
        indices = F.pad(indices, (0, k - kk), value=-1)
    return indices


def _check_shapes(index_q, index_k, index_w, main_q, main_k, topk_indices, main_lse=None):
    if index_q.dim() != 4 or index_k.dim() != 3 or index_w.dim() != 3:
        raise ValueError("expected index_q [B,T,HI,D], index_k [B,T,D], index_w [B,T,HI]; got "
                         f"{tuple(index_q.shape)}, {tuple(index_k.shape)}, {tuple(index_w.shape)}")
    B, T, HI, D = index_q.shape
    if index_k.shape != (B, T, D) or index_w.shape != (B, T, HI):
        raise ValueError(f"index_k {tuple(index_k.shape)} / index_w {tuple(index_w.shape)} do not match "
                         f"index_q {tuple(index_q.shape)}")
    if main_q.dim() != 5 or main_q.shape != main_k.shape or main_q.shape[1:3] != (B, T):
        raise ValueError(f"expected main_q and main_k [G,B,T,H,Dq] with B={B}, T={T}; got "
                         f"{tuple(main_q.shape)}, {tuple(main_k.shape)}")
    if topk_indices is not None and (topk_indices.dim() != 3 or topk_indices.shape[:2] != (B, T)):
        raise ValueError(f"expected topk_indices [B,T,K] with B={B}, T={T}; got {tuple(topk_indices.shape)}")
    G, H = main_q.shape[0], main_q.shape[3]
    if main_lse is not None and main_lse.shape != (G, B, H, T):
        raise ValueError(f"expected main_lse [G,B,H,T] = {(G, B, H, T)}; got {tuple(main_lse.shape)}")
