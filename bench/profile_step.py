"""Where a real-scale distillation step spends its GPU time: per-kernel totals of one step per stage.

The model, pattern and step of bench.real_scale (DeepSeek-V3.2 attention shapes, GLM-5.2's kind of pattern), run
once under torch.profiler after a warm-up step; the CUDA kernels are grouped into what they belong to (backbone
attention, sparse attention, the centroid-KL kernels, indexer top-k, GEMMs, copies, the rest) by name.

    python -m bench.profile_step --layers 16 --seq-len 32768 --out results/

Writes profile-<layers>x<seq_len>.json (per stage: step seconds, per-group and top-kernel milliseconds).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.real_scale import optimizer_step, real_scale_run

# kernel-name fragment -> the part of the step it belongs to (first match wins)
PARTS = (("_sparse_mqa_kernel", "sparse attention"), ("_sparse_kl_kernel", "sparse centroid KL"),
         ("_topk_kernel", "indexer top-k"), ("centroid", "dense centroid KL"), ("_kl_", "dense centroid KL"),
         ("_lse", "dense centroid KL"), ("cudnn", "backbone dense attention"), ("fmha", "backbone dense attention"),
         ("flash", "backbone dense attention"), ("attention", "backbone dense attention"),
         ("gemm", "GEMMs"), ("sm90_xmma", "GEMMs"), ("cutlass", "GEMMs"), ("Memcpy", "copies"),
         ("scatter", "scatter/gather"), ("gather", "scatter/gather"), ("index", "scatter/gather"))


def part_of(name: str) -> str:
    lowered = name.lower()
    return next((part for key, part in PARTS if key.lower() in lowered), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--stages", default="dense,sparse")
    args = parser.parse_args()
    _, pattern, distiller, ids = real_scale_run(args.layers, args.seq_len)
    optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-4)
    stages = {}
    for stage in args.stages.split(","):
        step = functools.partial(optimizer_step, distiller, optimizer, ids, stage == "sparse")
        step()  # warm-up: compiles every kernel at this T
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        kernels = {}
        for event in prof.key_averages():
            ms = event.device_time_total / 1e3
            if ms > 0:
                kernels[event.key] = kernels.get(event.key, 0.0) + ms
        parts = {}
        for name, ms in kernels.items():
            parts[part_of(name)] = parts.get(part_of(name), 0.0) + ms
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
        stages[stage] = dict(seconds_profiled=seconds, gpu_ms_total=sum(kernels.values()),
                             parts_ms=dict(sorted(parts.items(), key=lambda kv: -kv[1])),
                             top_kernels_ms=[[name[:160], ms] for name, ms in top])
        print(stage, json.dumps(stages[stage], indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile-{args.layers}x{args.seq_len}.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, pattern=str(pattern),
                       seq_len=args.seq_len, stages=stages), f, indent=1)


if __name__ == "__main__":
    main()
