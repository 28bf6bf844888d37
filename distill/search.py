"""The paper's training-free greedy layer search (docs/DESIGN.md section 4), and the baselines it is compared with.

Greedy: start from all-F; at each step turn into S the F layer (never layer 0) whose conversion raises
the calibration LM loss least; record pattern, retention and loss at every step down to the target
retention. Prefix caching: a candidate that converts layer c computes the same hidden states and top-k
as the current pattern before c, so each batch's hidden state at every layer input (and the top-k of
every F layer) is cached for the current pattern and only layers c.. are recomputed.

Baselines: uniform patterns, and a similarity pick (merge the most overlapping adjacent layers first,
by the all-F top-k overlap), which the paper reports does not predict loss.

The command-line app is `python -m train.search` (conf/search.yaml).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from distill.adapters import family_of
from distill.capture import KeepTopk
from distill.evaluate import batch_parts, check_batches, lm_nll_sum, shifted_tokens, topk_overlap
from distill.pattern import Pattern

log = logging.getLogger(__name__)

class SearchError(ValueError):
    """A search target that no pattern of the model can reach."""


@dataclass
class _BatchInputs:
    ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    embeds: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]


@dataclass
class _PrefixCache:
    """One batch under one pattern: hidden[i] = input of decoder layer i; topk[f] = top-k of F layer f (a pattern
    position)."""
    hidden: list[torch.Tensor] = field(default_factory=list)
    topk: dict[int, torch.Tensor] = field(default_factory=dict)


class LayerwiseRunner:
    """Runs the frozen backbone one decoder layer at a time over fixed batches, counting layer forwards.

    The family forward of `distill.adapters` (embeddings, rotary embeddings, decoder layers, final norm), then
    the LM head and transformers' shifted-label loss in chunks of positions; a pattern's S layers reuse their
    owner's top-k through the capture, for every family of distill.adapters alike. No causal mask is built.
    """

    def __init__(self, model: nn.Module, batches):
        self.model = model
        self.family = family_of(model)
        self.num_layers = len(self.family.dsa_attentions(model))  # pattern positions (DSA layers)
        # pattern position -> its decoder layer; the layers between DSA layers (DeepSeek-V4's HCA and sliding-window
        # ones) depend on the pattern only through their input, so a cache per decoder layer resumes at any DSA layer
        self.decoder_of = self.family.dsa_layer_ids(model.config)
        self.num_decoder_layers = len(self.family.decoder_layers(model))
        self.layer_forwards = 0
        self.device = next(model.parameters()).device
        self.inputs = [self._prepare(batch) for batch in check_batches(batches)]

    @torch.no_grad()
    def _prepare(self, batch) -> _BatchInputs:
        ids, cu_seqlens, position_ids = (None if t is None else t.to(self.device) for t in batch_parts(batch))
        embeds, position_embeddings = self.family.embed(self.model, ids, position_ids)
        return _BatchInputs(ids, cu_seqlens, embeds, position_embeddings)

    @torch.no_grad()
    def loss(self, pattern: Pattern, start: int = 0, prefix: list[_PrefixCache] | None = None,
             keep: bool = False) -> tuple[float, list[_PrefixCache] | None]:
        """Token-mean LM loss under `pattern`, computing DSA layers `start`.. (from `start`'s decoder layer) only; and
        the new caches if `keep`.

        start > 0 needs `prefix`: the caches of a pattern that agrees with `pattern` on DSA layers < start.
        """
        if start and prefix is None:
            raise ValueError("resuming at a layer > 0 needs the prefix cache of a pattern that agrees before it")
        nll, tokens, caches = 0.0, 0, []
        for b, inputs in enumerate(self.inputs):
            run = KeepTopk(self.family, pattern, sparse=True, device=self.device, cu_seqlens=inputs.cu_seqlens)
            first = self.decoder_of[start] if start else 0
            if start:
                hidden = prefix[b].hidden[first]
                owner = pattern.owner(start - 1)  # the latest F layer before `start`: its top-k is still current
                run.topk[owner] = prefix[b].topk[owner]
                cache = _PrefixCache(prefix[b].hidden[:first],
                                     {f: t for f, t in prefix[b].topk.items() if f < start and pattern.owner(f) == f})
            else:
                hidden, cache = inputs.embeds, _PrefixCache()
            for i in range(first, self.num_decoder_layers):
                if keep:
                    cache.hidden.append(hidden)
                self.layer_forwards += 1
                hidden = self.family.layer(self.model, i, hidden, inputs.position_embeddings, run)
            cache.topk.update(run.kept)
            nll += lm_nll_sum(self.model, self.family.final_norm(self.model, hidden), inputs.ids)
            tokens += shifted_tokens(inputs.ids)
            caches.append(cache)
        return nll / tokens, caches if keep else None


def _full_layers_target(num_layers: int, target_retention: float) -> int:
    """round(target * L) F layers, checked reachable: 1/L <= target <= 1."""
    if isinstance(target_retention, bool) or not isinstance(target_retention, (int, float)) \
            or not 1 / num_layers <= target_retention <= 1:
        raise SearchError(f"target retention {target_retention!r} cannot be reached with {num_layers} DSA layers: "
                          f"it must be in [1/{num_layers} = {1 / num_layers:.4g}, 1] (layer 0 always stays F)")
    return max(1, round(target_retention * num_layers))


def _shared(pattern: Pattern, layer: int) -> Pattern:
    return Pattern(pattern.letters[:layer] + "S" + pattern.letters[layer + 1:])


def _step(pattern: Pattern, loss: float, **extra) -> dict:
    return {"pattern": str(pattern), "retention": pattern.retention, "loss": loss, **extra}


def greedy_search(model: nn.Module, batches, target_retention: float, *, prefix_cache: bool = True) -> list[dict]:
    """The greedy pattern at every retention from 1 down to round(target * L) / L.

    Returns one dict per step (step 0 = all-F): pattern, retention, loss (token-mean calibration LM
    loss), layer_forwards (decoder-layer forwards run for this step, all batches) and seconds.
    Ties go to the lowest layer. `prefix_cache=False` reruns every candidate from layer 0 (same
    results, more layer forwards); the cache holds L hidden states [B, T, hidden] per batch.
    """
    runner = LayerwiseRunner(model, batches)
    target = _full_layers_target(runner.num_layers, target_retention)
    pattern = Pattern.all_full(runner.num_layers)
    start_time, start_count = time.perf_counter(), runner.layer_forwards
    loss, prefix = runner.loss(pattern, keep=prefix_cache)
    steps = [_step(pattern, loss, layer_forwards=runner.layer_forwards - start_count,
                   seconds=time.perf_counter() - start_time)]
    while len(pattern.full_layers) > target:
        start_time, start_count = time.perf_counter(), runner.layer_forwards
        best = None
        for layer in pattern.full_layers[1:]:
            candidate = _shared(pattern, layer)
            loss = (runner.loss(candidate, start=layer, prefix=prefix)[0] if prefix_cache
                    else runner.loss(candidate)[0])
            if best is None or loss < best[0]:
                best = (loss, candidate, layer)
        loss, pattern, layer = best
        if prefix_cache:
            prefix = runner.loss(pattern, start=layer, prefix=prefix, keep=True)[1]
        steps.append(_step(pattern, loss, layer_forwards=runner.layer_forwards - start_count,
                           seconds=time.perf_counter() - start_time))
        log.info("greedy: %s (retention %.3f) loss %.5f", pattern, pattern.retention, loss)
    return steps


def calibration_loss(model: nn.Module, batches, pattern: Pattern | str) -> float:
    """Token-mean LM loss under `pattern` by the search's layer-by-layer forward."""
    runner = LayerwiseRunner(model, batches)
    pattern = pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
    return runner.loss(pattern.check_layers(runner.num_layers))[0]


def uniform_patterns(num_layers: int) -> list[Pattern]:
    """One uniform pattern (every n-th layer F) per number of F layers, the smallest n; highest retention first."""
    patterns: dict[int, Pattern] = {}
    for freq in range(1, num_layers + 1):
        pattern = Pattern.uniform(num_layers, freq)
        patterns.setdefault(len(pattern.full_layers), pattern)
    return list(patterns.values())


def uniform_baseline(model: nn.Module, batches, target_retention: float) -> list[dict]:
    """Loss of every uniform pattern with at least the target's round(target * L) F layers."""
    runner = LayerwiseRunner(model, batches)
    target = _full_layers_target(runner.num_layers, target_retention)
    return [_step(p, runner.loss(p)[0]) for p in uniform_patterns(runner.num_layers) if len(p.full_layers) >= target]


def similarity_search(model: nn.Module, batches, target_retention: float,
                      overlap: torch.Tensor | None = None) -> list[dict]:
    """Merge the most overlapping adjacent layers first, down to the target; the loss of every step.

    At each step the F layer f > 0 whose top-k overlaps most with the top-k it would reuse (that of
    owner(f - 1)) becomes S; `overlap` is the all-F `topk_overlap` matrix (computed if not given).
    Steps are dicts like `greedy_search`'s, with the merged pair's overlap.
    """
    runner = LayerwiseRunner(model, batches)
    target = _full_layers_target(runner.num_layers, target_retention)
    if overlap is None:
        overlap = topk_overlap(model, batches)
    if tuple(overlap.shape) != (runner.num_layers, runner.num_layers):
        raise ValueError(f"overlap matrix {tuple(overlap.shape)} does not fit {runner.num_layers} DSA layers")
    pattern = Pattern.all_full(runner.num_layers)
    steps = [_step(pattern, runner.loss(pattern)[0])]
    while len(pattern.full_layers) > target:
        layer = max(pattern.full_layers[1:], key=lambda f: (float(overlap[pattern.owner(f - 1), f]), -f))
        merged = float(overlap[pattern.owner(layer - 1), layer])
        pattern = _shared(pattern, layer)
        steps.append(_step(pattern, runner.loss(pattern)[0], overlap=merged))
    return steps


def _cost(steps: list[dict]) -> dict:
    return {"layer_forwards": sum(s["layer_forwards"] for s in steps), "seconds": sum(s["seconds"] for s in steps)}


def search(model: nn.Module, batches, target_retention: float, *, compare_naive: bool = False) -> dict:
    """Greedy search (prefix-cached) and both baselines: {"greedy", "uniform", "similarity", "cost"}.

    compare_naive: also run the search without prefix caching, and report both costs and whether both
    searches gave the same patterns and losses.
    """
    batches = check_batches(batches)
    greedy = greedy_search(model, batches, target_retention, prefix_cache=True)
    cost = {"prefix_cache": _cost(greedy)}
    if compare_naive:
        naive = greedy_search(model, batches, target_retention, prefix_cache=False)
        cost["naive"] = _cost(naive)
        cost["layer_forward_ratio"] = cost["naive"]["layer_forwards"] / cost["prefix_cache"]["layer_forwards"]
        cost["time_ratio"] = cost["naive"]["seconds"] / cost["prefix_cache"]["seconds"]
        cost["identical"] = [(s["pattern"], s["loss"]) for s in naive] == [(s["pattern"], s["loss"]) for s in greedy]
    print(f"greedy search cost: {json.dumps(cost)}")
    return {"greedy": [{k: s[k] for k in ("pattern", "retention", "loss")} for s in greedy],
            "uniform": uniform_baseline(model, batches, target_retention),
            "similarity": similarity_search(model, batches, target_retention),
            "cost": cost}


def plot_search(result: dict, path: str) -> str:
    """PNG of calibration loss against retention for the greedy, uniform and similarity patterns; returns path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, marker in (("greedy", "o"), ("uniform", "s"), ("similarity", "^")):
        steps = sorted(result[name], key=lambda s: s["retention"])
        ax.plot([s["retention"] for s in steps], [s["loss"] for s in steps], marker=marker, label=name)
    ax.invert_xaxis()
    ax.set_xlabel("retention (#F / #layers)")
    ax.set_ylabel("calibration LM loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
