"""Times the fused kernels under a few tile configurations (kernels.centroid_kl.TILES['cuda'] overrides) at one
DeepSeek-V3.2 shape, each against the current defaults measured in the same run.

    python -m bench.tune_tiles --seq-len 16384 --groups 1 4
"""
from __future__ import annotations

import argparse

import torch

from bench.bench_topk import SWEEP
from bench.common import DSA, dsa_inputs, fwd_bwd, measure
from kernels.centroid_kl import TILES, centroid_kl
from kernels.indexer_topk import indexer_topk

CANDIDATES = [dict(), dict(warps=8), dict(block_m=128, block_n=64, warps=8), dict(stages=3), dict(lse_warps=4),
              dict(group=16)]
TOPK_CANDIDATES = [dict()] + SWEEP[1:]  # the defaults, then bench.bench_topk's other tile choices


def time_candidates(label: str, candidates: list[dict], defaults: dict, run) -> None:
    """Times run() under each TILES['cuda'] override, against the first (the defaults) in the same run."""
    base = None
    for override in candidates:
        TILES["cuda"] = dict(defaults, **override)
        seconds, _ = measure(run, reps=3, warmup=1)
        base = base or seconds
        print(f"{label} {override or 'defaults'}: {seconds:.4f} s ({base / seconds:.2f}x the defaults)", flush=True)
    TILES["cuda"] = defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--topk-seq-len", type=int, default=32768)
    args = parser.parse_args()
    defaults = dict(TILES["cuda"])
    index, main_q, main_k = dsa_inputs(args.seq_len, max(args.groups))
    for G in args.groups:
        run = fwd_bwd(lambda: centroid_kl(*index, main_q[:G], main_k[:G], DSA["Dq"] ** -0.5), index)
        time_candidates(f"centroid_kl T={args.seq_len} G={G}", CANDIDATES, defaults, run)
    index, main_q, main_k = None, None, None
    torch.cuda.empty_cache()
    iq, ik, iw = [t.detach() for t in dsa_inputs(args.topk_seq_len, 1, H=1)[0]]
    time_candidates(f"indexer_topk T={args.topk_seq_len}", TOPK_CANDIDATES, defaults,
                    lambda: indexer_topk(iq, ik, iw, DSA["k"]))


if __name__ == "__main__":
    main()
