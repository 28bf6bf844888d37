"""The backbone under a pattern: frozen weights, F-layer indexers trainable, S-layer indexers dropped."""
from __future__ import annotations

import torch
from torch import nn

from distill.adapters import NotDSAModelError, family_of
from distill.pattern import Pattern

__all__ = ["NotDSAModelError", "SharedIndexer", "apply_pattern", "dsa_attentions", "full_layer_indexer"]


def dsa_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention module of every DSA layer (by pattern position), each checked to be a DSA attention."""
    return family_of(model).dsa_attentions(model)


class SharedIndexer(nn.Module):
    """Stands where an S layer's indexer was, for transformers' own forward (`model(...)`): returns its
    owner's latest top-k. No parameters. (The distillation forward hands S layers their owner's top-k itself.)"""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule: its weights stay with the owner layer

    def forward(self, *args, **kwargs) -> torch.Tensor:
        topk = getattr(self.owner, "last_topk", None)
        if topk is None:
            raise RuntimeError("a shared layer ran before its owner F layer produced top-k indices")
        return topk


def full_layer_indexer(indexer: nn.Module | None, layer: int, pattern: Pattern) -> nn.Module:
    """`indexer`, the indexer of layer `layer` that `pattern` makes F; NotDSAModelError when the model shares that
    layer (no indexer: its config.indexer_types marks it shared; a SharedIndexer: an applied pattern made it S)."""
    if indexer is None or isinstance(indexer, SharedIndexer):
        raise NotDSAModelError(f"layer {layer} is F in {pattern} but the model has no indexer there (its "
                               "config.indexer_types or an applied pattern makes it shared); choose a pattern that "
                               "makes it S, or load the model with indexer_types all 'full'")
    return indexer


def _remember_topk(module: nn.Module, args, output) -> None:
    module.last_topk = output


def apply_pattern(model: nn.Module, pattern: Pattern) -> dict[int, nn.Module]:
    """Freeze the backbone and put `pattern` in place; returns {F layer: its indexer} (the trainable part).

    Layers are pattern positions (the family's DSA layers). S layers lose their indexer: a `SharedIndexer`
    reuses the owner's top-k in transformers' own forward too, and `config.indexer_types` records the pattern
    (transformers' GlmMoeDsa reads it when an export is loaded).
    """
    family = family_of(model)
    attentions = family.dsa_attentions(model)
    pattern.check_layers(len(attentions))
    for p in model.parameters():
        p.requires_grad_(False)
    indexers: dict[int, nn.Module] = {}
    for layer, attn in enumerate(attentions):
        owner = pattern.owner(layer)
        indexer = family.indexer(attn)
        if owner == layer:
            indexers[layer] = full_layer_indexer(indexer, layer, pattern)
            if not any(h is _remember_topk for h in indexer._forward_hooks.values()):
                indexer.register_forward_hook(_remember_topk)
        else:
            family.set_indexer(attn, SharedIndexer(indexers[owner]))
    for indexer in indexers.values():
        for p in indexer.parameters():
            p.requires_grad_(True)
    model.config.indexer_types = pattern.indexer_types()
    return indexers
