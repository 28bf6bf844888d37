"""One no-grad forward of the frozen backbone, recording what the distillation loss needs.

Per layer: the main attention's post-RoPE q and k ([B, T, H, Dq], MLA nope + rope parts per head)
and its softmax scale; per F layer: the indexer's inputs (hidden states, q_resid, cos, sin) and the
top-k it chose. The backbone attends densely (all causal keys) or sparsely (each layer to its
pattern's top-k, as DSA inference does), whichever the capture asks for.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from distill.indexer import IndexerInputs, indexer_projections, kernel_weights
from distill.model import SharedIndexer, dsa_attentions, rope_style

ATTN_IMPLEMENTATION = "distill_capture"


@dataclass
class Captured:
    sparse: bool
    mask_free: bool = False   # dense and every indexer replaced: no [B, 1, T, T] mask is built
    grad: bool = False        # record the fused indexers' projections with autograd (for the loss)
    main_q: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [B, T, H, Dq]
    main_k: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [B, T, H, Dq]
    scale: dict[int, float] = field(default_factory=dict)
    indexer_inputs: dict[int, IndexerInputs] = field(default_factory=dict)
    topk: dict[int, torch.Tensor] = field(default_factory=dict)     # F layer -> [B, T, K] int32, -1 = no key
    # F layer -> (index_q [B,T,HI,D], index_k [B,T,D], index_w [B,T,HI] scaled), when top-k came from topk_fn
    projections: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


_active: Captured | None = None


def _capture_attention(module, query, key, value, attention_mask, *, indices=None, **kwargs):
    """transformers' DSA sdpa path, recording q and k, with the top-k mask applied only when sparse."""
    if _active is not None:
        _active.main_q[module.layer_idx] = query.transpose(1, 2)
        _active.main_k[module.layer_idx] = key.transpose(1, 2)
        _active.scale[module.layer_idx] = float(kwargs["scaling"])
    if _active is not None and _active.mask_free:
        attention_mask = None  # causal flash / memory-efficient attention, no [B, 1, T, T] mask
    elif indices is not None and (_active is None or _active.sparse):
        keep = torch.zeros(indices.shape[0], indices.shape[1], key.shape[2] + 1, dtype=torch.bool,
                           device=indices.device)
        keep.scatter_(-1, torch.where(indices < 0, key.shape[2], indices).long(), True)
        attention_mask = attention_mask & keep[:, None, :, : key.shape[2]]
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _capture_mask(*args, **kwargs):
    """transformers' sdpa mask; a [B, 1, 1, 1] stand-in when the capture needs none (no index reads it)."""
    if _active is not None and _active.mask_free:
        return torch.ones(kwargs["batch_size"], 1, 1, 1, dtype=torch.bool, device=kwargs["device"])
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, _capture_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _capture_mask)


def _causal_topk(topk: torch.Tensor) -> torch.Tensor:
    """transformers pads rows with fewer than k keys with masked (future) keys: mark those -1."""
    t = torch.arange(topk.shape[1], device=topk.device)[None, :, None]
    return torch.where(topk.long() > t, -1, topk.long()).to(torch.int32)


def _fused_indexer(indexer: nn.Module, layer: int, record: Captured, rope: str, topk_fn: Callable):
    """An indexer forward that records its inputs and projections and picks top-k with `topk_fn`
    (no [B, T, T] scores). The projections keep their autograd graph when `record.grad`."""
    def forward(hidden_states, q_resid, position_embeddings, *args, **kwargs):
        inputs = IndexerInputs(hidden_states, q_resid, *position_embeddings)
        record.indexer_inputs[layer] = inputs
        with torch.set_grad_enabled(record.grad):
            q, k, weights = indexer_projections(indexer, inputs, rope)
            record.projections[layer] = (q, k, kernel_weights(indexer, weights))
        record.topk[layer] = topk_fn(*(t.detach() for t in record.projections[layer]), indexer.index_topk)
        return record.topk[layer]
    return forward


@contextlib.contextmanager
def capture(model: nn.Module, sparse: bool, layers: list[int] | None = None, topk_fn: Callable | None = None,
            grad: bool = False):
    """Context manager yielding a `Captured` filled by the model forwards run inside it.

    `layers`: the F layers whose indexer inputs and top-k to record (default: all with an indexer).
    `topk_fn(index_q, index_k, index_w, k)`: when given, these F layers pick their top-k with it instead of
    the backbone's indexer forward (which materialises [B, T, HI, T] scores); if they are all the model's
    F layers and the capture is dense, no [B, 1, T, T] mask is built either (causal flash attention);
    their projections are recorded, with autograd when `grad`, so the loss need not compute them again.
    """
    global _active
    if _active is not None:
        raise RuntimeError("captures do not nest")
    record = Captured(sparse=sparse, grad=grad)
    handles, replaced = [], []
    indexers = {layer: attn.indexer for layer, attn in enumerate(dsa_attentions(model))
                if attn.indexer is not None and not isinstance(attn.indexer, SharedIndexer)}
    for layer, indexer in indexers.items():
        if layers is not None and layer not in layers:
            continue
        if topk_fn is not None:
            indexer.forward = _fused_indexer(indexer, layer, record, rope_style(model), topk_fn)
            replaced.append(indexer)
            continue

        def pre_hook(module, args, kwargs, layer=layer):
            hidden_states, q_resid, (cos, sin) = args[:3]
            record.indexer_inputs[layer] = IndexerInputs(hidden_states, q_resid, cos, sin)

        def post_hook(module, args, kwargs, output, layer=layer):
            record.topk[layer] = _causal_topk(output)

        handles.append(indexer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(indexer.register_forward_hook(post_hook, with_kwargs=True))
    record.mask_free = not sparse and len(replaced) == len(indexers)
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
        for indexer in replaced:
            del indexer.forward
