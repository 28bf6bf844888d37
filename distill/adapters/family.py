"""What every DSA family adapter says, whatever its attention: which decoder layers are DSA layers (the layers
a pattern runs over, in order), where each one's indexer lives, and the streamed forward's loop.

A pattern position p ("DSA layer p") is the p-th DSA layer of the model; `dsa_layer_ids` maps it to its
decoder layer. For the token-level MLA families every decoder layer is a DSA layer (p = decoder layer); for
DeepSeek-V4 only the CSA layers are, and its HCA and sliding-window layers run without the capture. The
capture, the objective, `apply_pattern` and the export index by pattern position only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from distill.capture import Capture


class NotDSAModelError(ValueError):
    """The model has no DeepSeek-Sparse-Attention indexers to distil."""


@dataclass(frozen=True)
class DsaFamily:
    """A DSA model family.

    indexer_rope: how the indexer applies RoPE ('interleave' | 'half'), as the export's manifest records it.
    indexer_rope_at: where the rope dims sit in an indexer head: 'front' (the first qk_rope_head_dim dims) or
      'back' (the last ones).
    indexer_path: the indexer's attribute path under a DSA layer's attention module.
    pattern_over: which layers a pattern's letters stand for, as the export's manifest records it.
    sinks: each head has a learned sink logit `attn.sinks` [H] in its softmax denominator.
    documents: the forward keeps packed documents apart (cu_seqlens).
    export_as: the model_type of the transformers class a full-model export loads as (one that shares top-k by
      `config.indexer_types`); None: the family has none.
    shares_topk (derived): the family's own transformers class shares top-k (export_as is the family itself).
    """

    model_type: str
    indexer_rope: str
    causal_lm: type       # the transformers class that loads the family's directories
    config_class: type
    indexer_rope_at: str = "front"
    indexer_path: str = "indexer"
    pattern_over: str = "decoder_layers"
    sinks: bool = False
    documents: bool = True
    export_as: str | None = None

    # ---- where things are --------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise NotDSAModelError(f"{type(model).__name__} has no decoder layers (expected model.model.layers)")
        return layers

    def dsa_layer_ids(self, config) -> list[int]:
        """The decoder layer of every DSA layer (pattern position p -> decoder layer), in order."""
        return list(range(config.num_hidden_layers))

    def num_dsa_layers(self, config) -> int:
        """How many letters a pattern of this model has."""
        return len(self.dsa_layer_ids(config))

    def dsa_attentions(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of every DSA layer (by pattern position), each checked to hold an indexer slot."""
        layers = self.decoder_layers(model)
        attentions = []
        for i in self.dsa_layer_ids(model.config):
            attn = getattr(layers[i], "self_attn", None)
            owner, name = self._indexer_slot(attn) if attn is not None else (None, "")
            if owner is None or not hasattr(owner, name):
                raise NotDSAModelError(f"{type(model).__name__} layer {i} has no DSA indexer (self_attn."
                                       f"{self.indexer_path}): distillation needs a DeepSeek Sparse Attention model")
            attentions.append(attn)
        return attentions

    def _indexer_slot(self, attn: nn.Module) -> tuple[nn.Module | None, str]:
        """(the module that holds the indexer attribute, the attribute's name)."""
        *path, name = self.indexer_path.split(".")
        owner = attn
        for part in path:
            owner = getattr(owner, part, None)
        return owner, name

    @property
    def shares_topk(self) -> bool:
        """Whether transformers' class of this family shares top-k across layers itself (GlmMoeDsa, HY-V4): its
        decoder loop hands each layer's top-k to the next, and a layer whose indexer is None reuses it."""
        return self.export_as == self.model_type

    def indexer(self, attn: nn.Module) -> nn.Module | None:
        """The indexer of a DSA layer's attention (None where the layer is shared natively)."""
        owner, name = self._indexer_slot(attn)
        return getattr(owner, name)

    def set_indexer(self, attn: nn.Module, indexer: nn.Module | None) -> None:
        """Put `indexer` in the attention's indexer slot (None: the layer is shared, for a family that `shares_topk`).
        An attention with transformers' `skip_topk` flag (GlmMoeDsa, HY-V4: what their __init__ derives from
        `config.indexer_types`) gets it set to match."""
        owner, name = self._indexer_slot(attn)
        setattr(owner, name, indexer)
        if hasattr(attn, "skip_topk"):
            attn.skip_topk = indexer is None

    @staticmethod
    def key_ratio(indexer: nn.Module) -> int:
        """Tokens per key the indexer selects among (1: tokens; row t sees key s iff s < (t + 1) // ratio)."""
        return 1

    # ---- the forward -------------------------------------------------------------------------------
    def forward(self, model: nn.Module, input_ids: torch.Tensor, capture: Capture,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The final normed hidden states [B, T, hidden] of the backbone under `capture`."""
        hidden, layer_inputs = self.embed(model, input_ids, position_ids)
        for i in range(len(self.decoder_layers(model))):
            hidden = self.layer(model, i, hidden, layer_inputs, capture)
        return self.final_norm(model, hidden)

    def embed(self, model: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None):
        """(hidden before the first decoder layer, what every layer reads besides it)."""
        raise NotImplementedError

    def layer(self, model: nn.Module, i: int, hidden: torch.Tensor, layer_inputs, capture: Capture):
        """Decoder layer i; the capture decides how its DSA attention (if it is a DSA layer) attends."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states [B, T, hidden] from the last decoder layer's output."""
        return model.model.norm(hidden)

    def _sinks(self, attn: nn.Module, i: int) -> torch.Tensor:
        """attn.sinks [H]. Under ZeRO-3 a direct read inside the engine's forward is gathered by DeepSpeed; outside
        it (evaluation, search) the parameter is still partitioned, so gather a copy (H values)."""
        sinks = getattr(attn, "sinks", None)
        if sinks is None:
            raise NotDSAModelError(f"layer {i}'s attention has no `sinks` but family {self.model_type!r} has "
                                   "attention sinks: the model does not match its model_type")
        if hasattr(sinks, "ds_status"):
            import deepspeed
            from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
            if sinks.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                with deepspeed.zero.GatheredParameters([sinks]):
                    return sinks.detach().clone()
        return sinks
