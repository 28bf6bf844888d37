"""Tokenize and pack the corpus once, ahead of the job: `python -m train.prepare <the job's overrides>`.

The same config tree and overrides as `python -m train.distill` (`data=...`, `model=...`, `distill.*`): for each
row length the job's stages read (distill.dense_seq_len and distill.sparse_seq_len, by default distill.seq_len; a
stage of 0 steps reads none) the corpus is tokenized with every core (datasets.map, `num_proc`: data.num_proc when
given on this command line, else every core this process may use) and packed into the cache the job reads
(`${cache_dir}/data`), or into data.prepared when set. A job with the same overrides then opens the packed rows
without reading, hashing or tokenizing the corpus: from the cache (keyed by the source files' paths, sizes and
modification times, the tokenizer, the row length and data.*) or, with `data.prepared=<dir>`, from that directory,
whose manifests it checks against its tokenizer, row lengths and data settings.

`${gpu:A,B}` defaults (distill.seq_len) resolve on the machine this runs on: preparing on a machine without a GPU
for a GPU job, give the lengths (distill.seq_len=..., or dense_seq_len / sparse_seq_len) on the command line.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from omegaconf import DictConfig

USAGE = __doc__.split("\n\n")[0] + """

usage: python -m train.prepare [hydra overrides ...]
  e.g. python -m train.prepare data=text 'data.files=[corpus/*.jsonl.zst]' model=local model.path=/models/glm5 \\
           distill.dense_seq_len=32768 distill.sparse_seq_len=131072
       python -m train.prepare <the same> data.prepared=/shared/prepared/glm5-corpus   # a directory to ship
"""


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_data(cfg: DictConfig, num_proc: int | None = None) -> dict[int, str]:
    """Pack cfg's corpus at each row length of the job's stages into data.prepared, else the job's cache;
    {row length: entry directory}. num_proc: tokenizing processes (default: every core)."""
    from train.data import pack_to, stage_seq_lens
    from train.model import model_config
    from train.tokenizer import load_tokenizer

    d = cfg.distill
    lengths = stage_seq_lens(d)
    for stage, seq_len in lengths.items():
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"distill.{stage}_seq_len must be a positive integer, got {seq_len!r}")
    config = model_config(cfg.model)
    for stage, seq_len in lengths.items():
        if seq_len > config.max_position_embeddings:
            raise ValueError(f"distill.{stage}_seq_len={seq_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
    tokenizer = load_tokenizer(cfg.model)
    out_dir = cfg.data.get("prepared") or None
    num_proc = num_proc or cpu_count()
    entries = {}
    for seq_len in sorted(set(lengths.values())):
        start = time.perf_counter()
        rows, path, packed_now = pack_to(cfg.data, tokenizer, seq_len, os.path.join(cfg.cache_dir, "data"),
                                         out_dir=out_dir, num_proc=num_proc)
        stages = " and ".join(stage for stage, n in lengths.items() if n == seq_len)
        print(f"[prepare] {stages} rows of {seq_len} tokens: {len(rows['train'])} train, {len(rows['validation'])} "
              f"validation, {'packed with ' + str(num_proc) + ' processes' if packed_now else 'already prepared'} "
              f"in {time.perf_counter() - start:.1f} s: {path}", flush=True)
        entries[seq_len] = path
    if out_dir:
        print(f"[prepare] the job opens them with data.prepared={out_dir} and the same data=/model=/distill.* "
              f"overrides", flush=True)
    else:
        print("[prepare] the job with the same overrides (and cache_dir) opens them from its cache", flush=True)
    return entries


def main(argv: list[str] | None = None) -> dict[int, str]:
    from hydra import compose, initialize_config_dir

    import train.distill  # noqa: F401  (the ${gpu:...} and ${run_tag:...} resolvers of conf/)
    overrides = sys.argv[1:] if argv is None else list(argv)
    if any(arg in ("-h", "--help") for arg in overrides):
        print(USAGE)
        return {}
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    conf_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
    with initialize_config_dir(conf_dir, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    given = any(arg.lstrip("+~").split("=", 1)[0] == "data.num_proc" for arg in overrides)
    num_proc = int(cfg.data.num_proc or 1) if given else cpu_count()
    return prepare_data(cfg, num_proc)


if __name__ == "__main__":
    main()
