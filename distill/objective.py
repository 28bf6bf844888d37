"""The distillation objective: each F layer's indexer against the centroid of the layers it serves.

One no-grad forward of the frozen backbone streams group by group (docs/DESIGN.md section 3): a group's loss is
computed as soon as its last layer has run, and what the group recorded is freed, so memory holds one group.
- Dense stage: the served layers' q ([G, B, T, H, Dq]) and k ([G, B, S, H or 1, Dq]: S keys, tokens or
  compressed entries) and each head's LSE, which the backbone's
  fused attention returns, go to the fused centroid KL (no per-head LSE pass).
- Sparse stage: every served layer's sparse attention adds its head-averaged probabilities over the row's
  top-k keys into the group's [B, T, K] fp32 target (the cross-entropy is linear in the target); no q or k
  is kept, and the loss is the gathered sparse centroid KL, O(T * k).
The losses keep the autograd graph of the F layers' indexer projections; the fused kernels compute the
indexer-input gradients in their forward, so backward only scales them and runs the projections' backward.
"""
from __future__ import annotations

import contextlib
import weakref
import functools
from typing import NamedTuple

import torch
from torch import nn

from distill.adapters import MlaForms, family_of
from distill.capture import Capture, Projections
from distill.model import apply_pattern
from distill.pattern import Pattern
from kernels import centroid_kl_fn, shared_keys_apart, sparse_centroid_kl_fn

TARGETS = ("centroid", "own")
REDUCTIONS = ("sum", "mean")


class DistillOutput(NamedTuple):
    """A named tuple, so that DeepSpeed's ZeRO-3 hooks see the tensors inside."""

    loss: torch.Tensor                       # scalar: the training loss (sum or mean of group losses)
    group_losses: dict[int, torch.Tensor]    # F layer -> KL(target || indexer), mean over B*T rows
    recall: dict[int, float] | None = None   # F layer -> share of the dense centroid mass in its top-k


class Distiller(nn.Module):
    """Frozen backbone + trainable F-layer indexers; `forward(input_ids, sparse)` gives the distillation loss.

    target 'centroid' trains each F layer against the mean attention of its whole group (the method);
    'own' against its own layer only (the single-layer baseline). offload_saved: keep what backward needs of
    each group (the indexer projections' inputs, the input gradients the fused losses computed in their
    forward: [B, T, HI, D] per F layer) in pinned CPU memory until backward, so GPU memory does not grow with
    the number of F layers ('auto': on CUDA).
    """

    def __init__(self, backbone: nn.Module, pattern: Pattern, *, kernel: str = "auto",
                 target: str = "centroid", reduction: str = "sum", offload_saved: bool | str = "auto"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"distill.target {target!r} is not one of {TARGETS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"distill.loss_reduction {reduction!r} is not one of {REDUCTIONS}")
        self.family = family_of(backbone)
        self.backbone = backbone
        self.pattern = pattern
        self.indexers = apply_pattern(backbone, pattern)
        self.kernel = kernel
        self.target = target
        self.reduction = reduction
        self.offload_saved = offload_saved
        self.served = {f: (members if target == "centroid" else [f]) for f, members in pattern.groups().items()}

    def forward(self, input_ids: torch.Tensor, sparse: bool = False, with_recall: bool = False, *,
                cu_seqlens: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> DistillOutput:
        """input_ids [B, T] (cu_seqlens: packed documents; position_ids [B, T] or None): one streamed forward."""
        device = input_ids.device
        offload = self.offload_saved if isinstance(self.offload_saved, bool) else device.type == "cuda"
        run = GroupLosses(self, sparse=sparse, with_recall=with_recall, grad=torch.is_grad_enabled(), device=device,
                          cu_seqlens=cu_seqlens, offload=offload)
        with torch.no_grad():
            self.family.forward(self.backbone, input_ids, run, position_ids)
        total = torch.stack(list(run.losses.values())).sum()
        if self.reduction == "mean":
            total = total / len(run.losses)
        recall = {f: (mass / input_ids.numel()).item() for f, mass in run.recall.items()} if with_recall else None
        return DistillOutput(total, run.losses, recall)

    def indexer_state_dict(self) -> dict[str, torch.Tensor]:
        """The F-layer indexer weights under their backbone state-dict names."""
        return {name: p.detach() for name, p in self.backbone.named_parameters() if p.requires_grad}


class PinnedOffload(torch.autograd.graph.saved_tensors_hooks):
    """Autograd's saved CUDA tensors go to pinned host memory until backward, copied on a side stream, so the
    copy overlaps the forward's next kernels instead of stalling the host (torch's save_on_cpu copies
    synchronously). A saved tensor's GPU memory is not reused before its copy is done (record_stream); backward
    waits for the copy, then copies it back on the stream it runs on. Tensors not on CUDA (or no stream: a CPU
    run) are kept as they are.

    One tensor saved twice while the context is open (the hidden states x, which both wk and weights_proj keep, one
    of them through a reshaped view) is copied once: a saved tensor that spans the whole of a contiguous tensor
    `base` (itself or a view of all of it) shares the host copy of `base`, while `base` lives and is unchanged."""

    def __init__(self, stream: torch.cuda.Stream | None):
        copies: dict[int, tuple] = {}  # id(base) -> (weakref to base, its version, (device, host, copied))

        def pack(tensor: torch.Tensor):
            if stream is None or tensor.device.type != "cuda":
                return tensor
            base = tensor if tensor._base is None else tensor._base
            whole = (base.is_contiguous() and tensor.numel() == base.numel()
                     and tensor.storage_offset() == base.storage_offset())
            if not whole:
                return _copy_to_host(tensor, stream), None
            known = copies.get(id(base))
            if known is None or known[0]() is not base or known[1] != base._version:
                known = (weakref.ref(base), base._version, _copy_to_host(base, stream))
                copies[id(base)] = known
            return known[2], (tensor.shape, tensor.stride())

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            (device, host, copied), view = packed
            torch.cuda.current_stream(device).wait_event(copied)
            back = host.to(device, non_blocking=True)
            return back if view is None else back.as_strided(*view)

        super().__init__(pack, unpack)


def _copy_to_host(tensor: torch.Tensor, stream: torch.cuda.Stream) -> tuple:
    """(device, pinned host copy, the event its copy on `stream` records) of a CUDA tensor."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
        copied = stream.record_event()
    tensor.record_stream(stream)
    return tensor.device, host, copied


class GroupLosses(Capture):
    """The objective's capture: records each group while it runs and turns it into the group's loss."""

    def __init__(self, distiller: Distiller, *, sparse: bool, with_recall: bool, grad: bool, device: torch.device,
                 cu_seqlens: torch.Tensor | None, offload: bool):
        super().__init__(distiller.family, distiller.pattern, sparse=sparse, device=device, kernel=distiller.kernel,
                         grad=grad, select_dense=with_recall, cu_seqlens=cu_seqlens)
        self.served = distiller.served
        self.feeds = {m: f for f, members in self.served.items() for m in members}  # layer -> the target it feeds
        self.with_recall = with_recall
        self.offload = offload and grad
        # the copies to the host run on it, beside the forward (CUDA only)
        self.offload_stream = torch.cuda.Stream(device) if self.offload and device.type == "cuda" else None
        self.centroid_kl = centroid_kl_fn(distiller.kernel, device)
        # (per-head, shared key widths) -> whether centroid_kl takes the shared columns once (main_k_rope)
        self.keys_apart = functools.partial(shared_keys_apart, distiller.kernel, device)
        self.sparse_centroid_kl = sparse_centroid_kl_fn(distiller.kernel, device)
        self.projections: dict[int, Projections] = {}
        # F layer -> main_q [G, B, T, H, Dq], main_k [G, B, T, H, Dq - Dr] and main_k_rope [G, B, T, 1, Dr] (the key
        # columns all heads share, where centroid_kl takes them apart; else main_k [.., Dq] and None), main_lse
        # [G, B, H, T]
        self.dense: dict[int, dict] = {}
        self.targets: dict[int, torch.Tensor] = {}  # F layer -> [B, T, K] fp32 sparse centroid
        self.losses: dict[int, torch.Tensor] = {}
        self.recall: dict[int, torch.Tensor] = {}   # F layer -> sum over rows of the centroid mass in its top-k

    def wants_projections(self, layer: int) -> bool:
        return True

    def projections_context(self):
        """Where the projections' autograd keeps what their backward needs: pinned CPU memory when offloading."""
        if not self.offload:
            return contextlib.nullcontext()
        return PinnedOffload(self.offload_stream)

    def indexed(self, layer: int, projections: Projections, topk: torch.Tensor | None) -> None:
        self.projections[layer] = projections
        if self.sparse:
            self.targets[layer] = torch.zeros(topk.shape, dtype=torch.float32, device=topk.device)

    def sparse_target(self, layer: int):
        f = self.feeds.get(layer)
        return None if f is None else (self.targets[f], 1.0 / len(self.served[f]))

    def dense_attended(self, layer, forms: MlaForms, q, k, lse, topk) -> None:
        f = self.feeds.get(layer)
        if f is None:
            return
        members = self.served[f]
        g = members.index(layer)
        rope = forms.shared_keys
        if rope is not None and not self.keys_apart(k.shape[-1] - rope.shape[-1], rope.shape[-1]):
            rope = None  # centroid_kl would join them back into every head's key, a second copy: keep k whole
        if rope is not None:  # one copy of the columns all heads share
            k = k[..., :k.shape[-1] - rope.shape[-1]]
        if g == 0:
            G = len(members)
            self.dense[f] = {"main_q": q.new_empty(G, *q.shape), "main_k": k.new_empty(G, *k.shape),
                             "main_k_rope": None if rope is None else rope.new_empty(G, *rope.shape),
                             "main_lse": lse.new_empty(G, *lse.shape), "scale": forms.scale,
                             "ratio": forms.key_ratio}
        group = self.dense[f]
        if forms.scale != group["scale"]:
            raise ValueError(f"layers {members} use different attention scales ({group['scale']}, {forms.scale})")
        group["main_q"][g].copy_(q)
        group["main_k"][g].copy_(k)
        if rope is not None:
            group["main_k_rope"][g].copy_(rope)
        group["main_lse"][g].copy_(lse)
        if self.with_recall:
            self._add_recall(f, self.topk_mass(forms, self.topk[f], dense_lse=lse))

    def sparse_attended(self, layer, forms: MlaForms, topk, lse) -> None:
        f = self.feeds.get(layer)
        if f is not None and self.with_recall:
            self._add_recall(f, self.topk_mass(forms, topk, topk_lse=lse))

    def _add_recall(self, f: int, mass: torch.Tensor) -> None:
        share = mass.double().sum() / len(self.served[f])
        self.recall[f] = self.recall.get(f, 0.0) + share

    def group_done(self, f: int) -> None:
        projections = self.projections.pop(f)
        with torch.enable_grad(), self.projections_context():  # the kernels' saved input gradients too
            if self.sparse:
                self.losses[f] = self.sparse_centroid_kl(*projections, self.targets.pop(f), self.topk[f],
                                                         cu_seqlens=self.cu_seqlens)
            else:
                group = self.dense.pop(f)
                self.losses[f] = self.centroid_kl(*projections, group["main_q"], group["main_k"], group["scale"],
                                                  None, cu_seqlens=self.cu_seqlens, main_lse=group["main_lse"],
                                                  ratio=group["ratio"], main_k_rope=group["main_k_rope"])
