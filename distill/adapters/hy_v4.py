"""HY-V4 (transformers `hy_v4`): token-level MLA DSA with half-split RoPE in the main attention, an indexer with
half-split RoPE on the *back* qk_rope_head_dim dims of each head (k_norm in fp32), an output gate
sigmoid(gate_proj(x)) per head, and a learned sink logit per head. transformers shares top-k across layers
itself (`config.indexer_types`: a shared layer has `indexer = None`), so exports keep the family.

Its decoder layers carry hidden states as hc_mult streams [B, T, hc_mult, hidden] mixed by hyper-connections
(`attn_hc`, `ffn_hc`, called as modules): each returns (post [B, T, hc_mult], the sublayer's input
[B, T, hidden]); the sublayer's output o goes back as post * o + the streams. `hc_head` collapses the streams
before the final norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import HYV4Config, HYV4ForCausalLM

from distill.adapters.mla import MlaDsaFamily

if TYPE_CHECKING:
    from distill.capture import Capture


def _merge(post: torch.Tensor, out: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """post [B, T, hc] x a sublayer's output [B, T, hidden] + the streams [B, T, hc, hidden], in fp32."""
    return (post.float().unsqueeze(-1) * out.float().unsqueeze(-2) + streams.float()).to(streams.dtype)


@dataclass(frozen=True)
class HyV4Family(MlaDsaFamily):
    """MLA DSA with hyper-connections: the hidden states between layers are [B, T, hc_mult, hidden]."""

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """(streams [B, T, hc_mult, hidden], (cos, sin) [B, T, rope]) before the first decoder layer."""
        hidden, position_embeddings = super().embed(model, input_ids, position_ids)
        streams = hidden.unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
        return streams, position_embeddings

    def layer(self, model: nn.Module, i: int, hidden: torch.Tensor, position_embeddings, capture: Capture):
        """Decoder layer i on the streams [B, T, hc_mult, hidden]; the capture decides how its attention attends."""
        block = model.model.layers[i]
        post, x = block.attn_hc(hidden)
        attended = self.attention(block.self_attn, i, block.input_layernorm(x), position_embeddings, capture)
        hidden = _merge(post, attended, hidden)
        post, x = block.ffn_hc(hidden)
        hidden = _merge(post, block.mlp(block.post_attention_layernorm(x)), hidden)
        capture.layer_done(i)
        return hidden

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [B, T, hidden] from the streams [B, T, hc_mult, hidden]."""
        return model.model.norm(model.model.hc_head(hidden))


FAMILY = HyV4Family(model_type="hy_v4", indexer_rope="half", causal_lm=HYV4ForCausalLM, config_class=HYV4Config,
                    indexer_rope_at="back", attention_rope="half", output_gate="gate_proj", sinks=True,
                    export_as="hy_v4")
