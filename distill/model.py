"""The backbone under a pattern: frozen weights, F-layer indexers trainable, S-layer indexers dropped.

How an S layer takes its owner's top-k in transformers' own forward (`model(...)`) is the family's transformers
class's business (`DsaFamily.shares_topk`):

- GlmMoeDsa and HY-V4 share natively: their decoder loop hands each layer's top-k to the next
  (`prev_topk_indices`), and a layer whose indexer is None reuses it. `apply_pattern` leaves an S layer exactly as
  those classes build it from `config.indexer_types`: indexer None (and `skip_topk` set), `indexer_types` recorded.
- DeepseekV32, A.X-K2 and DeepSeek-V4 have no sharing: the application's `TopkRelay` carries the top-k. It wraps
  each F indexer's `forward` (a `RelayedForward`: the module, its parameters and their names stay as they are) to
  keep the top-k it returns, and puts a `SharedIndexer` that reads it in each S layer's indexer slot.

The distillation's own forward (the family adapters' `forward` with a `distill.capture.Capture`) hands S layers
their owner's top-k itself and uses neither.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.adapters import NotDSAModelError, family_of
from distill.pattern import Pattern
from distill.upcast import UpcastLinear

__all__ = ["AppliedPattern", "NotDSAModelError", "RelayedForward", "SharedIndexer", "TopkRelay", "apply_pattern",
           "dsa_attentions", "full_layer_indexer"]


def dsa_attentions(model: nn.Module) -> list[nn.Module]:
    """The attention module of every DSA layer (by pattern position), each checked to be a DSA attention."""
    return family_of(model).dsa_attentions(model)


class TopkRelay:
    """The top-k channel of transformers' own forward under an applied pattern, for a family whose transformers
    class does not share top-k: `topk[f]` is F layer f's latest top-k [B, T, K], put there by the `RelayedForward`
    that wraps f's indexer, read by the `SharedIndexer`s of f's S layers. Made by `apply_pattern` (its
    `AppliedPattern.relay`); `close()` puts the indexers' forwards back as they were and drops the top-k."""

    def __init__(self):
        self.topk: dict[int, torch.Tensor] = {}
        self.relayed: dict[int, nn.Module] = {}  # F layer -> its indexer, whose forward this relay wraps

    def relay(self, layer: int, indexer: nn.Module) -> None:
        """Wrap the forward of `indexer` (F layer `layer`'s) so that it keeps its top-k here."""
        indexer.forward = RelayedForward(self, layer, indexer, vars(indexer).get("forward"))
        self.relayed[layer] = indexer

    def topk_of(self, owner: int) -> torch.Tensor:
        topk = self.topk.get(owner)
        if topk is None:
            raise RuntimeError(f"a shared layer ran before its owner F layer {owner} produced top-k indices")
        return topk

    def close(self) -> None:
        """Unwrap every indexer this relay wrapped (back to the forward it had before) and drop the top-k."""
        for indexer in self.relayed.values():
            wrapper = vars(indexer).get("forward")
            if isinstance(wrapper, RelayedForward) and wrapper.relay is self:
                if wrapper.previous is None:
                    del indexer.forward  # the class's own forward again
                else:
                    indexer.forward = wrapper.previous
        self.relayed.clear()
        self.topk.clear()


class RelayedForward:
    """An F indexer's forward that also keeps the top-k it returns in `relay.topk[layer]`: set as the indexer's
    `forward` (nn.Module's call runs it; hooks, parameters and state-dict names are untouched). `previous`: the
    instance forward it replaced (None: the class's)."""

    def __init__(self, relay: TopkRelay, layer: int, indexer: nn.Module, previous):
        self.relay, self.layer, self.indexer, self.previous = relay, layer, indexer, previous

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        if self.previous is not None:
            topk = self.previous(*args, **kwargs)
        else:
            topk = type(self.indexer).forward(self.indexer, *args, **kwargs)
        self.relay.topk[self.layer] = topk
        return topk


class SharedIndexer(nn.Module):
    """Stands in an S layer's indexer slot for transformers' own forward of a family without native sharing:
    returns its owner F layer's latest top-k from the pattern's `TopkRelay`. No parameters."""

    def __init__(self, relay: TopkRelay, owner: int):
        super().__init__()
        self.relay, self.owner = relay, owner

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.relay.topk_of(self.owner)

    def extra_repr(self) -> str:
        return f"owner={self.owner}"


class AppliedPattern(dict):
    """{F layer: its indexer} (the trainable part) of one `apply_pattern`, with its `pattern` and `relay` (the
    `TopkRelay` of a family without native sharing, else None)."""

    def __init__(self, indexers: dict[int, nn.Module], pattern: Pattern, relay: TopkRelay | None):
        super().__init__(indexers)
        self.pattern, self.relay = pattern, relay


def full_layer_indexer(indexer: nn.Module | None, layer: int, pattern: Pattern) -> nn.Module:
    """`indexer`, the indexer of layer `layer` that `pattern` makes F; NotDSAModelError when the model shares that
    layer (no indexer: its config.indexer_types or an applied pattern makes it shared; a SharedIndexer: an applied
    pattern made it S)."""
    if indexer is None or isinstance(indexer, SharedIndexer):
        raise NotDSAModelError(f"layer {layer} is F in {pattern} but the model has no indexer there (its "
                               "config.indexer_types or an applied pattern makes it shared); choose a pattern that "
                               "makes it S, or load the model with indexer_types all 'full'")
    return indexer


def apply_pattern(model: nn.Module, pattern: Pattern) -> AppliedPattern:
    """Freeze the backbone and put `pattern` in place; returns {F layer: its indexer} (the trainable part).

    Layers are pattern positions (the family's DSA layers). S layers lose their indexer and take their owner's
    top-k in transformers' own forward too (see the module's docstring), and `config.indexer_types` records the
    pattern (transformers' GlmMoeDsa and HY-V4 read it when an export is loaded). The model is checked before
    anything changes: a refused pattern leaves it as it was.
    """
    family = family_of(model)
    attentions = family.dsa_attentions(model)
    pattern.check_layers(len(attentions))
    indexers = {layer: full_layer_indexer(family.indexer(attentions[layer]), layer, pattern)
                for layer in pattern.full_layers}
    relay = None if family.shares_topk else TopkRelay()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer, attn in enumerate(attentions):
        owner = pattern.owner(layer)
        if owner != layer:
            family.set_indexer(attn, None if relay is None else SharedIndexer(relay, owner))
        elif relay is not None:
            relay.relay(layer, indexers[layer])
    for indexer in indexers.values():
        for p in indexer.parameters():
            p.requires_grad_(True)
        UpcastLinear.convert(indexer)  # backward keeps weights_proj's bf16 input, not its fp32 copy
    model.config.indexer_types = pattern.indexer_types()
    return AppliedPattern(indexers, pattern, relay)
