"""Block-FP8 linear at DeepSeek-V3.2's projection shapes, against the bf16 GEMM of the same weights dequantised.

For each projection [N, K] at M tokens, in one run on one GPU:
- bf16: `F.linear` with the weight dequantised to bf16 once (what a bf16 checkpoint runs; twice the weight bytes);
- fp8 gemm: `kernels.block_fp8.block_fp8_linear` through torch's block-scaled FP8 GEMM (activation quantisation
  included);
- dequant: the fallback, `kernels.reference.block_fp8_linear` (the weight dequantised to bf16 at every call);
and the error of each against an fp32 product of the dequantised weight. FLOPs = 2 M N K.

    python -m bench.fp8_linear --tokens 16384 --out results/fp8_linear.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.common import measure
from kernels import block_fp8, reference

# DeepSeek-V3.2 (hidden 7168): name -> (N, K)
SHAPES = {
    "q_a_proj": (1536, 7168), "q_b_proj": (24576, 1536), "kv_a_proj_with_mqa": (576, 7168),
    "kv_b_proj": (32768, 512), "o_proj": (7168, 16384), "dense gate/up": (18432, 7168),
    "dense down": (7168, 18432), "indexer wq_b": (8192, 1536), "indexer wk": (128, 7168),
    "expert gate+up (M/32)": (4096, 7168), "expert down (M/32)": (7168, 2048),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, M = {args.tokens}")
    print(f"{'projection':24s} {'M':>6s} {'N':>6s} {'K':>6s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'dequant ms':>10s} "
          f"{'bf16/fp8':>8s} {'fp8 TFLOP/s':>11s} {'gemm path':>9s} {'fp8 err':>8s} {'bf16 err':>8s}")
    for name, (N, K) in SHAPES.items():
        M = args.tokens // 32 if "M/32" in name else args.tokens
        w = torch.randn(N, K, device="cuda") * 0.02
        weight, scale_inv = reference.quantize_block_fp8(w, (128, 128))
        w_bf16 = reference.dequantize_block_fp8(weight, scale_inv, (128, 128), torch.bfloat16)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        gemm_scale = block_fp8.gemm_scales(scale_inv) if block_fp8.uses_gemm(weight, (128, 128)) else None
        exact = x.float() @ reference.dequantize_block_fp8(weight, scale_inv, (128, 128)).T
        fp8 = block_fp8.block_fp8_linear(x, weight, scale_inv, (128, 128), gemm_scale=gemm_scale)
        err = lambda y: ((y.float() - exact).norm() / exact.norm()).item()  # noqa: E731
        t_bf16 = measure(lambda: F.linear(x, w_bf16), reps=10, warmup=2)[0]
        t_fp8 = measure(lambda: block_fp8.block_fp8_linear(x, weight, scale_inv, (128, 128), gemm_scale=gemm_scale),
                        reps=10, warmup=2)[0]
        t_deq = measure(lambda: reference.block_fp8_linear(x, weight, scale_inv, (128, 128)), reps=10, warmup=2)[0]
        row = dict(name=name, M=M, N=N, K=K, bf16_ms=t_bf16 * 1e3, fp8_ms=t_fp8 * 1e3, dequant_ms=t_deq * 1e3,
                   fp8_tflops=2 * M * N * K / t_fp8 / 1e12, gemm=block_fp8.uses_gemm(weight, (128, 128)),
                   fp8_rel_err=err(fp8), bf16_rel_err=err(F.linear(x, w_bf16)))
        rows.append(row)
        print(f"{name:24s} {M:6d} {N:6d} {K:6d} {row['bf16_ms']:8.3f} {row['fp8_ms']:8.3f} {row['dequant_ms']:10.3f} "
              f"{t_bf16 / t_fp8:8.2f} {row['fp8_tflops']:11.0f} {str(row['gemm']):>9s} {row['fp8_rel_err']:8.4f} "
              f"{row['bf16_rel_err']:8.4f}")
    x = torch.randn(args.tokens, 7168, device="cuda", dtype=torch.bfloat16)
    t_q = measure(lambda: block_fp8.quantize_rows(x), reps=10, warmup=2)[0]
    print(f"quantize_rows [{args.tokens}, 7168]: {t_q * 1e3:.3f} ms ({x.numel() * 2 * 1.5 / t_q / 1e9:.0f} GB/s "
          "of bf16 read + fp8 written)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "quantize_rows_ms": t_q * 1e3}, f, indent=2)


if __name__ == "__main__":
    main()
