"""The backbone under a pattern: frozen weights, F-layer indexers trainable, S-layer indexers dropped."""
from __future__ import annotations

import torch
from torch import nn

from distill.pattern import Pattern


class NotDSAModelError(ValueError):
    """The model has no DeepSeek-Sparse-Attention indexers to distil."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise NotDSAModelError(f"{type(model).__name__} has no decoder layers (expected model.model.layers)")
    return layers


def dsa_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, each checked to be a DSA attention."""
    attentions = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "indexer"):
            raise NotDSAModelError(
                f"{type(model).__name__} layer {i} has no DSA indexer: distillation needs a DeepSeek Sparse "
                "Attention model (GlmMoeDsa or DeepseekV32)")
        attentions.append(attn)
    return attentions


def rope_style(model: nn.Module) -> str:
    """How the indexer applies RoPE: 'interleave' (GlmMoeDsa) or 'half' (DeepseekV32)."""
    return "half" if model.config.model_type == "deepseek_v32" else "interleave"


class SharedIndexer(nn.Module):
    """Stands where an S layer's indexer was: returns its owner's latest top-k. No parameters."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: its weights stay with the owner layer

    def forward(self, *args, **kwargs) -> torch.Tensor:
        topk = getattr(self.owner, "last_topk", None)
        if topk is None:
            raise RuntimeError("a shared layer ran before its owner F layer produced top-k indices")
        return topk


def _remember_topk(module: nn.Module, args, output) -> None:
    module.last_topk = output


def apply_pattern(model: nn.Module, pattern: Pattern) -> dict[int, nn.Module]:
    """Freeze the backbone and put `pattern` in place; returns {F layer: its indexer} (the trainable part).

    S layers lose their indexer: a `SharedIndexer` reuses the owner's top-k, and `config.indexer_types`
    records the pattern (transformers' GlmMoeDsa reads it when an export is loaded).
    """
    attentions = dsa_attentions(model)
    pattern.check_layers(len(attentions))
    for p in model.parameters():
        p.requires_grad_(False)
    indexers: dict[int, nn.Module] = {}
    for layer, attn in enumerate(attentions):
        owner = pattern.owner(layer)
        if owner == layer:
            if attn.indexer is None or isinstance(attn.indexer, SharedIndexer):
                raise NotDSAModelError(f"layer {layer} is F in {pattern} but the model has no indexer there")
            indexers[layer] = attn.indexer
            if not any(h is _remember_topk for h in attn.indexer._forward_hooks.values()):
                attn.indexer.register_forward_hook(_remember_topk)
        else:
            attn.indexer = SharedIndexer(indexers[owner])
    for indexer in indexers.values():
        for p in indexer.parameters():
            p.requires_grad_(True)
    model.config.indexer_types = pattern.indexer_types()
    return indexers
