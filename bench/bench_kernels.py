"""Fused centroid KL and top-k against their baselines at DeepSeek-V3.2 shapes, all measured in one run.

    python -m bench.bench_kernels --out results/      (then: python -m bench.report results/bench.json)

Per sequence length T (B=1, H=128, Dq=192, HI=64, D=128, k=2048, bf16):
  * torch SDPA flash-attention forward, causal, [1, 128, T, 192] q, k and v (flash needs v's head dim
    equal to q's): the yardstick;
  * fused dense centroid KL forward+backward for G served layers (LSE computed, and LSE given as the
    flash forward returns it), and the reference where asked;
  * fused top-k against materialised fp32 scores + torch.topk; fused sparse-stage fwd+bwd on that top-k.
Time is the median of CUDA-event timings, memory the peak allocated above the inputs.
Rows are appended to the JSON as they finish, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from bench.common import DSA, dsa_inputs, flash_lse, materialised_topk, measure, fwd_bwd
from kernels import reference
from kernels.centroid_kl import centroid_kl
from kernels.indexer_topk import indexer_topk


def sdpa_flash_forward(T: int, reps: int) -> dict:
    q, k, v = (torch.randn(1, DSA["H"], T, DSA["Dq"], device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION), torch.no_grad():
        seconds, peak = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
                                reps=reps, warmup=1)
    return dict(op="sdpa_flash_fwd", T=T, G=None, seconds=seconds, peak_gib=peak)


def compile_for(index, main_q, main_k, scale, topk=None, lse=None) -> None:
    """One small fused call on views of the timed tensors, in two row chunks: it compiles the kernels for
    these strides, G and chunking (int32 or int64 offsets, ...) so that no timing includes a compile."""
    n = min(index[0].shape[1], 2048)
    centroid_kl(*[t[:, :n] for t in index], main_q[:, :, :n], main_k[:, :, :n], scale,
                None if topk is None else topk[:, :n], n // 2,
                main_lse=None if lse is None else lse[..., :n]).backward()


def centroid_rows(T: int, groups: list[int], reps: int, reference_max: int, sparse: bool) -> list[dict]:
    torch.cuda.empty_cache()
    index, main_q, main_k = dsa_inputs(T, max(groups))
    scale = DSA["Dq"] ** -0.5
    rows = []
    for G in groups:
        mq, mk = main_q[:G], main_k[:G]
        compile_for(index, mq, mk, scale)
        seconds, peak = measure(fwd_bwd(lambda: centroid_kl(*index, mq, mk, scale), index), reps=reps)
        rows.append(dict(op="fused_dense_fwd_bwd", T=T, G=G, seconds=seconds, peak_gib=peak))
        print(rows[-1], flush=True)
    lse = flash_lse(main_q, main_k, scale)
    for G in groups:
        mq, mk, lse_g = main_q[:G], main_k[:G], lse[:G]
        compile_for(index, mq, mk, scale, lse=lse_g)
        seconds, peak = measure(fwd_bwd(lambda: centroid_kl(*index, mq, mk, scale, main_lse=lse_g), index),
                                reps=reps)
        rows.append(dict(op="fused_dense_fwd_bwd_given_lse", T=T, G=G, seconds=seconds, peak_gib=peak))
        print(rows[-1], flush=True)
    del lse
    if T <= reference_max:
        for G in groups:
            mq, mk = main_q[:G], main_k[:G]
            seconds, peak = measure(fwd_bwd(lambda: reference.centroid_kl(*index, mq, mk, scale), index))
            rows.append(dict(op="reference_dense_fwd_bwd", T=T, G=G, seconds=seconds, peak_gib=peak))
            print(rows[-1], flush=True)
    if sparse:
        topk = indexer_topk(*[t.detach() for t in index], DSA["k"])
        mq, mk = main_q[:1], main_k[:1]
        compile_for(index, mq, mk, scale, topk=topk)
        seconds, peak = measure(fwd_bwd(lambda: centroid_kl(*index, mq, mk, scale, topk), index), reps=reps)
        rows.append(dict(op="fused_sparse_fwd_bwd", T=T, G=1, seconds=seconds, peak_gib=peak))
        print(rows[-1], flush=True)
    return rows


def topk_rows(T: int, reps: int, baseline_max: int) -> list[dict]:
    torch.cuda.empty_cache()
    index, _, _ = dsa_inputs(T, 1, H=1)
    iq, ik, iw = [t.detach() for t in index]
    rows = []
    seconds, peak = measure(lambda: indexer_topk(iq, ik, iw, DSA["k"]), reps=reps, warmup=1)
    rows.append(dict(op="fused_topk", T=T, G=None, seconds=seconds, peak_gib=peak))
    if T <= baseline_max:
        seconds, peak = measure(lambda: materialised_topk(iq, ik, iw, DSA["k"]), reps=reps, warmup=1)
        rows.append(dict(op="materialised_topk", T=T, G=None, seconds=seconds, peak_gib=peak))
    for row in rows:
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for bench.json")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--reference-max", type=int, default=8192, help="largest T the reference runs at")
    parser.add_argument("--topk-baseline-max", type=int, default=65536)
    parser.add_argument("--sparse-seq-lens", type=int, nargs="*", default=[8192, 32768])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions below T=32K (one above)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench.json")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  shapes=DSA, rows=[])
    warm, warm_q, warm_k = dsa_inputs(1024, 1)  # compile every kernel before anything is timed
    centroid_kl(*warm, warm_q, warm_k, 0.1).backward()
    centroid_kl(*warm, warm_q, warm_k, 0.1, indexer_topk(*[t.detach() for t in warm], DSA["k"])).backward()
    reference.centroid_kl(*warm, warm_q, warm_k, 0.1).backward()
    materialised_topk(*[t.detach() for t in warm], DSA["k"])
    del warm, warm_q, warm_k
    for T in args.seq_lens:
        reps = args.reps if T < 32768 else 1
        result["rows"].append(sdpa_flash_forward(T, reps))
        print(result["rows"][-1], flush=True)
        result["rows"] += centroid_rows(T, args.groups, reps, args.reference_max, T in args.sparse_seq_lens)
        result["rows"] += topk_rows(T, reps, args.topk_baseline_max)
        torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
