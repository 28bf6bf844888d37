"""Distillation targets (DESIGN.md section 2), in plain PyTorch, one block of query rows at a time.

a^l_t(s) = (1/H) sum_h softmax_s(scale * q^l_{t,h} . k^l_{s,h})   over the allowed keys of row t,
pbar^f_t = sum_{l in G(f)} w_l a^l_t                             (w_l = 1/|G| unless given).

Allowed keys: s <= t (dense stage), intersected with the row's top-k set (sparse stage; -1 = no key).
"""
from __future__ import annotations

import torch


def allowed_keys(batch: int, seq_len: int, rows: slice, topk_indices: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Bool [B, rows, T]: which keys each query row may attend to."""
    t = torch.arange(seq_len, device=device)[rows]
    causal = (torch.arange(seq_len, device=device)[None, :] <= t[:, None]).expand(batch, -1, -1)
    if topk_indices is None:
        return causal
    idx = topk_indices[:, rows].long()
    idx = torch.where(idx < 0, seq_len, idx)  # -1 ("no key") lands in a spare column, dropped below
    chosen = torch.zeros(*causal.shape[:2], seq_len + 1, dtype=torch.bool, device=device)
    chosen.scatter_(-1, idx, True)
    return causal & chosen[..., :seq_len]


def layer_attention(q: torch.Tensor, k: torch.Tensor, scale: float, allowed: torch.Tensor,
                    rows: slice) -> torch.Tensor:
    """Head-averaged attention of one layer: q, k [B, T, H, Dq] -> [B, rows, T] (fp32 or wider)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bthd,bshd->bhts", q[:, rows].to(dtype), k.to(dtype)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)


@torch.no_grad()
def centroid_target(main_q: torch.Tensor, main_k: torch.Tensor, scale: float,
                    topk_indices: torch.Tensor | None = None, rows: slice = slice(None),
                    layer_weights: list[float] | None = None) -> torch.Tensor:
    """The centroid pbar of the G served layers for the query rows `rows`: [B, rows, T].

    main_q, main_k [G, B, T, H, Dq]; topk_indices [B, T, K] or None (dense).
    """
    G, B, T = main_q.shape[:3]
    weights = layer_weights if layer_weights is not None else [1.0 / G] * G
    if len(weights) != G:
        raise ValueError(f"{len(weights)} layer weights for {G} served layers")
    allowed = allowed_keys(B, T, rows, topk_indices, main_q.device)
    target = None
    for g in range(G):
        a = layer_attention(main_q[g], main_k[g], scale, allowed, rows) * weights[g]
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
