"""A capture: the object one backbone forward passes through, layer by layer (docs/DESIGN.md section 3).

The family forward (`distill.adapters`) hands every DSA layer to the capture twice: `select` (the layer's
keys: an F layer runs its indexer's projections and the fused top-k, an S layer takes its owner's top-k)
and `attend` (the layer's attention through its forms object: dense over every causal key with each head's
LSE, or sparse over the row's top-k keys, e.g. in MLA's absorbed form). A layer index here is the DSA layer's
pattern position (`DsaFamily.dsa_layer_ids` maps it to its decoder layer); keys are tokens, or compressed
entries (DeepSeek-V4: `forms.key_ratio` tokens per key). `layer_done` follows each layer; once the last layer of a group
has run, `group_done(f)` lets a subclass consume the group (the objective computes its loss there and
frees what the group recorded) and the group's top-k is dropped. Memory therefore holds one group; `KeepTopk`
keeps every F layer's top-k past its group, for a caller that reads them after the forward.

No [B, 1, T, T] mask, no [B, T, HI, T] indexer scores, no T x T tensor: the attention is fused (dense) or
gathered (sparse, O(T * k)), and top-k comes from the fused top-k kernel.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from distill.adapters import DsaFamily, MlaForms
from distill.model import full_layer_indexer
from distill.pattern import Pattern
from kernels import indexer_topk_fn, sparse_attention_fn
from kernels.dense_attention import document_runs

Projections = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # index_q [B,T,HI,D], index_k [B,S,D], index_w [B,T,HI]


class Capture:
    """How one forward of the backbone attends, and what it hands on; the base class only attends.

    pattern: F/S letters (None: every layer attends densely and no indexer runs, the dense anchor).
    sparse: each layer attends only to its owner's top-k (DSA inference); else to all causal keys.
    kernel: 'auto' | 'triton' | 'reference' (kernels.KINDS). index_topk: overrides the indexers' k.
    grad: the F layers' indexer projections keep their autograd graph (training).
    select_dense: F layers pick top-k in the dense stage too (recall, overlap); sparse always does.
    cu_seqlens: document offsets over the flattened B*T tokens (packed documents), or None.
    """

    def __init__(self, family: DsaFamily, pattern: Pattern | None, *, sparse: bool, device: torch.device,
                 kernel: str = "auto", index_topk: int | None = None, grad: bool = False,
                 select_dense: bool = False, cu_seqlens: torch.Tensor | None = None):
        if sparse and pattern is None:
            raise ValueError("a sparse forward needs a pattern (which layers select top-k)")
        self.family, self.pattern, self.sparse = family, pattern, sparse
        self.index_topk, self.grad, self.select_dense, self.cu_seqlens = index_topk, grad, select_dense, cu_seqlens
        self.topk_fn = indexer_topk_fn(kernel, device)
        self.sparse_attention = sparse_attention_fn(kernel, device)
        self.topk: dict[int, torch.Tensor] = {}   # F layer -> [B, T, K] int32 (-1 = no key), while its group runs
        self._runs: list[tuple[int, int, int]] | None = None  # the documents' runs of tokens, once per forward
        self._last = {} if pattern is None else {members[-1]: f for f, members in pattern.groups().items()}

    # ---- called by the family forward ---------------------------------------------------------------
    def select(self, layer: int, indexer: nn.Module | None, inputs) -> torch.Tensor | None:
        """The top-k [B, T, K] layer `layer` attends to (None: dense, no selection needed)."""
        if self.pattern is None:
            return None
        owner = self.pattern.owner(layer)
        if owner != layer:
            return self.topk.get(owner)
        if not (self.sparse or self.select_dense or self.wants_projections(layer)):
            return None
        indexer = full_layer_indexer(indexer, layer, self.pattern)
        with torch.set_grad_enabled(self.grad), self.projections_context():
            q, k, w = self.family.indexer_projections(indexer, inputs)
            projections = (q, k, self.family.kernel_weights(indexer, w))
        topk = None
        if self.sparse or self.select_dense:
            topk = self.topk_fn(*(t.detach() for t in projections), self.index_topk or indexer.index_topk,
                                cu_seqlens=self.cu_seqlens, ratio=self.family.key_ratio(indexer))
            self.topk[layer] = topk
        self.indexed(layer, projections, topk)
        return topk

    def attend(self, layer: int, forms: MlaForms, topk: torch.Tensor | None) -> torch.Tensor:
        """Layer `layer`'s attention output [B, T, H, Dv] (with the family's sinks, if any). The LSE handed to the
        hooks below is over the keys only, without a sink (the distillation target normalises over keys)."""
        if self.sparse:
            target = self.sparse_target(layer)
            buffer, weight = target if target is not None else (None, 1.0)
            out, lse = forms.sparse(self.sparse_attention, topk, prob_out=buffer, prob_weight=weight,
                                    cu_seqlens=self.cu_seqlens)
            self.sparse_attended(layer, forms, topk, lse)
            return out
        out, q, k, lse = forms.dense(cu_seqlens=self.cu_seqlens, runs=self.document_runs(forms))
        self.dense_attended(layer, forms, q, k, lse, topk)
        return out

    def layer_done(self, layer: int) -> None:
        f = self._last.get(layer)
        if f is not None:
            self.group_done(f)
            self.topk.pop(f, None)

    # ---- what a subclass consumes -------------------------------------------------------------------
    def wants_projections(self, layer: int) -> bool:
        """Whether F layer `layer` runs its indexer's projections in the dense stage (a loss needs them)."""
        return False

    def projections_context(self):
        """The context the F layers' indexer projections run in (e.g. autograd's saved tensors on the CPU)."""
        return contextlib.nullcontext()

    def indexed(self, layer: int, projections: Projections, topk: torch.Tensor | None) -> None:
        """F layer `layer` ran its indexer: its projections and top-k (None when it selected nothing)."""

    def sparse_target(self, layer: int) -> tuple[torch.Tensor, float] | None:
        """(an fp32 [B, T, K] buffer, weight): the sparse attention of `layer` adds weight x its head-averaged
        probabilities over the row's top-k keys into it; None: nothing to accumulate."""
        return None

    def dense_attended(self, layer: int, forms: MlaForms, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor,
                       topk: torch.Tensor | None) -> None:
        """Layer `layer` attended densely: q [B, T, H, Dq], k [B, S, H or 1, Dq] (post-RoPE), lse [B, H, T] fp32
        over the keys the indexer chooses among (S = T // forms.key_ratio)."""

    def sparse_attended(self, layer: int, forms: MlaForms, topk: torch.Tensor, lse: torch.Tensor) -> None:
        """Layer `layer` attended to `topk` [B, T, K]: lse [B, H, T] fp32 over those keys."""

    def group_done(self, f: int) -> None:
        """Every layer of F layer f's group has run."""

    # ---- helpers for subclasses ---------------------------------------------------------------------
    def document_runs(self, forms) -> list[tuple[int, int, int]] | None:
        """The (row, start, end) runs of this forward's documents (kernels.dense_attention.document_runs), found
        at the first layer that needs them: one host sync per forward, not one per layer."""
        if self.cu_seqlens is not None and self._runs is None:
            self._runs = document_runs(self.cu_seqlens, *forms.tokens)
        return self._runs

    def topk_mass(self, forms: MlaForms, topk: torch.Tensor, *, dense_lse: torch.Tensor | None = None,
                  topk_lse: torch.Tensor | None = None) -> torch.Tensor:
        """[B, T] fp32: the share of the layer's dense head-averaged attention that falls on `topk`:
        mean_h exp(lse_h over the top-k keys - lse_h over all causal keys); computes the LSE not given."""
        if dense_lse is None:
            dense_lse = forms.dense(cu_seqlens=self.cu_seqlens, runs=self.document_runs(forms))[3]
        if topk_lse is None:
            topk_lse = forms.sparse(self.sparse_attention, topk, cu_seqlens=self.cu_seqlens)[1]
        return torch.exp(topk_lse - dense_lse).nan_to_num(0.0).mean(dim=1)


class KeepTopk(Capture):
    """A capture that keeps every F layer's top-k past its group: `kept`, F layer -> [B, T, K] int32 (-1 = no key),
    for the caller to read after the forward (the search's prefix cache, the layers' top-k overlap)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept: dict[int, torch.Tensor] = {}

    def indexed(self, layer, projections, topk):
        self.kept[layer] = topk
