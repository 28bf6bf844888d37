"""Where the fused dense centroid KL spends its time: per-kernel GPU milliseconds and TFLOP/s of one forward +
backward at DeepSeek-V3.2 shapes, against the default SDPA forward on MLA's real shapes in the same run.

    python -m bench.profile_centroid --seq-len 32768 --groups 1 4
    python -m bench.profile_centroid --seq-len 16384 --against tma=0 --against lse_stages=3   # A/B in one run
    python -m bench.profile_centroid --seq-len 16384 --against-expanded-keys   # rope keys once vs per head

Per kernel, FLOPs per causal key pair (a multiply-add counts 2; H = 128, Dq = 192, HI = 64, D = 128):
  _main_lse_kernel      G * 2 H Dq         (skipped with main_lse)
  _index_logits_kernel  2 HI D             (the indexer logits, into the scratch, and their LSE)
  _centroid_kernel      G * 2 H Dq         (the served layers' head scores: pbar; the KL terms and dL/dI against I)
  _index_dq_kernel      2 * 2 HI D         (recompute the head dots, then dS . kI)
  _index_dk_kernel      2 * 2 HI D         (recompute, then dS^T . qI)
The keys are passed as the job passes them: each head's nope columns and the rope columns once (main_k_rope).
The centroid kernel also prints the rate at which it reads its q and k tiles: each (row block, key block) tile
with a causal pair reads G H (BLOCK_M Dq + BLOCK_N (Dq - rope)) + G BLOCK_N rope bf16 values (G H (BLOCK_M +
BLOCK_N) Dq with the keys expanded to every head; bench.l2_bandwidth measures the ceiling).
--against KEY=VALUE[,KEY=VALUE]: also profile under those tile overrides (kernels.tiles.tiles_override('cuda', ...),
integer values), after the defaults in the same run, each kernel's time printed against the defaults'.
--against-expanded-keys: also profile with main_k holding every head's full key (no main_k_rope), the same way.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
from torch.profiler import ProfilerActivity, profile

from bench.bench_kernels import SDPA_FLOPS_PER_PAIR, backbone_lse, sdpa_default_forward
from bench.common import DSA, dsa_inputs, fwd_bwd, job_keys
from kernels.centroid_kl import centroid_kl, wide_head_tiles
from kernels.tiles import parse_overrides, tiles, tiles_override

MAIN = 2 * DSA["H"] * DSA["Dq"]
INDEX = 2 * DSA["HI"] * DSA["D"]
KERNEL_FLOPS = {"_main_lse_kernel": lambda G: G * MAIN, "_centroid_kernel": lambda G: G * MAIN,
                "_index_logits_kernel": lambda G: INDEX, "_index_dq_kernel": lambda G: 2 * INDEX,
                "_index_dk_kernel": lambda G: 2 * INDEX}


def centroid_tile_bytes(T: int, G: int, expanded: bool) -> int:
    """Bytes of q and k tiles `_centroid_kernel` reads at T (bf16, the GPU's tiles, tiles with a causal pair): the
    rope keys once per layer and tile, or (expanded) with every head."""
    cfg = wide_head_tiles(tiles("cuda"), DSA["Dq"])
    bm, bn = cfg.centroid_block_m, cfg.centroid_block_n
    causal = sum(min(triton.cdiv(T, bn), ((rb + 1) * bm - 1) // bn + 1) for rb in range(triton.cdiv(T, bm)))
    H, Dq, rope = DSA["H"], DSA["Dq"], 0 if expanded else DSA["rope"]
    return causal * G * (H * (bm * Dq + bn * (Dq - rope)) + bn * rope) * 2


def kernel_times(run) -> dict[str, float]:
    """GPU milliseconds per CUDA kernel name of one run() (after a warm-up call)."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 1e3 for e in prof.key_averages() if e.device_time_total > 0}


def profile_runs(T: int, groups: list[int], sdpa_seconds: float, defaults: dict | None = None,
                 expanded: bool = False) -> list[dict]:
    """Per-kernel GPU ms of one forward + backward at T for each G in groups, main LSE computed and given, the rope
    keys given once (or, expanded, in every head's key); against `defaults` (the rows of the same profile under the
    default tiles and keys), each kernel's ratio printed too."""
    pairs = T * (T + 1) / 2
    index, main_q, main_k = dsa_inputs(T, max(groups))
    scale = DSA["Dq"] ** -0.5
    keys, keys_rope = job_keys(main_k, 0 if expanded else DSA["rope"])
    runs = []
    for G in groups:
        lse = backbone_lse(main_q[:G], main_k[:G], scale)
        rope = None if keys_rope is None else keys_rope[:G]
        for given in (False, True):
            run = fwd_bwd(lambda: centroid_kl(*index, main_q[:G], keys[:G], scale, main_lse=lse if given else None,
                                              main_k_rope=rope), index)
            times = kernel_times(run)
            total = sum(times.values())
            base = next((r for r in defaults or [] if (r["G"], r["main_lse_given"]) == (G, given)), None)
            versus = "" if base is None else f", {base['total_ms'] / total:.2f}x the defaults"
            print(f"T={T} G={G} main_lse {'given' if given else 'computed'}: {total:.1f} ms in all "
                  f"({total / 1e3 / G / sdpa_seconds:.2f}x the SDPA forward per served layer{versus})", flush=True)
            parts = {}
            for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
                flops = next((f(G) for key, f in KERNEL_FLOPS.items() if key in name), None)
                parts[name[:120]] = dict(ms=ms, flops_per_pair=flops)
                if flops is None:
                    continue
                rate = f"  {pairs * flops / (ms / 1e3) / 1e12:.0f} TFLOP/s"
                if "_centroid_kernel" in name:
                    rate += f", q/k tiles read at {centroid_tile_bytes(T, G, expanded) / (ms / 1e3) / 1e12:.2f} TB/s"
                if base is not None and name[:120] in base["kernels"]:
                    rate += f", {base['kernels'][name[:120]]['ms'] / ms:.2f}x the defaults"
                print(f"    {ms:9.2f} ms  {name[:90]}{rate}", flush=True)
            other = [part["ms"] for part in parts.values() if part["flops_per_pair"] is None]
            print(f"    {sum(other):9.2f} ms  {len(other)} other kernels (the LSE joins, casts, fills)", flush=True)
            runs.append(dict(G=G, main_lse_given=given, total_ms=total, kernels=parts))
    return runs


def parse_override(text: str) -> dict:
    """"KEY=VALUE,KEY=VALUE" -> {KEY: int(VALUE)}, each KEY a field of kernels.tiles.Tiles."""
    try:
        return parse_overrides([text])
    except ValueError as error:
        raise SystemExit(f"--against: {error}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--against", action="append", default=[], type=parse_override, metavar="KEY=VALUE[,...]",
                        help="also profile under these tile overrides, in the same run (repeatable)")
    parser.add_argument("--against-expanded-keys", action="store_true",
                        help="also profile with every head's full key in main_k (no main_k_rope), in the same run")
    parser.add_argument("--out", default=None, help="a JSON file for the rows")
    args = parser.parse_args()

    T = args.seq_len
    sdpa = sdpa_default_forward(T, reps=3)
    print(f"T={T} default SDPA forward: {sdpa['seconds'] * 1e3:.1f} ms, "
          f"{T * (T + 1) / 2 * SDPA_FLOPS_PER_PAIR / sdpa['seconds'] / 1e12:.0f} TFLOP/s, backend "
          f"{sdpa.get('backend')}", flush=True)
    rows = dict(gpu=torch.cuda.get_device_name(), seq_len=T, sdpa=sdpa,
                runs=profile_runs(T, args.groups, sdpa["seconds"]))
    for override in args.against:
        print(f"tiles {override}:", flush=True)
        with tiles_override("cuda", **override):
            runs = profile_runs(T, args.groups, sdpa["seconds"], rows["runs"])
        rows.setdefault("against", []).append(dict(tiles=override, runs=runs))
    if args.against_expanded_keys:
        print("keys expanded to every head:", flush=True)
        rows["against_expanded_keys"] = profile_runs(T, args.groups, sdpa["seconds"], rows["runs"], expanded=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
