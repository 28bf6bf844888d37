"""Token-level MLA DSA families (DeepSeek-V3.2, GLM-5, HY-V4, A.X-K2): where the DSA layers and indexers are,
how they compute.

Every decoder layer is a DSA layer: MLA main attention (q through a LoRA, one compressed kv latent per
token expanded per head by kv_b_proj; nope + rope parts) and a lightning indexer that picks the top-k keys.
The families differ in fields of `MlaDsaFamily`: the RoPE style of the main attention and of the indexer,
where the rope dims sit in an indexer head, an output gate, per-head attention sinks.
The family forward below runs the backbone's own modules (each called as a module, so ZeRO-3 gathers its
partitioned parameters) and hands every layer to a `Capture`, which decides how the layer attends:

- dense: the expanded form, q, k [B, T, H, nope + rope], v [B, T, H, Dv], through the backbone's fused
  causal attention (it returns each head's LSE);
- sparse: MLA's absorbed form, the MQA shape FlashMLA's sparse prefill takes: per token one latent key
  [kv_lora_rank + rope] shared by all heads, each head's query with its nope part folded through
  kv_b_proj's key half ([H, nope] -> [H, kv_lora_rank]); the latent output goes back through the value
  half. A row gathers k latent keys, not k x H x (nope + rope) values.

No [B, 1, T, T] mask, no [B, T, HI, T] indexer scores: transformers' module forwards build both.

Sinks (a learned per-head logit s_h in the softmax denominator, HY-V4): the kernels attend over keys only
and return each head's LSE over those keys; `MlaForms.with_sinks` turns that output into the sink-softmax
output, out * exp(lse) / (exp(lse) + exp(s_h)) = out * sigmoid(lse - s_h). The LSE handed to the capture's
hooks (and so the distillation target) stays the LSE over keys: each head's attention is normalised over the
keys only, without the sink's mass, then averaged over heads (docs/FAMILIES.md says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

from distill.adapters.family import DsaFamily
from distill.upcast import linear_in_weight_dtype
from kernels.dense_attention import causal_attention

if TYPE_CHECKING:
    from distill.capture import Capture

ROPE = {"interleave": apply_rotary_pos_emb_interleave, "half": apply_rotary_pos_emb}
ROPE_AT = ("front", "back")              # where the rope dims sit in an indexer head
OUTPUT_GATES = (None, "gate_proj", "q_gate_proj")


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, T, H, D] whose B and T dims merge (a contiguous tensor, or a column slice of one) -> the view
    [H, B*T, D] that a batched GEMM over heads reads or writes in place (view raises rather than copy)."""
    B, T, H, D = x.shape
    return x.view(B * T, H, D).transpose(0, 1)


@dataclass
class IndexerInputs:
    """What an indexer reads."""
    hidden_states: torch.Tensor   # [B, T, hidden]  (the attention's normed input)
    q_resid: torch.Tensor         # [B, T, q_lora_rank]
    cos: torch.Tensor             # [B, T, rope_dim]
    sin: torch.Tensor             # [B, T, rope_dim]


class MlaForms:
    """The two forms of one MLA layer's attention inputs, each built when first asked for.

    expanded(): (q, k [B, T, H, nope + rope], v [B, T, H, Dv]), as transformers computes them.
    absorbed(): (q [B, T, H, kv_lora_rank + rope], kv [B, T, kv_lora_rank + rope]); the value of a key is
    kv[..., :kv_lora_rank], and `output(latent [B, T, H, kv_lora_rank])` gives the heads' [B, T, H, Dv].
    sinks: the per-head sink logits [H] (None: the family has none); `with_sinks` applies them.
    key_ratio: tokens per key (1: every token is a key); `dense` and `sparse` are how a capture attends.
    """

    key_ratio = 1

    def __init__(self, attn: nn.Module, q_nope, q_rot, latent, k_rot, sinks: torch.Tensor | None = None):
        self.attn, self.q_nope, self.q_rot, self.latent, self.k_rot = attn, q_nope, q_rot, latent, k_rot
        self.sinks = sinks
        self.scale = float(attn.scaling)
        self.v_dim = attn.v_head_dim
        self.latent_dim = latent.shape[-1]
        self._kv_b = None

    def expanded(self):
        B, T, H, nope = self.q_nope.shape
        kv = self.attn.kv_b_proj(self.latent).view(B, T, H, nope + self.v_dim)
        k_nope, v = torch.split(kv, [nope, self.v_dim], dim=-1)
        q = torch.cat([self.q_nope, self.q_rot], dim=-1)
        k = torch.cat([k_nope, self.k_rot.expand(B, T, H, -1)], dim=-1)
        return q, k, v

    @property
    def shared_keys(self) -> torch.Tensor:
        """The key columns every head shares, last in each head's expanded key: the rope part k_rot [B, T, 1, rope]
        (a distillation target keeps one copy of them, not H)."""
        return self.k_rot

    def _kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj's weight as [H, nope + Dv, kv_lora_rank], through the module (ZeRO-3 gathers it)."""
        if self._kv_b is None:
            eye = torch.eye(self.latent_dim, dtype=self.latent.dtype, device=self.latent.device)
            H = self.q_nope.shape[2]
            self._kv_b = self.attn.kv_b_proj(eye).T.reshape(H, -1, self.latent_dim)
        return self._kv_b

    def absorbed(self):
        """(q, kv) of the absorbed form, each written once: the folded nope part goes straight into q's first
        kv_lora_rank columns (one batched GEMM over heads on strided views), the rope part after it."""
        B, T, H, nope = self.q_nope.shape
        C = self.latent_dim
        w_uk = self._kv_b_weight()[:, :nope]  # [H, nope, C]
        q = self.q_nope.new_empty(B, T, H, C + self.q_rot.shape[-1])
        torch.bmm(_heads_first(self.q_nope), w_uk, out=_heads_first(q[..., :C]))
        q[..., C:].copy_(self.q_rot)
        kv = torch.cat([self.latent, self.k_rot[:, :, 0]], dim=-1)
        return q, kv

    def output(self, latent_out: torch.Tensor) -> torch.Tensor:
        """latent_out [B, T, H, kv_lora_rank] -> the heads' output [B, T, H, Dv] (contiguous), through the
        value half of kv_b_proj, written once."""
        B, T, H, _ = latent_out.shape
        w_uv = self._kv_b_weight()[:, self.q_nope.shape[-1]:]  # [H, Dv, C]
        out = latent_out.new_empty(B, T, H, self.v_dim)
        torch.bmm(_heads_first(latent_out), w_uv.transpose(1, 2), out=_heads_first(out))
        return out

    @property
    def tokens(self) -> tuple[int, int]:
        """(B, T) of the layer's queries."""
        return tuple(self.q_nope.shape[:2])

    def dense(self, *, cu_seqlens: torch.Tensor | None = None, runs: list[tuple[int, int, int]] | None = None):
        """(out [B, T, H, Dv] with sinks, q, k [B, T, H, Dq], lse [B, H, T] over the causal keys only) of the
        attention over every causal key (of each document of cu_seqlens; runs: their `document_runs`)."""
        q, k, v = self.expanded()
        out, lse = causal_attention(q, k, v, self.scale, cu_seqlens=cu_seqlens, runs=runs)
        return self.with_sinks(out, lse), q, k, lse

    def sparse(self, attention, topk: torch.Tensor, *, prob_out: torch.Tensor | None = None,
               prob_weight: float = 1.0, cu_seqlens: torch.Tensor | None = None):
        """(out [B, T, H, Dv] with sinks, lse [B, H, T] over the row's top-k keys only) of `attention` (a
        `kernels.sparse_mqa_attention`) in the absorbed form; prob_out [B, T, K] fp32 gains prob_weight x the
        head-averaged probabilities."""
        q, kv = self.absorbed()
        latent, lse = attention(q, kv, topk, self.scale, self.latent_dim, prob_out=prob_out, prob_weight=prob_weight,
                                cu_seqlens=cu_seqlens)
        return self.with_sinks(self.output(latent), lse), lse

    def with_sinks(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """The heads' output [B, T, H, Dv] of a softmax over keys only, with lse [B, H, T] its LSE over those keys
        -> the output with each head's sink logit s_h in the softmax denominator: out * sigmoid(lse - s_h).
        Unchanged without sinks."""
        if self.sinks is None:
            return out
        keep = torch.sigmoid(lse - self.sinks.float()[:, None]).transpose(1, 2).unsqueeze(-1)  # [B, T, H, 1]
        return (out * keep).to(out.dtype)


@dataclass(frozen=True)
class MlaDsaFamily(DsaFamily):
    """A token-level MLA DSA family: every decoder layer is a DSA layer, `self_attn.indexer` its indexer.

    attention_rope: how the main attention applies RoPE ('interleave' | 'half').
    output_gate: None; 'gate_proj' (the heads' output times sigmoid(attn.gate_proj(x)), HY-V4); 'q_gate_proj'
      (query and gate from one fused projection of [q_resid, q_a_proj(x)], the gate's sigmoid in fp32, A.X-K2).
    """

    attention_rope: str = "interleave"
    output_gate: str | None = None

    def __post_init__(self):
        for name, value, allowed in (("indexer_rope", self.indexer_rope, tuple(ROPE)),
                                     ("attention_rope", self.attention_rope, tuple(ROPE)),
                                     ("indexer_rope_at", self.indexer_rope_at, ROPE_AT),
                                     ("output_gate", self.output_gate, OUTPUT_GATES)):
            if value not in allowed:
                raise ValueError(f"family {self.model_type!r}: {name}={value!r} is not one of {allowed}")

    # ---- how the indexer computes ------------------------------------------------------------------
    def indexer_projections(self, indexer: nn.Module, inputs: IndexerInputs):
        """(q [B,T,HI,D], k [B,T,D], weights [B,T,HI]) exactly as the backbone indexer computes them.

        `weights` carries HI^-0.5 but not the softmax scale D^-0.5 (see `kernel_weights`).
        """
        x, q_resid = inputs.hidden_states, inputs.q_resid
        B, T, _ = x.shape
        rope_dim = indexer.qk_rope_head_dim
        q = indexer.wq_b(q_resid).view(B, T, indexer.n_heads, indexer.head_dim)
        # k_norm in its own dtype (HY-V4 keeps it in fp32; a no-op cast for the others)
        k = indexer.k_norm(indexer.wk(x).to(indexer.k_norm.weight.dtype)).to(x.dtype).unsqueeze(2)
        front = self.indexer_rope_at == "front"
        sizes = [rope_dim, indexer.head_dim - rope_dim] if front else [indexer.head_dim - rope_dim, rope_dim]
        (q_a, q_b), (k_a, k_b) = torch.split(q, sizes, dim=-1), torch.split(k, sizes, dim=-1)
        if front:
            q_a, k_a = ROPE[self.indexer_rope](q_a, k_a, inputs.cos, inputs.sin, unsqueeze_dim=2)
        else:
            q_b, k_b = ROPE[self.indexer_rope](q_b, k_b, inputs.cos, inputs.sin, unsqueeze_dim=2)
        q = torch.cat([q_a, q_b], dim=-1)
        k = torch.cat([k_a, k_b], dim=-1).squeeze(2)
        weights = linear_in_weight_dtype(indexer.weights_proj, x).float() * indexer.n_heads ** -0.5
        return q, k, weights

    @staticmethod
    def kernel_weights(indexer: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        """index_w for the kernels: the head weights with the softmax scale folded in (ReLU is positively
        homogeneous), [B, T, HI]."""
        return weights * indexer.softmax_scale

    # ---- the forward -------------------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """(hidden [B, T, hidden], (cos, sin) [B, T, rope]) before the first decoder layer."""
        inner = model.model
        hidden = inner.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        return hidden, inner.rotary_emb(hidden, position_ids=position_ids)

    def layer(self, model: nn.Module, i: int, hidden: torch.Tensor, position_embeddings, capture: Capture):
        """Decoder layer i on hidden [B, T, hidden]; the capture decides how its attention attends."""
        block = model.model.layers[i]
        attended = self.attention(block.self_attn, i, block.input_layernorm(hidden), position_embeddings, capture)
        hidden = hidden + attended
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        capture.layer_done(i)
        return hidden

    def attention(self, attn: nn.Module, i: int, x: torch.Tensor, position_embeddings, capture: Capture):
        """MLA + DSA of layer i on the normed input x [B, T, hidden] -> [B, T, hidden]."""
        B, T, _ = x.shape
        H, nope, rope = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
        q_resid, q, gate = self.query(attn, x)
        q_nope, q_rot = torch.split(q, [nope, rope], dim=-1)
        latent, k_rot = torch.split(attn.kv_a_proj_with_mqa(x), [attn.kv_lora_rank, rope], dim=-1)
        latent = attn.kv_a_layernorm(latent)
        cos, sin = position_embeddings
        q_rot, k_rot = ROPE[self.attention_rope](q_rot, k_rot.view(B, T, 1, rope), cos, sin, unsqueeze_dim=2)
        topk = capture.select(i, attn.indexer, IndexerInputs(x, q_resid, cos, sin))
        sinks = self._sinks(attn, i) if self.sinks else None
        out = capture.attend(i, MlaForms(attn, q_nope, q_rot, latent, k_rot, sinks), topk)
        if gate is not None:
            out = (out * gate).to(out.dtype)
        return attn.o_proj(out.reshape(B, T, H * attn.v_head_dim))

    def query(self, attn: nn.Module, x: torch.Tensor):
        """(q_resid [B, T, q_lora_rank], q [B, T, H, nope + rope], gate [B, T, H, Dv] (the sigmoid, or None))
        of the attention's normed input x [B, T, hidden], as the backbone computes them."""
        B, T, _ = x.shape
        H = attn.num_heads
        q_compressed = attn.q_a_proj(x)
        q_resid = attn.q_a_layernorm(q_compressed)
        if self.output_gate == "q_gate_proj":
            fused = attn.q_gate_proj(torch.cat([q_resid, q_compressed], dim=-1)).view(B, T, H, -1)
            q, gate = torch.split(fused, [attn.qk_head_dim, attn.v_head_dim], dim=-1)
            return q_resid, q, torch.sigmoid(gate.float())
        q = attn.q_b_proj(q_resid).view(B, T, H, attn.qk_nope_head_dim + attn.qk_rope_head_dim)
        if self.output_gate == "gate_proj":
            return q_resid, q, torch.sigmoid(attn.gate_proj(x).view(B, T, H, attn.v_head_dim))
        return q_resid, q, None
