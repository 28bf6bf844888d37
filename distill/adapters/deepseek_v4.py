"""DeepSeek-V4 (transformers `deepseek_v4`): compressed sparse attention; docs/DEEPSEEK_V4.md has the design.

Every decoder layer is MQA over one K = V head of `head_dim` (512 in the release) with a per-head sink, on a
sliding window of `sliding_window` raw tokens; `config.layer_types` adds compressed keys:
- 'compressed_sparse_attention' (CSA, the DSA layers: a pattern runs over these only, in order): 4:1
  compressed entries (`self_attn.compressor`, overlapping windows), of which the lightning indexer
  `self_attn.compressor.indexer` picks the top `index_topk` visible ones (query t sees entry w iff
  w < (t + 1) // 4); its keys are its own compressor's entries at `index_head_dim`, RoPE interleaved on the
  trailing dims of q and k at the query positions and the entry positions w * 4 ("compress" theta), scores
  sum_j w_j ReLU(q_j . k) with w = weights_proj(x) * HI^-0.5 and the softmax scale D^-0.5;
- 'heavily_compressed_attention' (HCA): 128:1 entries, all visible ones attended, no indexer;
- 'sliding_attention': the window only.
The layer's softmax runs over [window keys, its compressed keys, sink] together; the forms below attend to the
two parts separately, each with its LSE, and merge them with the sink (kernels.compressed_attention).

Distillation target of a CSA layer: each head's attention over the compressed entries the indexer chooses
among, normalised over those entries only (window keys and sink left out), averaged over heads
(docs/DEEPSEEK_V4.md section 3 says why). A shared CSA layer takes its owner's top-k (compressed-entry
indices, the same windows in every CSA layer). Hidden states between layers are hc_mult streams mixed by
Sinkhorn hyper-connections; hash-routed MoE layers read input_ids. transformers has no cross-layer sharing for
V4: an export is indexer weights, manifest and serving lines (no full-model directory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

from distill.adapters.family import DsaFamily
from distill.upcast import linear_in_weight_dtype
from kernels.compressed_attention import compressed_attention, merge_with_sink, window_attention

if TYPE_CHECKING:
    from distill.capture import Capture

CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"


class LayerInputs(NamedTuple):
    """What every V4 decoder layer reads besides the streams."""
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]   # {"main", "compress"}: (cos, sin) [B, T, rope / 2]
    position_ids: torch.Tensor                            # [B, T]
    input_ids: torch.Tensor                               # [B, T] (hash-routed MoE)


class IndexerInputs(NamedTuple):
    """What a V4 indexer reads."""
    hidden_states: torch.Tensor   # [B, T, hidden] (the attention's normed input)
    q_resid: torch.Tensor         # [B, T, q_lora_rank]
    position_ids: torch.Tensor    # [B, T]


def overlapping_entries(compressor: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The compressed entries [B, T // m, head_dim] of a CSA compressor (the layer's, or its indexer's own) on
    x [B, T, hidden], as transformers computes them without a cache: entry w pools the Cb half of window w and
    the Ca half of window w - 1 by a gated softmax, kv_norm, RoPE at position w * m; the incomplete trailing
    window is dropped."""
    B, T, _ = x.shape
    m, d = compressor.compress_rate, compressor.head_dim
    n = T // m
    kv, gate = compressor.kv_proj(x)[:, :n * m], compressor.gate_proj(x)[:, :n * m]
    if n == 0:
        return kv.new_zeros(B, 0, d)
    kv = kv.view(B, n, m, -1)
    gate = gate.view(B, n, m, -1) + compressor.position_bias
    pooled_kv = kv.new_zeros(B, n, 2 * m, d)
    pooled_gate = gate.new_full((B, n, 2 * m, d), float("-inf"))
    pooled_kv[:, :, m:], pooled_gate[:, :, m:] = kv[..., d:], gate[..., d:]
    pooled_kv[:, 1:, :m], pooled_gate[:, 1:, :m] = kv[:, :-1, :, :d], gate[:, :-1, :, :d]
    weights = pooled_gate.softmax(dim=2, dtype=torch.float32).to(pooled_kv.dtype)
    entries = compressor.kv_norm((pooled_kv * weights).sum(dim=2))
    positions = (torch.arange(n, device=x.device) * m)[None].expand(B, -1)
    cos, sin = compressor.rotary_emb(entries, position_ids=positions, layer_type=compressor.rope_layer_type)
    return apply_rotary_pos_emb(entries.unsqueeze(2), cos, sin, unsqueeze_dim=2).squeeze(2)


class CompressedForms:
    """One V4 CSA layer's attention inputs: q [B, T, H, D] (post-RoPE), the window's raw kv [B, T, D] and the
    compressed entries [B, S, D] (K = V, one head shared by all query heads), the sinks [H].

    dense(): the attention over the window and every visible entry; sparse(): over the window and the row's
    top-k entries. Both return the heads' output [B, T, H, D] with the sink in the denominator and the LSE over
    the compressed entries only (the distillation target's normalisation).
    """

    def __init__(self, attn: nn.Module, q, kv, entries, sinks: torch.Tensor, ratio: int):
        self.q, self.kv, self.entries, self.sinks = q, kv, entries, sinks
        self.scale = float(attn.scaling)
        self.window = attn.sliding_window
        self.key_ratio = ratio

    def _window(self):
        return window_attention(self.q, self.kv, self.scale, self.window)

    @property
    def tokens(self) -> tuple[int, int]:
        """(B, T) of the layer's queries."""
        return tuple(self.q.shape[:2])

    shared_keys = None  # one key head already: no per-head key columns to split off

    def dense(self, *, cu_seqlens: torch.Tensor | None = None, runs: list[tuple[int, int, int]] | None = None):
        """(out [B, T, H, D], q [B, T, H, D], k [B, S, 1, D], lse [B, H, T] over the visible entries); packed
        documents (cu_seqlens, their runs) are refused."""
        _unpacked(cu_seqlens)
        out_c, lse_c = compressed_attention(self.q, self.entries, self.scale, self.key_ratio)
        out_w, lse_w = self._window()
        return merge_with_sink(out_w, lse_w, out_c, lse_c, self.sinks), self.q, self.entries.unsqueeze(2), lse_c

    def sparse(self, attention, topk: torch.Tensor, *, prob_out: torch.Tensor | None = None,
               prob_weight: float = 1.0, cu_seqlens: torch.Tensor | None = None):
        """(out [B, T, H, D], lse [B, H, T] over the row's top-k entries) with `attention` (a
        `kernels.sparse_mqa_attention` on the S entries; topk holds visible entries or -1)."""
        _unpacked(cu_seqlens)
        out_c, lse_c = attention(self.q, self.entries, topk, self.scale, self.entries.shape[-1], prob_out=prob_out,
                                 prob_weight=prob_weight)
        out_w, lse_w = self._window()
        return merge_with_sink(out_w, lse_w, out_c, lse_c, self.sinks), lse_c


def _unpacked(cu_seqlens: torch.Tensor | None) -> None:
    if cu_seqlens is not None:
        raise ValueError("DeepSeek-V4 rows cannot be packed documents (cu_seqlens): its compressor pools windows "
                         "from the row start, across document boundaries; set data.document_mask=false (each row then "
                         "runs as one sequence)")


@dataclass(frozen=True)
class DeepseekV4Family(DsaFamily):
    """DeepSeek-V4: the CSA layers are the DSA layers; the indexer lives at `self_attn.compressor.indexer`."""

    documents: bool = False  # the compressor pools windows from the row start, across document boundaries

    # ---- where things are --------------------------------------------------------------------------
    def dsa_layer_ids(self, config) -> list[int]:
        return [i for i, kind in enumerate(config.layer_types) if kind == CSA]

    @staticmethod
    def key_ratio(indexer: nn.Module) -> int:
        return indexer.compress_rate

    # ---- how the indexer computes ------------------------------------------------------------------
    @staticmethod
    def indexer_projections(indexer: nn.Module, inputs: IndexerInputs):
        """(q [B, T, HI, D], k [B, T // 4, D] (the indexer's compressed entries), weights [B, T, HI]) as the
        backbone indexer computes them; `weights` carries HI^-0.5 but not the softmax scale (`kernel_weights`)."""
        x, q_resid, position_ids = inputs
        B, T, _ = x.shape
        k = overlapping_entries(indexer, x)
        cos, sin = indexer.rotary_emb(x, position_ids=position_ids, layer_type=indexer.rope_layer_type)
        q = indexer.q_b_proj(q_resid).view(B, T, -1, indexer.head_dim)
        q = apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=2)
        scorer = indexer.scorer
        weights = linear_in_weight_dtype(scorer.weights_proj, x).float() * scorer.weights_scaling
        return q, k, weights

    @staticmethod
    def kernel_weights(indexer: nn.Module, weights: torch.Tensor) -> torch.Tensor:
        """index_w for the kernels: the head weights times the softmax scale, [B, T, HI]."""
        return weights * indexer.scorer.softmax_scale

    # ---- the forward -------------------------------------------------------------------------------
    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """(streams [B, T, hc_mult, hidden], LayerInputs) before the first decoder layer."""
        inner = model.model
        hidden = inner.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        position_ids = position_ids.expand(input_ids.shape[0], -1)
        rope = {kind: inner.rotary_emb(hidden, position_ids=position_ids, layer_type=kind)
                for kind in ("main", "compress")}
        streams = hidden.unsqueeze(2).expand(-1, -1, model.config.hc_mult, -1).contiguous()
        return streams, LayerInputs(rope, position_ids, input_ids)

    def layer(self, model: nn.Module, i: int, hidden: torch.Tensor, layer_inputs: LayerInputs, capture: Capture):
        """Decoder layer i on the streams [B, T, hc_mult, hidden]; a CSA layer attends through the capture."""
        block = model.model.layers[i]
        dtype = hidden.dtype
        dsa = self.dsa_layer_ids(model.config)
        position = dsa.index(i) if i in dsa else None
        post, comb, collapsed = block.attn_hc(hidden)
        attended = self.attention(block.self_attn, position, block.input_layernorm(collapsed), layer_inputs, capture)
        hidden = _mix(post, comb, attended, hidden, dtype)
        post, comb, collapsed = block.ffn_hc(hidden)
        mlp = block.mlp(block.post_attention_layernorm(collapsed), input_ids=layer_inputs.input_ids)
        hidden = _mix(post, comb, mlp, hidden, dtype)
        if position is not None:
            capture.layer_done(position)
        return hidden

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [B, T, hidden] from the streams [B, T, hc_mult, hidden]."""
        return model.model.norm(model.model.hc_head(hidden))

    def attention(self, attn: nn.Module, position: int | None, x: torch.Tensor, layer_inputs: LayerInputs,
                  capture: Capture) -> torch.Tensor:
        """The attention of one layer on its normed input x [B, T, hidden] -> [B, T, hidden]; `position`: the
        layer's pattern position (a CSA layer), None for HCA and sliding layers (they bypass the capture)."""
        B, T, _ = x.shape
        cos, sin = layer_inputs.rope[attn.rope_layer_type]
        q_resid = attn.q_a_norm(attn.q_a_proj(x))
        q = attn.q_b_norm(attn.q_b_proj(q_resid).view(B, T, -1, attn.head_dim))
        q = apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=2)
        kv = attn.kv_norm(attn.kv_proj(x))
        kv = apply_rotary_pos_emb(kv.unsqueeze(2), cos, sin, unsqueeze_dim=2).squeeze(2)
        sinks = self._sinks(attn, attn.layer_idx)
        if position is not None:
            indexer = attn.compressor.indexer
            topk = capture.select(position, indexer, IndexerInputs(x, q_resid, layer_inputs.position_ids))
            forms = CompressedForms(attn, q, kv, overlapping_entries(attn.compressor, x), sinks,
                                    attn.compressor.compress_rate)
            out = capture.attend(position, forms, topk)
        else:
            out_w, lse_w = window_attention(q, kv, float(attn.scaling), attn.sliding_window)
            if attn.compressor is None:  # a sliding layer: the window and the sink only
                out_c, lse_c = torch.zeros_like(out_w), torch.full_like(lse_w, float("-inf"))
            else:  # HCA: every visible entry, no indexer
                entries = attn.compressor(x, q_resid, layer_inputs.position_ids, None, attn.layer_idx)[0].squeeze(1)
                out_c, lse_c = compressed_attention(q, entries, float(attn.scaling), attn.compressor.compress_rate)
            out = merge_with_sink(out_w, lse_w, out_c, lse_c, sinks)
        # K = V carried RoPE into the output's rope slice: the conjugate rotation undoes it
        out = apply_rotary_pos_emb(out, cos, -sin, unsqueeze_dim=2)
        grouped = attn.o_a_proj(out.reshape(B, T, attn.config.o_groups, -1)).flatten(2)
        return attn.o_b_proj(grouped)


def _mix(post: torch.Tensor, comb: torch.Tensor, out: torch.Tensor, streams: torch.Tensor, dtype) -> torch.Tensor:
    """Hyper-connection merge: post [B, T, hc] x the sublayer's output [B, T, hidden] + comb^T [B, T, hc, hc]
    applied to the streams [B, T, hc, hidden], in the streams' dtype (as transformers' decoder layer)."""
    return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), streams)


FAMILY = DeepseekV4Family(model_type="deepseek_v4", indexer_rope="interleave", causal_lm=DeepseekV4ForCausalLM,
                          config_class=DeepseekV4Config, indexer_rope_at="back", indexer_path="compressor.indexer",
                          pattern_over="csa_layers", sinks=True)
