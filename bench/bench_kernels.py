"""Fused centroid KL and top-k against their baselines at DeepSeek-V3.2 shapes, all measured in one run.

    python -m bench.bench_kernels --out results/      (then: python -m bench.report results/bench.json)

Per sequence length T (B=1, H=128, Dq=192, Dv=128, HI=64, D=128, k=2048, bf16):
  * the yardstick: the default torch `scaled_dot_product_attention` forward (no backend forced), causal, on
    MLA's real shapes: q, k [1, 128, T, 192], v [1, 128, T, 128]. The backend that ran is read from the
    profiler (the aten op it dispatched to and its CUDA kernels) and written into the row;
  * fused dense centroid KL forward+backward for G served layers, computing the per-head LSE and with
    `main_lse` given (the LSE the backbone's attention returns: kernels.dense_attention.causal_attention),
    and the reference where asked; the fused sparse stage on the fused top-k at a few T. The fused rows take the
    keys as the job passes them: each head's 128 nope columns and the 64 rope columns once (`main_k_rope`);
  * fused top-k against materialised fp32 scores + torch.topk (bench.bench_topk: GPU correctness checks at
    the real shapes first, a tile sweep, then the rows).
Time is the median of CUDA-event timings after one untimed call at the same shapes (it compiles the kernels for
those shapes and strides, and grows the allocator's segments), memory the peak allocated above the inputs. Rows
are written to the JSON as they finish, so a run cut short keeps what it measured; rows whose estimated time would
pass --budget-s are skipped (and listed under "skipped").

FLOPs per causal key pair (pairs = T (T + 1) / 2 per batch row; a multiply-add counts 2):
  * SDPA forward: 2 H (Dq + Dv) = 81,920;
  * fused dense centroid KL: G * 2 H Dq (centroid tiles: every served layer's head scores) = G * 49,152, plus
    G * 49,152 for the per-head LSE pass unless main_lse is given, plus the indexer side: five 2 HI D dots
    (the logits with their LSE, recompute + product for d qI, the same for d kI) = 81,920;
  * top-k scoring: 2 HI D + 2 HI = 16,512 (bench.bench_topk).
Each row carries its FLOP count ("flops") and achieved TFLOP/s ("tflops").
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import triton

from bench import bench_topk
from bench.common import DSA, dsa_inputs, fwd_bwd, job_keys, materialised_topk, measure
from kernels import reference
from kernels.centroid_kl import centroid_kl
from kernels.dense_attention import causal_attention
from kernels.indexer_topk import indexer_topk

DV = 128  # MLA's value head dim
SDPA_FLOPS_PER_PAIR = 2 * DSA["H"] * (DSA["Dq"] + DV)
INDEXER_FLOPS_PER_PAIR = 5 * 2 * DSA["HI"] * DSA["D"]
BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH"}


def centroid_flops_per_pair(G: int, lse_given: bool) -> int:
    main = 2 * DSA["H"] * DSA["Dq"]
    return G * main * (1 if lse_given else 2) + INDEXER_FLOPS_PER_PAIR


def with_rate(row: dict, flops: int) -> dict:
    row["flops"] = flops
    if not isinstance(row["seconds"], str):
        row["tflops"] = flops / row["seconds"] / 1e12
    return row


def sdpa_backend(fn) -> dict:
    """Which SDPA backend fn() runs: the aten op it dispatches to and the CUDA kernels, from the profiler."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages()]
        ops = [n for n in names if n.startswith("aten::_scaled_dot_product") or n.startswith("aten::_flash")
               or n.startswith("aten::_efficient") or n.startswith("aten::_cudnn")]
        kernels = [e.key[:160] for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        found = [b for key, b in BACKENDS.items() if any(key in op for op in ops)]
        return dict(backend=found[0] if found else f"unknown (ops {ops})", aten_ops=ops, cuda_kernels=kernels[:8])
    except Exception as e:  # a profiler that fails must not stop the benchmark
        return dict(backend=f"unknown (profiler failed: {type(e).__name__}: {str(e)[:200]})")


def sdpa_default_forward(T: int, reps: int) -> dict:
    q, k = (torch.randn(1, DSA["H"], T, DSA["Dq"], device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, DSA["H"], T, DV, device="cuda", dtype=torch.bfloat16)
    run = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    try:
        with torch.no_grad():
            run()
            backend = sdpa_backend(run)
            seconds, peak = measure(run, reps=reps, warmup=1)
    except torch.OutOfMemoryError:
        backend, seconds, peak = {}, "OOM", None
    row = dict(op="sdpa_default_fwd", T=T, G=None, seconds=seconds, peak_gib=peak, **backend)
    return with_rate(row, bench_topk.causal_pairs(T) * SDPA_FLOPS_PER_PAIR)


def backbone_lse(main_q: torch.Tensor, main_k: torch.Tensor, scale: float) -> torch.Tensor:
    """[G, B, H, T]: each served layer's per-head LSE as the backbone's attention returns it (MLA shapes: a v of
    128, here a slice of k; the LSE does not depend on v)."""
    return torch.stack([causal_attention(q, k, k[..., :DV].contiguous(), scale)[1] for q, k in zip(main_q, main_k)])


def centroid_rows(T: int, groups: list[int], reps: int, reference_max: int, sparse: bool) -> list[dict]:
    torch.cuda.empty_cache()
    index, main_q, main_k = dsa_inputs(T, max(groups))
    nope, rope = job_keys(main_k)  # the fused rows take the keys as the job passes them
    scale = DSA["Dq"] ** -0.5
    pairs = bench_topk.causal_pairs(T)
    rows = []

    def add(row, flops_per_pair):
        rows.append(with_rate(row, pairs * flops_per_pair))
        print(rows[-1], flush=True)

    for G in groups:
        mq, mk, mr = main_q[:G], nope[:G], rope[:G]
        seconds, peak = measure(fwd_bwd(lambda: centroid_kl(*index, mq, mk, scale, main_k_rope=mr), index),
                                reps=reps, warmup=1)
        add(dict(op="fused_dense_fwd_bwd", T=T, G=G, seconds=seconds, peak_gib=peak), centroid_flops_per_pair(G, False))
    lse = backbone_lse(main_q, main_k, scale)
    for G in groups:
        mq, mk, mr, lse_g = main_q[:G], nope[:G], rope[:G], lse[:G]
        seconds, peak = measure(fwd_bwd(lambda: centroid_kl(*index, mq, mk, scale, main_lse=lse_g, main_k_rope=mr),
                                        index), reps=reps, warmup=1)
        add(dict(op="fused_dense_fwd_bwd_given_lse", T=T, G=G, seconds=seconds, peak_gib=peak),
            centroid_flops_per_pair(G, True))
    del lse
    if T <= reference_max:
        for G in groups:
            mq, mk = main_q[:G], main_k[:G]
            seconds, peak = measure(fwd_bwd(lambda: reference.centroid_kl(*index, mq, mk, scale), index))
            add(dict(op="reference_dense_fwd_bwd", T=T, G=G, seconds=seconds, peak_gib=peak),
                centroid_flops_per_pair(G, False))
    if sparse:
        topk = indexer_topk(*[t.detach() for t in index], DSA["k"])
        mq, mk, mr = main_q[:1], nope[:1], rope[:1]
        seconds, peak = measure(fwd_bwd(lambda: centroid_kl(*index, mq, mk, scale, topk, main_k_rope=mr), index),
                                reps=reps, warmup=1)
        rows.append(dict(op="fused_sparse_fwd_bwd", T=T, G=1, seconds=seconds, peak_gib=peak))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for bench.json")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--long-from", type=int, default=65536, help="from this T on, only --long-groups run")
    parser.add_argument("--long-groups", type=int, nargs="+", default=[1])
    parser.add_argument("--reference-max", type=int, default=8192, help="largest T the reference runs at")
    parser.add_argument("--sparse-seq-lens", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--topk-seq-lens", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--topk-baseline-max", type=int, default=65536)
    parser.add_argument("--topk-sweep-seq-len", type=int, default=16384, help="T of the top-k tile sweep (0: none)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions below T=32K (one above)")
    parser.add_argument("--budget-s", type=float, default=300, help="skip rows estimated to end past this")
    args = parser.parse_args()
    t_start = time.time()
    deadline = t_start + args.budget_s
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  shapes=dict(DSA, Dv=DV, B=1, dtype="bf16"), rows=[], skipped=[],
                  flops_per_pair=dict(
                      sdpa_fwd=f"2*H*(Dq+Dv) = {SDPA_FLOPS_PER_PAIR}",
                      fused_dense=f"G*2*H*Dq*2 + 5*2*HI*D = G*{2 * 2 * DSA['H'] * DSA['Dq']} + "
                                  f"{INDEXER_FLOPS_PER_PAIR}",
                      fused_dense_given_lse=f"G*2*H*Dq + 5*2*HI*D = G*{2 * DSA['H'] * DSA['Dq']} + "
                                            f"{INDEXER_FLOPS_PER_PAIR}",
                      pairs="T*(T+1)/2 per batch row (causal)"))

    def save():
        result["elapsed_s"] = time.time() - t_start
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    print(result["gpu"], result["torch"], result["triton"], flush=True)
    try:  # the top-k first: its checks gate a fast-but-wrong kernel
        bench_topk.run(result, save, seq_lens=args.topk_seq_lens, baseline_max=args.topk_baseline_max,
                       sweep_T=args.topk_sweep_seq_len, sweep_deadline=t_start + 0.25 * args.budget_s,
                       deadline=t_start + 0.45 * args.budget_s)
    except Exception as e:  # a failure here must not cost the centroid rows
        result["topk_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print("top-k part failed:", result["topk_error"], flush=True)
    save()
    warm, warm_q, warm_k = dsa_inputs(1024, 1)  # compile every kernel before anything is timed
    centroid_kl(*warm, warm_q, warm_k, 0.1).backward()
    centroid_kl(*warm, warm_q, warm_k, 0.1, indexer_topk(*[t.detach() for t in warm], DSA["k"])).backward()
    reference.centroid_kl(*warm, warm_q, warm_k, 0.1).backward()
    materialised_topk(*[t.detach() for t in warm], DSA["k"])
    del warm, warm_q, warm_k
    previous = None  # (T, seconds of the timed calls per repetition, sum of groups) at the last T run
    for T in args.seq_lens:
        reps = args.reps if T < 32768 else 1
        groups = args.groups if T < args.long_from else args.long_groups
        if previous is not None:  # T^2 work; one more call for the compile and the LSE; a 1.5x margin
            estimate = 1.5 * previous[1] * (T / previous[0]) ** 2 * (reps + 1) * sum(groups) / previous[2]
            if time.time() + estimate > deadline:
                result["skipped"].append(dict(T=T, groups=groups, estimated_s=estimate))
                print(f"skipping T={T} (estimated {estimate:.0f} s, {deadline - time.time():.0f} s left)", flush=True)
                save()
                continue
        rows = [sdpa_default_forward(T, reps)]
        print(rows[-1], flush=True)
        rows += centroid_rows(T, groups, reps, args.reference_max, T in args.sparse_seq_lens)
        result["rows"] += rows
        timed = [r["seconds"] for r in rows
                 if r["op"].startswith(("fused", "sdpa")) and not isinstance(r["seconds"], str)]
        previous = (T, sum(timed), sum(groups))
        torch.cuda.empty_cache()
        save()
    for r in result["rows"]:
        if r["op"] in ("fused_topk", "sdpa_default_fwd"):
            print(f"summary {r['op']} T={r['T']}: {r['seconds']} s, {r.get('tflops', 0):.0f} TFLOP/s"
                  + (f", materialised / fused {r['ratio_vs_materialised']:.2f}" if "ratio_vs_materialised" in r else "")
                  + (f", backend {r['backend']}" if "backend" in r else ""), flush=True)
    checks = result.get("topk_checks", [])
    print("top-k checks:", "ok" if checks and all(c["ok"] for c in checks) else "FAILED or not run", flush=True)
    print(f"done in {time.time() - t_start:.0f} s; {path}", flush=True)


if __name__ == "__main__":
    main()
