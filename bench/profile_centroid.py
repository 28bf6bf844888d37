"""Where the fused dense centroid KL spends its time: per-kernel GPU milliseconds and TFLOP/s of one forward +
backward at DeepSeek-V3.2 shapes, against the default SDPA forward on MLA's real shapes in the same run.

    python -m bench.profile_centroid --seq-len 32768 --groups 1 4

Per kernel, FLOPs per causal key pair (a multiply-add counts 2; H = 128, Dq = 192, HI = 64, D = 128):
  _main_lse_kernel      G * 2 H Dq         (skipped with main_lse)
  _index_logits_kernel  2 HI D             (the indexer logits, into the scratch, and their LSE)
  _centroid_kernel      G * 2 H Dq         (the served layers' head scores: pbar; the KL terms and dL/dI against I)
  _index_dq_kernel      2 * 2 HI D         (recompute the head dots, then dS . kI)
  _index_dk_kernel      2 * 2 HI D         (recompute, then dS^T . qI)
The centroid kernel also prints the rate at which it reads its q and k tiles: each (row block, key block) tile
with a causal pair reads G H (BLOCK_M + BLOCK_N) Dq bf16 values (bench.l2_bandwidth measures the ceiling).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from bench.bench_kernels import SDPA_FLOPS_PER_PAIR, backbone_lse, sdpa_default_forward
from bench.common import DSA, dsa_inputs, fwd_bwd
from kernels.centroid_kl import TILES, centroid_kl, wide_head_tiles

MAIN = 2 * DSA["H"] * DSA["Dq"]
INDEX = 2 * DSA["HI"] * DSA["D"]
KERNEL_FLOPS = {"_main_lse_kernel": lambda G: G * MAIN, "_centroid_kernel": lambda G: G * MAIN,
                "_index_logits_kernel": lambda G: INDEX, "_index_dq_kernel": lambda G: 2 * INDEX,
                "_index_dk_kernel": lambda G: 2 * INDEX}


def centroid_tile_bytes(T: int, G: int) -> int:
    """Bytes of q and k tiles `_centroid_kernel` reads at T (bf16, the GPU's tiles, tiles with a causal pair)."""
    tiles = wide_head_tiles(TILES["cuda"], DSA["Dq"])
    bm, bn = tiles["centroid_block_m"], tiles["centroid_block_n"]
    causal = sum(min(triton.cdiv(T, bn), ((rb + 1) * bm - 1) // bn + 1) for rb in range(triton.cdiv(T, bm)))
    return causal * G * DSA["H"] * (bm + bn) * DSA["Dq"] * 2


def kernel_times(run) -> dict[str, float]:
    """GPU milliseconds per CUDA kernel name of one run() (after a warm-up call)."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args()

    T = args.seq_len
    pairs = T * (T + 1) / 2
    sdpa = sdpa_default_forward(T, reps=3)
    print(f"T={T} default SDPA forward: {sdpa['seconds'] * 1e3:.1f} ms, "
          f"{pairs * SDPA_FLOPS_PER_PAIR / sdpa['seconds'] / 1e12:.0f} TFLOP/s, backend {sdpa.get('backend')}",
          flush=True)
    rows = dict(gpu=torch.cuda.get_device_name(), seq_len=T, sdpa=sdpa, runs=[])
    index, main_q, main_k = dsa_inputs(T, max(args.groups))
    scale = DSA["Dq"] ** -0.5
    for G in args.groups:
        lse = backbone_lse(main_q[:G], main_k[:G], scale)
        for given in (False, True):
            run = fwd_bwd(lambda: centroid_kl(*index, main_q[:G], main_k[:G], scale,
                                              main_lse=lse if given else None), index)
            times = kernel_times(run)
            total = sum(times.values())
            print(f"T={T} G={G} main_lse {'given' if given else 'computed'}: {total:.1f} ms in all "
                  f"({total / 1e3 / G / sdpa['seconds']:.2f}x the SDPA forward per served layer)", flush=True)
            parts = {}
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                flops = next((f(G) for key, f in KERNEL_FLOPS.items() if key in name), None)
                rate = "" if flops is None else f"  {pairs * flops / (ms / 1e3) / 1e12:.0f} TFLOP/s"
                if "_centroid_kernel" in name:
                    rate += f", q/k tiles read at {centroid_tile_bytes(T, G) / (ms / 1e3) / 1e12:.2f} TB/s"
                print(f"    {ms:9.2f} ms  {name[:90]}{rate}", flush=True)
                parts[name[:120]] = dict(ms=ms, flops_per_pair=flops)
            rows["runs"].append(dict(G=G, main_lse_given=given, total_ms=total, kernels=parts))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
