"""What a pattern costs in quality: held-out LM loss with real DSA sparse attention, top-k overlap, top-k recall.

Under a pattern every layer attends only to its top-k keys and S layers reuse their owner's top-k,
exactly as DSA inference does (the family forward of `distill.adapters`: fused top-k, sparse attention over
the gathered keys, no T x T tensor). The dense mode (pattern None) attends to all causal keys: the "dense
attention" anchor.

The command-line app is `python -m train.evaluate` (conf/evaluate.yaml).
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from distill.adapters import family_of
from distill.capture import Capture, KeepTopk
from distill.model import apply_pattern
from distill.pattern import Pattern

CHUNK_ELEMENTS = 64 << 20  # bound on the [B, rows, vocab] logits (or [L, B, rows, T] overlap) a chunk holds


class CalibrationError(ValueError):
    """An empty or malformed set of evaluation / calibration batches."""


def batch_parts(batch) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(input_ids [B, T], cu_seqlens or None, position_ids [B, T] or None) of a batch: a tensor of token ids,
    or an object with those attributes (train.data.Batch: packed rows and their documents)."""
    if isinstance(batch, torch.Tensor):
        return batch, None, None
    return (getattr(batch, "input_ids", None), getattr(batch, "cu_seqlens", None),
            getattr(batch, "position_ids", None))


def check_batches(batches) -> list:
    """The batches, checked: token ids [B, T] with T >= 2 (a next-token loss needs two tokens), as tensors or
    as batches with documents (see `batch_parts`)."""
    batches = list(batches)
    if not batches:
        raise CalibrationError("the evaluation/calibration set is empty: no batches of token ids to compute a loss on")
    for i, batch in enumerate(batches):
        ids = batch_parts(batch)[0]
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point
                or ids.dtype == torch.bool):
            raise CalibrationError(f"batch {i} must be an integer tensor of token ids [B, T], got "
                                   f"{type(ids).__name__} {getattr(ids, 'shape', '')} {getattr(ids, 'dtype', '')}")
        if ids.shape[0] < 1 or ids.shape[1] < 2:
            raise CalibrationError(f"batch {i} has shape {tuple(ids.shape)}: need at least 1 row of 2 tokens")
    return batches


def as_pattern(pattern: Pattern | str, num_layers: int) -> Pattern:
    """A `Pattern` (or F/S string) checked against the model's number of DSA layers."""
    if isinstance(pattern, Pattern):
        return pattern.check_layers(num_layers)
    return Pattern.parse(pattern, num_layers)


def checked_mode(model: nn.Module, pattern: Pattern | str | None, topk: int | None) -> Pattern | None:
    """The pattern checked against the model's DSA layers (None: dense attention, where `topk` has no meaning), and
    `topk` (None: the model's index_topk) checked to be a positive number of keys."""
    if pattern is None and topk is not None:
        raise ValueError("topk has no meaning in dense mode (pattern None attends to all causal keys)")
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
        raise ValueError(f"topk must be a positive number of keys, got {topk!r}")
    return None if pattern is None else as_pattern(pattern, len(family_of(model).dsa_attentions(model)))


@contextlib.contextmanager
def pattern_applied(model: nn.Module, pattern: Pattern, topk: int | None = None):
    """`apply_pattern` for the duration of the block, yielding its `AppliedPattern` ({F layer: indexer}); the
    model is restored after.

    `topk` overrides the F indexers' index_topk (the number of keys every layer attends to).
    Restored: each layer's indexer (through the family adapter), the F indexers' forwards (the application's
    `TopkRelay`, if any, is closed) and index_topk, every parameter's requires_grad, config.indexer_types.
    """
    if topk is not None and (not isinstance(topk, int) or isinstance(topk, bool) or topk < 1):
        raise ValueError(f"topk must be a positive number of keys, got {topk!r}")
    family = family_of(model)
    attentions = family.dsa_attentions(model)
    pattern.check_layers(len(attentions))
    indexers = [family.indexer(attn) for attn in attentions]
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    sentinel = object()
    indexer_types = getattr(model.config, "indexer_types", sentinel)
    index_topk = [(ix, ix.index_topk) for ix in indexers if ix is not None and hasattr(ix, "index_topk")]
    applied = None
    try:
        applied = apply_pattern(model, pattern)
        if topk is not None:
            for indexer in applied.values():
                indexer.index_topk = topk
        yield applied
    finally:
        if applied is not None and applied.relay is not None:
            applied.relay.close()
        for attn, indexer in zip(attentions, indexers):
            family.set_indexer(attn, indexer)
        for indexer, value in index_topk:
            indexer.index_topk = value
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        if indexer_types is sentinel:
            del model.config.indexer_types
        else:
            model.config.indexer_types = indexer_types


def shifted_tokens(ids: torch.Tensor) -> int:
    """Number of next-token predictions in a batch [B, T]: B * (T - 1)."""
    return ids.shape[0] * (ids.shape[1] - 1)


def _row_chunk(per_row: int, seq_len: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, min(seq_len, CHUNK_ELEMENTS // max(1, per_row)))


def lm_nll_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk_size: int | None = None) -> float:
    """Sum over the B * (T - 1) next-token predictions of the cross-entropy (transformers' shifted-label loss,
    fp32 logits) from the final normed hidden states [B, T, hidden]; the LM head runs on chunks of positions,
    so memory is O(B * chunk * vocab), never B * T * vocab."""
    B, T = ids.shape
    chunk = _row_chunk(B * model.config.vocab_size, T - 1, chunk_size)
    total = torch.zeros((), dtype=torch.float64, device=ids.device)
    for start in range(0, T - 1, chunk):
        rows = slice(start, min(T - 1, start + chunk))
        logits = model.lm_head(hidden[:, rows].to(model.lm_head.weight.dtype)).float()  # HY-V4 keeps it fp32
        labels = ids[:, rows.start + 1: rows.stop + 1]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").double()
    return float(total)


class _Evaluation(Capture):
    """Evaluation's capture: per layer, the dense attention mass on the keys it attends to."""

    def __init__(self, family, pattern, *, sparse, device, index_topk=None, recall=True, cu_seqlens=None):
        super().__init__(family, pattern, sparse=sparse, device=device, index_topk=index_topk, cu_seqlens=cu_seqlens)
        self.recall = recall
        self.mass = torch.zeros(len(pattern) if pattern is not None else 0, dtype=torch.float64)

    def sparse_attended(self, layer, forms, topk, lse):
        if self.recall:
            self.mass[layer] += self.topk_mass(forms, topk, topk_lse=lse).double().sum().cpu()


@torch.no_grad()
def evaluate(model: nn.Module, pattern: Pattern | str | None, batches, *, topk: int | None = None,
             chunk_size: int | None = None, recall: bool = True) -> dict:
    """LM loss, perplexity and per-layer top-k recall of `model` under `pattern` on `batches`.

    pattern None: dense attention (all causal keys). Otherwise real DSA sparse attention: each layer
    attends to the top-k keys of its owner F layer; `topk` overrides index_topk.
    loss: token-mean next-token cross-entropy over all batches (transformers' shifted-label loss).
    topk_recall[l]: mean over rows of the share of layer l's dense head-averaged attention (over all
    causal keys) that falls on the top-k keys layer l uses. The caller's model is left unchanged.
    chunk_size: positions per LM-head chunk.
    """
    batches = check_batches(batches)
    family = family_of(model)
    num_layers = len(family.dsa_attentions(model))
    device = next(model.parameters()).device
    pattern = checked_mode(model, pattern, topk)
    nll, tokens, rows = 0.0, 0, 0
    mass = torch.zeros(num_layers, dtype=torch.float64)
    for batch in batches:
        ids, cu_seqlens, position_ids = (None if t is None else t.to(device) for t in batch_parts(batch))
        run = _Evaluation(family, pattern, sparse=pattern is not None, device=device, index_topk=topk, recall=recall,
                          cu_seqlens=cu_seqlens)
        hidden = family.forward(model, ids, run, position_ids)
        nll += lm_nll_sum(model, hidden, ids, chunk_size)
        tokens += shifted_tokens(ids)
        rows += ids.numel()
        mass += run.mass if pattern is not None else 0.0
    metrics = {"mode": "dense" if pattern is None else "sparse", "loss": nll / tokens,
               "perplexity": math.exp(nll / tokens), "tokens": tokens}
    if pattern is not None:
        metrics.update(pattern=str(pattern), retention=pattern.retention,
                       index_topk=topk or family.indexer(family.dsa_attentions(model)[0]).index_topk)
        if recall:
            values = (mass / rows).tolist()
            metrics.update(topk_recall=values, mean_topk_recall=sum(values) / len(values))
    return metrics


def _overlap_sum(topk: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Sum over rows of |A_a ∩ A_b| / n_valid for all layer pairs: topk [L, B, T, K] (-1 = no key) -> [L, L]."""
    L, B, T, _ = topk.shape
    valid = (topk[0] >= 0).sum(-1).clamp(min=1)  # every layer picks min(K, t + 1) causal keys in row t
    chunk = _row_chunk(L * B * T, T, chunk_size)
    total = torch.zeros(L, L, dtype=torch.float64, device=topk.device)
    for start in range(0, T, chunk):
        rows = slice(start, min(T, start + chunk))
        idx = topk[:, :, rows].long()
        member = torch.zeros(*idx.shape[:3], T + 1, device=topk.device)
        member.scatter_(-1, torch.where(idx < 0, T, idx), 1.0)  # -1 lands in the spare column T
        member = member[..., :T].permute(1, 2, 0, 3).reshape(-1, L, T)  # [B * rows, L, T]
        common = torch.bmm(member, member.transpose(1, 2))  # [B * rows, L, L]
        total += (common / valid[:, rows].reshape(-1, 1, 1)).sum(0).double()
    return total


@torch.no_grad()
def topk_overlap(model: nn.Module, batches, *, pattern: Pattern | str | None = None, topk: int | None = None,
                 chunk_size: int | None = None) -> torch.Tensor:
    """[L, L]: |A ∩ B| / k of the top-k sets the layers use, averaged over all rows.

    k is the number of valid keys of the row (min(index_topk, t + 1)). Real sparse forward under `pattern`
    (default all-F: every layer its own indexer's set; an S layer uses its owner's).
    """
    batches = check_batches(batches)
    family = family_of(model)
    num_layers = len(family.dsa_attentions(model))
    pattern = Pattern.all_full(num_layers) if pattern is None else as_pattern(pattern, num_layers)
    device = next(model.parameters()).device
    total = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    rows = 0
    for batch in batches:
        ids, cu_seqlens, position_ids = (None if t is None else t.to(device) for t in batch_parts(batch))
        run = KeepTopk(family, pattern, sparse=True, device=device, index_topk=topk, cu_seqlens=cu_seqlens)
        family.forward(model, ids, run, position_ids)
        used = torch.stack([run.kept[pattern.owner(layer)] for layer in range(num_layers)])
        total += _overlap_sum(used, chunk_size).cpu()
        rows += ids.numel()
    return (total / rows).float()


def plot_overlap(matrix: torch.Tensor, path: str, title: str = "top-k overlap |A∩B|/k") -> str:
    """Heatmap PNG of an [L, L] overlap matrix; returns `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(3 + 0.25 * L, 2.5 + 0.25 * L))
    image = ax.imshow(matrix.cpu().numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
