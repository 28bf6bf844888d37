"""Token-level MLA DSA families (DeepSeek-V3.2, GLM-5): where the DSA layers and indexers are, how they compute.

Every decoder layer is a DSA layer: MLA main attention (q through a LoRA, one compressed kv latent per
token expanded per head by kv_b_proj; nope + rope parts) and a lightning indexer that picks the top-k keys.
The family forward below runs the backbone's own modules (each called as a module, so ZeRO-3 gathers its
partitioned parameters) and hands every layer to a `Capture`, which decides how the layer attends:

- dense: the expanded form, q, k [B, T, H, nope + rope], v [B, T, H, Dv], through the backbone's fused
  causal attention (it returns each head's LSE);
- sparse: MLA's absorbed form, the MQA shape FlashMLA's sparse prefill takes: per token one latent key
  [kv_lora_rank + rope] shared by all heads, each head's query with its nope part folded through
  kv_b_proj's key half ([H, nope] -> [H, kv_lora_rank]); the latent output goes back through the value
  half. A row gathers k latent keys, not k x H x (nope + rope) values.

No [B, 1, T, T] mask, no [B, T, HI, T] indexer scores: transformers' module forwards build both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.models.deepseek_v32.modeling_deepseek_v32 import apply_rotary_pos_emb
from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import apply_rotary_pos_emb_interleave

if TYPE_CHECKING:
    from distill.capture import Capture

ROPE = {"interleave": apply_rotary_pos_emb_interleave, "half": apply_rotary_pos_emb}


class NotDSAModelError(ValueError):
    """The model has no DeepSeek-Sparse-Attention indexers to distil."""


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
    """

    def __init__(self, attn: nn.Module, q_nope, q_rot, latent, k_rot):
        self.attn, self.q_nope, self.q_rot, self.latent, self.k_rot = attn, q_nope, q_rot, latent, k_rot
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

    def _kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj's weight as [H, nope + Dv, kv_lora_rank], through the module (ZeRO-3 gathers it)."""
        if self._kv_b is None:
            eye = torch.eye(self.latent_dim, dtype=self.latent.dtype, device=self.latent.device)
            H = self.q_nope.shape[2]
            self._kv_b = self.attn.kv_b_proj(eye).T.reshape(H, -1, self.latent_dim)
        return self._kv_b

    def absorbed(self):
        nope = self.q_nope.shape[-1]
        w_uk = self._kv_b_weight()[:, :nope]  # [H, nope, C]
        q = torch.cat([torch.einsum("bthn,hnc->bthc", self.q_nope, w_uk), self.q_rot], dim=-1)
        kv = torch.cat([self.latent, self.k_rot[:, :, 0]], dim=-1)
        return q, kv

    def output(self, latent_out: torch.Tensor) -> torch.Tensor:
        w_uv = self._kv_b_weight()[:, self.q_nope.shape[-1]:]  # [H, Dv, C]
        return torch.einsum("bthc,hvc->bthv", latent_out, w_uv)


@dataclass(frozen=True)
class MlaDsaFamily:
    """A token-level MLA DSA family. `indexer_rope`: how the indexer applies RoPE ('interleave' | 'half')."""

    model_type: str
    indexer_rope: str
    causal_lm: type       # the transformers class that loads the family's directories
    config_class: type

    # ---- where things are --------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise NotDSAModelError(f"{type(model).__name__} has no decoder layers (expected model.model.layers)")
        return layers

    def dsa_attentions(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of every decoder layer, each checked to be a DSA attention."""
        attentions = []
        for i, layer in enumerate(self.decoder_layers(model)):
            attn = getattr(layer, "self_attn", None)
            if attn is None or not hasattr(attn, "indexer"):
                raise NotDSAModelError(f"{type(model).__name__} layer {i} has no DSA indexer: distillation needs a "
                                       f"DeepSeek Sparse Attention model")
            attentions.append(attn)
        return attentions

    # ---- how the indexer computes ------------------------------------------------------------------
    def indexer_projections(self, indexer: nn.Module, inputs: IndexerInputs):
        """(q [B,T,HI,D], k [B,T,D], weights [B,T,HI]) exactly as the backbone indexer computes them.

        `weights` carries HI^-0.5 but not the softmax scale D^-0.5 (see `kernel_weights`).
        """
        x, q_resid = inputs.hidden_states, inputs.q_resid
        B, T, _ = x.shape
        rope_dim = indexer.qk_rope_head_dim
        q = indexer.wq_b(q_resid).view(B, T, indexer.n_heads, indexer.head_dim)
        q_rot, q_pass = torch.split(q, [rope_dim, indexer.head_dim - rope_dim], dim=-1)
        k = indexer.k_norm(indexer.wk(x)).unsqueeze(2)
        k_rot, k_pass = torch.split(k, [rope_dim, indexer.head_dim - rope_dim], dim=-1)
        q_rot, k_rot = ROPE[self.indexer_rope](q_rot, k_rot, inputs.cos, inputs.sin, unsqueeze_dim=2)
        q = torch.cat([q_rot, q_pass], dim=-1)
        k = torch.cat([k_rot, k_pass], dim=-1).squeeze(2)
        weights = indexer.weights_proj(x.to(indexer.weights_proj.weight.dtype)).float() * indexer.n_heads ** -0.5
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

    def layer(self, model: nn.Module, i: int, hidden: torch.Tensor, position_embeddings, capture: "Capture"):
        """Decoder layer i on hidden [B, T, hidden]; the capture decides how its attention attends."""
        block = model.model.layers[i]
        attended = self.attention(block.self_attn, i, block.input_layernorm(hidden), position_embeddings, capture)
        hidden = hidden + attended
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        capture.layer_done(i)
        return hidden

    def forward(self, model: nn.Module, input_ids: torch.Tensor, capture: "Capture",
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed hidden states [B, T, hidden] of the backbone under `capture`."""
        hidden, position_embeddings = self.embed(model, input_ids, position_ids)
        for i in range(len(model.model.layers)):
            hidden = self.layer(model, i, hidden, position_embeddings, capture)
        return model.model.norm(hidden)

    def attention(self, attn: nn.Module, i: int, x: torch.Tensor, position_embeddings, capture: "Capture"):
        """MLA + DSA of layer i on the normed input x [B, T, hidden] -> [B, T, hidden]."""
        B, T, _ = x.shape
        H, nope, rope = attn.num_heads, attn.qk_nope_head_dim, attn.qk_rope_head_dim
        q_resid = attn.q_a_layernorm(attn.q_a_proj(x))
        q = attn.q_b_proj(q_resid).view(B, T, H, nope + rope)
        q_nope, q_rot = torch.split(q, [nope, rope], dim=-1)
        latent, k_rot = torch.split(attn.kv_a_proj_with_mqa(x), [attn.kv_lora_rank, rope], dim=-1)
        latent = attn.kv_a_layernorm(latent)
        cos, sin = position_embeddings
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot.view(B, T, 1, rope), cos, sin, unsqueeze_dim=2)
        topk = capture.select(i, attn.indexer, IndexerInputs(x, q_resid, cos, sin))
        out = capture.attend(i, MlaForms(attn, q_nope, q_rot, latent, k_rot), topk)
        return attn.o_proj(out.reshape(B, T, H * attn.v_head_dim))
