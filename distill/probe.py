"""Retrieval probe: can the model, under a pattern, find a value planted far back in a long code document?

A sample (`make_samples`) is exactly `length` tokens: [bos], a window of a held-out document, needles
`\\n{key} = "{value}"` planted before line starts of the window (keys distinct random identifiers, values random
strings of `digits` digits), then a query for one key (by default the needle's own start, `\\n{key} = "`) and,
teacher forced, the queried value's tokens.
The queried needle sits at relative depth `depth` of the window (0: its start, right after [bos]; 1: its end, just
before the query), at the line start nearest that point; the other needles (distractors) at random line starts.
A control sample per length asks for a key that was never planted: what guessing the digits gives.

`predict_values` runs one forward per batch of samples exactly as `distill.evaluate.evaluate` does: dense (pattern
None, all causal keys) or real DSA sparse attention under a pattern (each layer attends to its owner F layer's top-k,
S layers reuse it; `topk` overrides index_topk), and applies the LM head only at the positions that predict the
value's tokens. `retrieval` scores it per (length, depth): exact match (every value token is the argmax) and per-token
accuracy. Deterministic given the seed.

The command-line app is `python -m train.evaluate probe.enabled=true` (conf/evaluate.yaml).
"""
from __future__ import annotations

import itertools
import keyword
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill.adapters import family_of
from distill.capture import Capture
from distill.evaluate import checked_mode
from distill.pattern import Pattern

KEY_LETTERS = 6
NEEDLE_PREFIX = '\n{key} = "'  # + the value's tokens + NEEDLE_SUFFIX, planted before a line start of the window
NEEDLE_SUFFIX = '"'
QUERY = '\n{key} = "'  # + the value's tokens (teacher forcing), the end of the sample


@dataclass(frozen=True)
class ProbeSample:
    """One probe sample.

    input_ids: int64 [length]: [bos] (if the tokenizer has one), the document window with its needles, the query and
    the queried value's tokens, which fill input_ids[value_start:] (positions value_start - 1 .. length - 2 predict
    them). depth: the queried needle's requested relative depth; None for a control sample, whose key was never
    planted. needle_start: the index of the queried needle's first token (None for a control sample).
    document: the index in `documents` of the document the window comes from.
    """

    input_ids: torch.Tensor
    depth: float | None
    key: str
    value: str
    value_start: int
    needle_start: int | None
    document: int

    @property
    def length(self) -> int:
        return self.input_ids.shape[0]

    @property
    def value_ids(self) -> torch.Tensor:
        """int64 [value tokens]: the queried value's tokens, the last of the sample."""
        return self.input_ids[self.value_start:]


def make_samples(tokenizer, documents: Sequence[str], *, lengths: Sequence[int], depths: Sequence[float],
                 needles: int = 4, digits: int = 6, samples_per_cell: int = 16, seed: int = 0, query: str = QUERY,
                 control: bool = True) -> list[ProbeSample]:
    """Probe samples: for each length, `samples_per_cell` per depth, then (with `control`) as many control samples.

    tokenizer: a transformers tokenizer, or an object whose `encode(text)` gives ids without special tokens and
    `decode(ids)` the text (train.tokenizer.ByteTokenizer). documents: held-out texts (never training text); a
    sample's window is one document's tokens from a line start on, so a document shorter than the window is never
    used. needles: key-value lines per sample (the queried one and needles - 1 distractors; a control sample plants
    only the distractors). query: the text before the value's tokens at the end, `{key}` standing for the queried
    key (default: the needle's own `\\n{key} = "`, which a model answers by finding the needle; another form, e.g.
    `\\nprint({key})  # "`, asks for more than copying). Same arguments, same samples.
    """
    lengths, depths = _checked(lengths, depths, needles, digits, samples_per_cell)
    if "{key}" not in query:
        raise ValueError(f"probe query {query!r} does not name the key: write {{key}} where the queried key goes")
    documents = list(documents)
    if not documents:
        raise ValueError("the probe got no documents to plant needles in: pass held-out (validation) texts")
    encoded = [np.asarray(_encode(tokenizer, text), dtype=np.int64) for text in documents]
    vocabulary = np.unique(np.concatenate(encoded))
    line_start_ids = vocabulary[[tokenizer.decode([int(i)]).startswith("\n") for i in vocabulary]]
    line_starts = [np.flatnonzero(np.isin(doc, line_start_ids)) for doc in encoded]
    bos = [] if getattr(tokenizer, "bos_token_id", None) is None else [tokenizer.bos_token_id]
    rng = random.Random(seed)
    samples = []
    for length in lengths:
        for depth in [*depths, *([None] if control else [])]:
            for _ in range(samples_per_cell):
                keys = _keys(rng, needles)
                values = ["".join(rng.choices(string.digits, k=digits)) for _ in keys]
                lines = [[*_encode(tokenizer, NEEDLE_PREFIX.format(key=key)), *_encode(tokenizer, value),
                          *_encode(tokenizer, NEEDLE_SUFFIX)] for key, value in zip(keys, values)]
                if depth is None:
                    lines[0] = []  # a control sample: the queried key is never planted
                query_ids = _encode(tokenizer, query.replace("{key}", keys[0]))
                value_ids = _encode(tokenizer, values[0])
                window = length - len(bos) - sum(map(len, lines)) - len(query_ids) - len(value_ids)
                if window < 1:
                    raise ValueError(f"probe length {length} leaves no room for the document: bos, needles, query and "
                                     f"value take {length - window} tokens; use longer probe lengths or fewer "
                                     f"needles/digits")
                document = _document(rng, encoded, window, length)
                starts = line_starts[document]
                offset = rng.choice([0, *starts[starts + window <= len(encoded[document])].tolist()])
                tokens = encoded[document][offset:offset + window]
                # a needle goes before window token p, a line start: 0 (the window's start) .. window (its end)
                cuts = [0, *(p for p in np.flatnonzero(np.isin(tokens, line_start_ids)).tolist() if p > 0), window]
                queried = min(cuts, key=lambda p: abs(p - depth * window)) if depth is not None else -1
                others = [p for p in cuts if p != queried]
                ids, needle_start = _planted(bos, tokens, lines, [queried, *rng.choices(others, k=needles - 1)])
                samples.append(ProbeSample(torch.tensor([*ids, *query_ids, *value_ids], dtype=torch.int64), depth,
                                           keys[0], values[0], length - len(value_ids), needle_start, document))
    return samples


@torch.no_grad()
def predict_values(model: nn.Module, pattern: Pattern | str | None, samples: Sequence[ProbeSample], *,
                   topk: int | None = None, batch_size: int = 8) -> list[torch.Tensor]:
    """Per sample, the model's argmax at each of its value tokens: int64 [value tokens] on the CPU (teacher forced:
    position value_start - 1 + i predicts value token i).

    pattern None: dense attention (all causal keys). Otherwise real DSA sparse attention as in
    `distill.evaluate.evaluate`: each layer attends to the top-k keys of its owner F layer; `topk` overrides
    index_topk. One forward per batch of up to `batch_size` samples of one length ([B, length] token ids); the LM head
    runs on the [value tokens of the batch, hidden] states only. The model is left unchanged.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("the probe got no samples: make them with make_samples")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"probe batch_size must be a positive number of samples, got {batch_size!r}")
    family = family_of(model)
    pattern = checked_mode(model, pattern, topk)
    context = model.config.max_position_embeddings
    too_long = sorted({s.length for s in samples if s.length > context})
    if too_long:
        raise ValueError(f"probe lengths {too_long} are longer than the model's context (max_position_embeddings "
                         f"{context}): use probe lengths of at most {context} tokens")
    device = next(model.parameters()).device
    predictions: list[torch.Tensor | None] = [None] * len(samples)
    by_length = sorted(range(len(samples)), key=lambda i: samples[i].length)
    for _, indices in itertools.groupby(by_length, key=lambda i: samples[i].length):
        indices = list(indices)
        for first in range(0, len(indices), batch_size):
            batch = indices[first:first + batch_size]
            ids = torch.stack([samples[i].input_ids for i in batch]).to(device)
            capture = Capture(family, pattern, sparse=pattern is not None, device=device, index_topk=topk)
            hidden = family.forward(model, ids, capture)  # [B, length, hidden]
            counts = [samples[i].value_ids.numel() for i in batch]
            rows = torch.repeat_interleave(torch.arange(len(batch)), torch.tensor(counts)).to(device)
            positions = torch.cat([torch.arange(samples[i].value_start - 1, samples[i].length - 1)
                                   for i in batch]).to(device)
            logits = model.lm_head(hidden[rows, positions].to(model.lm_head.weight.dtype)).float()  # [values, vocab]
            for i, predicted in zip(batch, logits.argmax(-1).cpu().split(counts)):
                predictions[i] = predicted
    return predictions


def retrieval(model: nn.Module, pattern: Pattern | str | None, samples: Sequence[ProbeSample], *,
              topk: int | None = None, batch_size: int = 8) -> dict:
    """The probe's accuracies of `model` under `pattern` (None: dense) on `samples` (`predict_values`).

    cells: per (length, depth), in the samples' order: samples, exact_match (the share of samples whose value
    tokens are all the argmax) and token_accuracy (the share of their value tokens that are). exact_match and
    token_accuracy: the means over the cells. control (with control samples): the same per length for a key that
    was never planted. Plus mode, and under a pattern its letters and index_topk.
    """
    samples = list(samples)
    pattern = checked_mode(model, pattern, topk)
    metrics = {"mode": "dense" if pattern is None else "sparse"}
    if pattern is not None:
        family = family_of(model)
        index_topk = topk or family.indexer(family.dsa_attentions(model)[0]).index_topk
        metrics.update(pattern=str(pattern), index_topk=index_topk)
    metrics.update(score(samples, predict_values(model, pattern, samples, topk=topk, batch_size=batch_size)))
    return metrics


def score(samples: Sequence[ProbeSample], predictions: Sequence[torch.Tensor]) -> dict:
    """exact_match, token_accuracy, cells and control of `retrieval` from each sample's predicted value tokens."""
    cells: dict[tuple[int, float | None], list[tuple[int, int]]] = {}
    for sample, predicted in zip(samples, predictions, strict=True):
        right = int((predicted == sample.value_ids).sum())
        cells.setdefault((sample.length, sample.depth), []).append((right, sample.value_ids.numel()))
    rows = [{"length": length, "depth": depth, "samples": len(scores),
             "exact_match": sum(right == total for right, total in scores) / len(scores),
             "token_accuracy": sum(right for right, _ in scores) / sum(total for _, total in scores)}
            for (length, depth), scores in cells.items()]
    planted = [row for row in rows if row["depth"] is not None]
    metrics = {name: sum(row[name] for row in planted) / len(planted) if planted else None
               for name in ("exact_match", "token_accuracy")}
    metrics["cells"] = planted
    control = [{k: v for k, v in row.items() if k != "depth"} for row in rows if row["depth"] is None]
    if control:
        metrics["control"] = control
    return metrics


def _planted(bos: list[int], tokens: np.ndarray, lines: list[list[int]],
             cuts: list[int]) -> tuple[list[int], int | None]:
    """(bos, the window `tokens` with needle line i before window token cuts[i] (an empty line: not planted), the
    index of line 0's first token or None)."""
    ids, start, line_0 = list(bos), 0, None
    for cut in sorted(set(cuts) - {-1}):
        ids += tokens[start:cut].tolist()
        start = cut
        for i in (i for i, at in enumerate(cuts) if at == cut and lines[i]):
            line_0 = len(ids) if i == 0 else line_0
            ids += lines[i]
    return ids + tokens[start:].tolist(), line_0


def _checked(lengths, depths, needles, digits, samples_per_cell) -> tuple[list[int], list[float]]:
    """(lengths, depths) as lists, every argument checked."""
    lengths, depths = list(lengths), list(depths)
    if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
        raise ValueError(f"probe lengths must be a non-empty list of positive token counts, got {lengths}")
    bad = [d for d in depths if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1]
    if not depths or bad:
        raise ValueError(f"probe depths {bad or depths} are not relative depths: give a non-empty list of depths "
                         f"between 0 and 1 (0: the start of the context, 1: just before the query)")
    for name, value in (("needles", needles), ("digits", digits), ("samples_per_cell", samples_per_cell)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"probe {name} must be a positive integer, got {value!r}")
    return lengths, [float(d) for d in depths]


def _encode(tokenizer, text: str) -> list[int]:
    """The token ids of `text`, no special tokens."""
    if callable(tokenizer):  # transformers
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer.encode(text))


def _keys(rng: random.Random, count: int) -> list[str]:
    """`count` distinct random identifiers of KEY_LETTERS lowercase letters, no Python keyword."""
    keys: list[str] = []
    while len(keys) < count:
        key = "".join(rng.choices(string.ascii_lowercase, k=KEY_LETTERS))
        if key not in keys and not keyword.iskeyword(key):
            keys.append(key)
    return keys


def _document(rng: random.Random, encoded: list[np.ndarray], window: int, length: int) -> int:
    """A random document of at least `window` tokens."""
    long_enough = [i for i, doc in enumerate(encoded) if len(doc) >= window]
    if not long_enough:
        raise ValueError(f"no probe document is long enough: a sample of probe length {length} needs {window} tokens "
                         f"of one document, the longest has {max(map(len, encoded))}; use shorter probe lengths or "
                         f"documents that are longer (e.g. data=stdlib_long, which joins each package's files)")
    return rng.choice(long_enough)
