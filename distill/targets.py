"""Top-k recall of the dense centroid (DESIGN.md section 2); the target math lives in kernels.reference."""
from __future__ import annotations

import torch

from kernels.reference import allowed_keys, centroid_target


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
