"""Distillation targets (DESIGN.md section 2), in plain PyTorch, one block of query rows at a time.

a^l_t(s) = (1/H) sum_h softmax_s(scale * q^l_{t,h} . k^l_{s,h})   over the allowed keys of row t,
pbar^f_t = sum_{l in G(f)} w_l a^l_t                             (w_l = 1/|G| unless given).

Allowed keys: s <= t (dense stage), intersected with the row's top-k set (sparse stage; -1 = no key).
Packed sequences (`cu_seqlens`, int [num_docs + 1]: document offsets over the flattened B*T tokens, the
flash-attention varlen convention, 0 first and B*T last): a key must also lie in the query's document;
each batch row's start is a document boundary whether listed or not.
"""
from __future__ import annotations

import torch


def document_starts(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int,
                    device: torch.device) -> torch.Tensor:
    """Int64 [B, T]: the position (within its batch row) where each token's document starts."""
    if cu_seqlens is None:
        return torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    if cu.dim() != 1 or cu.numel() < 2 or cu[0].item() != 0 or cu[-1].item() != batch * seq_len \
            or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing offsets [num_docs + 1] from 0 to B*T = "
                         f"{batch * seq_len}; got {cu_seqlens.tolist() if cu.numel() <= 16 else tuple(cu.shape)}")
    flat = torch.arange(batch * seq_len, device=device)
    start = cu[torch.searchsorted(cu, flat, right=True) - 1]
    row_start = flat - flat % seq_len
    return (torch.maximum(start, row_start) - row_start).view(batch, seq_len)


def allowed_keys(batch: int, seq_len: int, rows: slice, topk_indices: torch.Tensor | None,
                 device: torch.device, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Bool [B, rows, T]: which keys each query row may attend to."""
    t = torch.arange(seq_len, device=device)[rows]
    keys = torch.arange(seq_len, device=device)
    causal = (keys[None, :] <= t[:, None]).expand(batch, -1, -1)
    if cu_seqlens is not None:
        start = document_starts(cu_seqlens, batch, seq_len, device)[:, rows]
        causal = causal & (keys[None, None, :] >= start[..., None])
    if topk_indices is None:
        return causal
    idx = topk_indices[:, rows].long()
    idx = torch.where(idx < 0, seq_len, idx)  # -1 ("no key") lands in a spare column, dropped below
    chosen = torch.zeros(*causal.shape[:2], seq_len + 1, dtype=torch.bool, device=device)
    chosen.scatter_(-1, idx, True)
    return causal & chosen[..., :seq_len]


def layer_attention(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor,
                    rows: slice, *, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of one layer: q, k [B, T, H, Dq] -> [B, rows, T] (fp32 or wider).

    lse [B, H, T]: the heads' log-sum-exp of scale*q.k over the allowed keys, when the caller has it
    (probabilities are then exp(scale*q.k - lse) instead of a softmax).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bthd,bshd->bhts", q[:, rows].to(dtype), k.to(dtype)) * scale
    if lse is not None:
        probs = torch.exp(scores - lse[:, :, rows, None].to(dtype))
        return probs.masked_fill(~allowed[:, None], 0.0).mean(dim=1)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


@torch.no_grad()
def centroid_target(main_q: torch.Tensor, main_k: torch.Tensor, scale: float,
                    topk_indices: torch.Tensor | None = None, rows: slice = slice(None),
                    layer_weights: list[float] | None = None, *, cu_seqlens: torch.Tensor | None = None,
                    main_lse: torch.Tensor | None = None) -> torch.Tensor:
    """The centroid pbar of the G served layers for the query rows `rows`: [B, rows, T].

    main_q, main_k [G, B, T, H, Dq]; topk_indices [B, T, K] or None (dense); cu_seqlens: see the module
    docstring; main_lse [G, B, H, T]: each head's natural-log LSE of scale*q.k over the allowed keys.
    """
    G, B, T = main_q.shape[:3]
    weights = layer_weights if layer_weights is not None else [1.0 / G] * G
    if len(weights) != G:
        raise ValueError(f"{len(weights)} layer weights for {G} served layers")
    allowed = allowed_keys(B, T, rows, topk_indices, main_q.device, cu_seqlens=cu_seqlens)
    target = None
    for g in range(G):
        lse = None if main_lse is None else main_lse[g]
        a = layer_attention(main_q[g], main_k[g], scale, allowed, rows, lse=lse) * weights[g]
        target = a if target is None else target + a
    return target


@torch.no_grad()
def topk_recall(main_q: torch.Tensor, main_k: torch.Tensor, scale: float, topk_indices: torch.Tensor,
                chunk_size: int = 256) -> torch.Tensor:
    """Mean over rows of the dense centroid's mass that falls on each row's top-k keys (a scalar)."""
    G, B, T = main_q.shape[:3]
    covered = main_q.new_zeros((), dtype=torch.float32)
    for start in range(0, T, chunk_size):
        rows = slice(start, min(T, start + chunk_size))
        target = centroid_target(main_q, main_k, scale, None, rows)
        covered += (target * allowed_keys(B, T, rows, topk_indices, main_q.device)).sum().float()
    return covered / (B * T)
