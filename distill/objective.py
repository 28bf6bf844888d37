"""The distillation objective: each F layer's indexer against the centroid of the layers it serves."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from distill.capture import Captured, capture
from distill.model import apply_pattern
from distill.pattern import Pattern
from distill.targets import topk_recall
from kernels import centroid_kl_fn, indexer_topk_fn

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
    'own' against its own layer only (the single-layer baseline).
    """

    def __init__(self, backbone: nn.Module, pattern: Pattern, *, kernel: str = "auto",
                 target: str = "centroid", reduction: str = "sum"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"distill.target {target!r} is not one of {TARGETS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"distill.loss_reduction {reduction!r} is not one of {REDUCTIONS}")
        self.backbone = backbone
        self.pattern = pattern
        self.indexers = apply_pattern(backbone, pattern)
        self.kernel = kernel
        self.target = target
        self.reduction = reduction
        self.served = {f: (members if target == "centroid" else [f]) for f, members in pattern.groups().items()}

    def forward(self, input_ids: torch.Tensor, sparse: bool = False, with_recall: bool = False) -> DistillOutput:
        """input_ids [B, T]: one backbone forward, then one loss per group (captures freed group by group)."""
        centroid_kl = centroid_kl_fn(self.kernel, input_ids.device)
        topk_fn = indexer_topk_fn(self.kernel, input_ids.device)
        grad = torch.is_grad_enabled()
        with capture(self.backbone, sparse, list(self.indexers), topk_fn, grad) as record, torch.no_grad():
            self.backbone.model(input_ids=input_ids)  # F layers' projections recorded (with autograd when grad)
        losses, recall = {}, {}
        for f, members in self.served.items():
            main_q, main_k, scale = self._group_capture(record, members)
            topk = record.topk[f] if sparse else None
            if with_recall:
                recall[f] = topk_recall(main_q, main_k, scale, record.topk[f]).item()
            losses[f] = centroid_kl(*record.projections.pop(f), main_q, main_k, scale, topk)
            del main_q, main_k
        total = torch.stack(list(losses.values())).sum()
        if self.reduction == "mean":
            total = total / len(losses)
        return DistillOutput(total, losses, recall if with_recall else None)

    @staticmethod
    def _group_capture(record: Captured, members: list[int]):
        """Stack the served layers' q and k into [G, B, T, H, Dq]; drop them from the record."""
        scales = {record.scale[m] for m in members}
        if len(scales) != 1:
            raise ValueError(f"layers {members} use different attention scales {sorted(scales)}")
        main_q = torch.stack([record.main_q.pop(m) for m in members])
        main_k = torch.stack([record.main_k.pop(m) for m in members])
        return main_q, main_k, scales.pop()

    def indexer_state_dict(self) -> dict[str, torch.Tensor]:
        """The F-layer indexer weights under their backbone state-dict names."""
        return {name: p.detach() for name, p in self.backbone.named_parameters() if p.requires_grad}
