"""One no-grad forward of the frozen backbone, recording what the distillation loss needs.

Per layer: the main attention's post-RoPE q and k ([B, T, H, Dq], MLA nope + rope parts per head)
and its softmax scale; per F layer: the indexer's inputs (hidden states, q_resid, cos, sin) and the
top-k it chose. The backbone attends densely (all causal keys) or sparsely (each layer to its
pattern's top-k, as DSA inference does), whichever the capture asks for.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from distill.model import SharedIndexer, dsa_attentions

ATTN_IMPLEMENTATION = "distill_capture"


@dataclass
class IndexerInputs:
    hidden_states: torch.Tensor   # [B, T, hidden]  (the attention's normed input)
    q_resid: torch.Tensor         # [B, T, q_lora_rank]
    cos: torch.Tensor             # [B, T, rope_dim]
    sin: torch.Tensor             # [B, T, rope_dim]


@dataclass
class Captured:
    sparse: bool
    main_q: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [B, T, H, Dq]
    main_k: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [B, T, H, Dq]
    scale: dict[int, float] = field(default_factory=dict)
    indexer_inputs: dict[int, IndexerInputs] = field(default_factory=dict)
    topk: dict[int, torch.Tensor] = field(default_factory=dict)     # F layer -> [B, T, K] int32, -1 = no key


_active: Captured | None = None


def _capture_attention(module, query, key, value, attention_mask, *, indices=None, **kwargs):
    """transformers' DSA sdpa path, recording q and k, with the top-k mask applied only when sparse."""
    if _active is not None:
        _active.main_q[module.layer_idx] = query.transpose(1, 2)
        _active.main_k[module.layer_idx] = key.transpose(1, 2)
        _active.scale[module.layer_idx] = float(kwargs["scaling"])
    if indices is not None and (_active is None or _active.sparse):
        keep = torch.zeros(indices.shape[0], indices.shape[1], key.shape[2] + 1, dtype=torch.bool,
                           device=indices.device)
        keep.scatter_(-1, torch.where(indices < 0, key.shape[2], indices).long(), True)
        attention_mask = attention_mask & keep[:, None, :, : key.shape[2]]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _causal_topk(topk: torch.Tensor) -> torch.Tensor:
    """transformers pads rows with fewer than k keys with masked (future) keys: mark those -1."""
    t = torch.arange(topk.shape[1], device=topk.device)[None, :, None]
    return torch.where(topk.long() > t, -1, topk.long()).to(torch.int32)


@contextlib.contextmanager
def capture(model: nn.Module, sparse: bool, layers: list[int] | None = None):
    """Context manager yielding a `Captured` filled by the model forwards run inside it.

    `layers`: the F layers whose indexer inputs and top-k to record (default: all with an indexer).
    """
    global _active
    if _active is not None:
        raise RuntimeError("captures do not nest")
    record = Captured(sparse=sparse)
    handles = []
    for layer, attn in enumerate(dsa_attentions(model)):
        if layers is not None and layer not in layers:
            continue
        if attn.indexer is None or isinstance(attn.indexer, SharedIndexer):
            continue

        def pre_hook(module, args, kwargs, layer=layer):
            hidden_states, q_resid, (cos, sin) = args[:3]
            record.indexer_inputs[layer] = IndexerInputs(hidden_states, q_resid, cos, sin)

        def post_hook(module, args, kwargs, output, layer=layer):
            record.topk[layer] = _causal_topk(output)

        handles.append(attn.indexer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(attn.indexer.register_forward_hook(post_hook, with_kwargs=True))
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    _active = record
    try:
        yield record
    finally:
        _active = None
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
