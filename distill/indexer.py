"""The lightning indexer's forward, differentiable (transformers runs it under no_grad).

I_t(s) = sum_j w_{t,j} ReLU(qI_{t,j} . kI_s), with the backbone's own scaling: w = weights_proj(x) * HI^-0.5
and the indexer softmax scale D^-0.5 inside the ReLU (folded into w for the kernels: ReLU is
positively homogeneous). RoPE on the first `qk_rope_head_dim` dims of qI and kI; kI through k_norm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave



@dataclass
class IndexerInputs:
    """What an indexer reads, as recorded during the backbone forward."""
    hidden_states: torch.Tensor   # [B, T, hidden]  (the attention's normed input)
    q_resid: torch.Tensor         # [B, T, q_lora_rank]
    cos: torch.Tensor             # [B, T, rope_dim]
    sin: torch.Tensor             # [B, T, rope_dim]


ROPE = {"interleave": apply_rotary_pos_emb_interleave, "half": apply_rotary_pos_emb}


def indexer_projections(indexer: nn.Module, inputs: IndexerInputs, rope: str):
    """(q [B,T,HI,D], k [B,T,D], weights [B,T,HI]) exactly as the backbone indexer computes them.

    `weights` carries HI^-0.5 but not the softmax scale D^-0.5 (see `kernel_weights`).
    Calls the indexer's submodules (not their .weight), so ZeRO-3 gathers partitioned parameters.
    """
    x, q_resid = inputs.hidden_states, inputs.q_resid
    B, T, _ = x.shape
    rope_dim = indexer.qk_rope_head_dim
    q = indexer.wq_b(q_resid).view(B, T, indexer.n_heads, indexer.head_dim)
    q_rot, q_pass = torch.split(q, [rope_dim, indexer.head_dim - rope_dim], dim=-1)
    k = indexer.k_norm(indexer.wk(x)).unsqueeze(2)
    k_rot, k_pass = torch.split(k, [rope_dim, indexer.head_dim - rope_dim], dim=-1)
    q_rot, k_rot = ROPE[rope](q_rot, k_rot, inputs.cos, inputs.sin, unsqueeze_dim=2)
    q = torch.cat([q_rot, q_pass], dim=-1)
    k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
    weights = indexer.weights_proj(x.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads ** -0.5
    return q, k, weights


def kernel_weights(indexer: nn.Module, weights: torch.Tensor) -> torch.Tensor:
    """index_w for `centroid_kl`: the head weights with the softmax scale folded in, [B, T, HI]."""
    return weights * indexer.softmax_scale


def indexer_scores(q: torch.Tensor, k: torch.Tensor, weights: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Causal indexer logits [B, T, T] in the backbone's exact operation order (-inf above the diagonal)."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * softmax_scale
    logits = torch.matmul(weights.unsqueeze(-2), scores.relu()).squeeze(-2)
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return logits.masked_fill(~causal, float("-inf"))
