"""Tile settings of the fused Triton kernels: read-only, one frozen `Tiles` per device kind, and an explicit override.

    tile_config(device)            the Tiles a launcher uses on `device` (CUDA, or the CPU under TRITON_INTERPRET=1)
    tiles("cuda") / tiles("cpu")   the Tiles of a device kind, as the launchers see them now
    DEFAULT_TILES["cuda"]          the defaults (never changed by an override)
    with tiles_override("cuda", centroid_block_n=64):   # benchmarks, tests: other tiles inside the block only
        ...

The settings never change in place: an override is a new frozen Tiles, visible to the launchers only inside the
`with` block that made it (a context variable: the calling thread or task; blocks nest, the innermost wins), and
the defaults are back when the block ends, also on an exception. The GPU's values were chosen with
bench/tune_tiles.py and bench/bench_topk.py; timings are in docs/BENCHMARKS.md. The CPU's are small, so that the
tests exercise many tiles on tiny T under the interpreter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from contextvars import ContextVar
from types import MappingProxyType

import torch

SCRATCH_BYTES = 1 << 30  # the dense centroid KL's budget for its R x S fp32 scratch (I, then dL/dI)
KINDS = ("cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One device kind's tile settings (every field a launch parameter of some kernel).

    kernels.centroid_kl: block_m, block_n, warps, stages: the per-chunk indexer kernels (logits, dq, dk);
    centroid_*: the centroid kernel's tiles, warps and stages; lse_*: the main LSE pass; group: row blocks per launch
    group of the tile kernels; min_dot: smallest dot dimension (every op); index_lse_split / index_lse_splits: the
    least keys per program and the most programs per row of the indexer logits pass (its LSE split over programs,
    then joined); tma: whether bf16/fp16 tiles may be read through TMA descriptors.
    kernels.indexer_topk (topk_*): key tile, query rows per block, selection chunk, programs per SM, warps.
    kernels.sparse_attention (sparse_*): heads and gathered keys per block, warps, stages, programs per SM of its
    persistent grid, the byte budget of its probability scratch (rows per chunk), the probability kernel's entries
    per program, heads per step and warps, and whether the warpgroups split the score tile's keys (1) or both compute
    it (0: Triton's own choice for chained dots).
    kernels.sparse_centroid_kl (sparse_kl_*): gathered keys per block, warps.
    """

    block_m: int
    block_n: int
    warps: int
    stages: int
    centroid_block_m: int
    centroid_block_n: int
    centroid_warps: int
    centroid_stages: int
    lse_block_m: int
    lse_block_n: int
    lse_warps: int
    lse_stages: int
    group: int
    min_dot: int
    topk_block_s: int
    topk_block_t: int
    topk_select: int
    topk_programs: int
    topk_warps: int
    sparse_block_h: int
    sparse_block_k: int
    sparse_warps: int
    sparse_stages: int
    sparse_programs: int
    sparse_scratch_bytes: int
    sparse_prob_block: int
    sparse_prob_heads: int
    sparse_prob_warps: int
    sparse_split_scores: int
    sparse_kl_block_k: int
    sparse_kl_warps: int
    index_lse_split: int
    index_lse_splits: int
    tma: bool

    def replace(self, **changes) -> Tiles:
        """A copy with `changes` (field names; an unknown one raises TypeError)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """{field: value} (a new dict: changing it changes nothing here)."""
        return dataclasses.asdict(self)


TILE_FIELDS = tuple(field.name for field in dataclasses.fields(Tiles))

DEFAULT_TILES = MappingProxyType({
    "cuda": Tiles(block_m=64, block_n=64, warps=4, stages=3, centroid_block_m=128, centroid_block_n=128,
                  centroid_warps=8, centroid_stages=2, lse_block_m=128, lse_block_n=64, lse_warps=8,
                  lse_stages=2, group=8, min_dot=16, topk_block_s=64, topk_block_t=2, topk_select=1024,
                  topk_programs=2, topk_warps=4,
                  sparse_block_h=64, sparse_block_k=64, sparse_warps=8, sparse_stages=2, sparse_programs=2,
                  sparse_scratch_bytes=SCRATCH_BYTES, sparse_prob_block=512, sparse_prob_heads=32,
                  sparse_prob_warps=4, sparse_split_scores=1,
                  sparse_kl_block_k=32, sparse_kl_warps=4, index_lse_split=512, index_lse_splits=64, tma=True),
    "cpu": Tiles(block_m=16, block_n=16, warps=4, stages=1, centroid_block_m=8, centroid_block_n=32,
                 centroid_warps=4, centroid_stages=1, lse_block_m=16, lse_block_n=16, lse_warps=4,
                 lse_stages=1, group=2, min_dot=1, topk_block_s=8, topk_block_t=2, topk_select=32,
                 topk_programs=3, topk_warps=4,
                 sparse_block_h=2, sparse_block_k=4, sparse_warps=4, sparse_stages=1, sparse_programs=3,
                 sparse_scratch_bytes=512, sparse_prob_block=8, sparse_prob_heads=2, sparse_prob_warps=4,
                 sparse_split_scores=1, sparse_kl_block_k=4, sparse_kl_warps=4, index_lse_split=16,
                 index_lse_splits=2, tma=True),
})

# The overrides in effect in this context: kind -> Tiles (an immutable mapping, replaced, never changed, by
# `tiles_override`, which restores the previous one on exit).
_OVERRIDES: ContextVar[MappingProxyType] = ContextVar("kernels_tiles_overrides", default=MappingProxyType({}))


def device_kind(device: torch.device | str) -> str:
    """'cuda' for a CUDA device, else 'cpu' (the Triton interpreter's tiles)."""
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def tiles(kind: str) -> Tiles:
    """The Tiles of device kind `kind` ('cuda' or 'cpu') in effect here: the defaults, or the innermost
    `tiles_override` around the caller."""
    if kind not in DEFAULT_TILES:
        raise ValueError(f"tile settings exist for {KINDS}, not {kind!r}")
    return _OVERRIDES.get().get(kind, DEFAULT_TILES[kind])


def tile_config(device: torch.device) -> Tiles:
    """The Tiles for `device`; the CPU only under the Triton interpreter."""
    if device.type == "cuda":
        return tiles("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1")
    return tiles("cpu")


@contextlib.contextmanager
def tiles_override(kind: str | None = None, /, **changes):
    """Inside the block, the launchers on device kind `kind` ('cuda' or 'cpu'; None: both) use its current Tiles with
    `changes` (field names of Tiles; an unknown one raises TypeError before the block runs). Yields the overridden
    Tiles of `kind` (of 'cuda' when kind is None). For benchmarks and tests; the job always runs the defaults."""
    kinds = KINDS if kind is None else (kind,)
    current = {k: tiles(k) for k in kinds}
    updated = {k: current[k].replace(**changes) for k in kinds}
    token = _OVERRIDES.set(MappingProxyType({**_OVERRIDES.get(), **updated}))
    try:
        yield updated[kinds[0]]
    finally:
        _OVERRIDES.reset(token)


def parse_overrides(items) -> dict:
    """["KEY=INT", "KEY=INT,KEY=INT", ...] (the benches' command lines) -> {KEY: int}; ValueError names a KEY that
    is not a Tiles field or a value that is not an integer."""
    changes = {}
    for item in items:
        for part in filter(None, item.split(",")):
            key, _, value = part.partition("=")
            if key not in TILE_FIELDS or not value.lstrip("-").isdigit():
                raise ValueError(f"{part!r}: KEY=INT with KEY one of {sorted(TILE_FIELDS)}")
            changes[key] = int(value)
    return changes
