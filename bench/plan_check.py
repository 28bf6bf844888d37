"""The memory plan (train.plan) of the benchmarks' own settings, to check it against the peaks they measure.

    python -m bench.plan_check                        # bench.real_width (4 layers, FP8) and bench.real_scale rows
    python -m bench.plan_check --real-width --layers 4 --seq-len 32768 --weights fp8 --stage dense

Each row: the two numbers the bench reports (peak GiB allocated above the weights and optimizer state, and in all;
`train.plan.allocated_peak`), as the plan predicts them. bench.real_width writes the same prediction beside each
measured row.
"""
from __future__ import annotations

import argparse

from transformers import DeepseekV32Config

from bench.real_scale import model_config as narrow
from bench.real_width import REAL, bench_config
from distill.pattern import Pattern
from distill.source import MODEL_TYPES
from train.plan import FP8_QUANTIZATION, Plan, allocated_peak, plan


def real_width(layers: int, seq_len: int, weights: str, stage: str) -> tuple[Plan, dict]:
    """bench.real_width's setting: DeepSeek-V3.2 at real width, `layers` layers, batch 1, pattern F + S x (layers
    - 1), torch AdamW, offload_saved on (CUDA)."""
    config: DeepseekV32Config = bench_config(REAL, layers)
    if weights == "fp8":
        config.quantization_config = dict(FP8_QUANTIZATION)
    result = plan(config, pattern=Pattern("F" + "S" * (layers - 1)), gpu_gib=141, weights=weights,
                  dense_seq_len=seq_len if stage == "dense" else None,
                  sparse_seq_len=seq_len if stage == "sparse" else None, zero=1, optimizer="torch",
                  name=f"bench.real_width {layers} layers {weights}", suggest=False)
    return result, allocated_peak(result)


def real_scale(layers: int, seq_len: int, stage: str) -> tuple[Plan, dict]:
    """bench.real_scale's setting: DeepSeek-V3.2 attention, narrow rest, bf16 random, GLM-5.2's freq-4 pattern,
    torch AdamW."""
    config = MODEL_TYPES["glm_moe_dsa"][0](**narrow(layers, seq_len))
    result = plan(config, pattern=Pattern.from_freq(layers, 4, "transformers", offset=3), gpu_gib=141,
                  weights="bf16", dense_seq_len=seq_len if stage == "dense" else None,
                  sparse_seq_len=seq_len if stage == "sparse" else None, zero=1, optimizer="torch",
                  fp32_modules=False, name=f"bench.real_scale {layers} layers", suggest=False)
    return result, allocated_peak(result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-width", action="store_true", help="one bench.real_width row (else the default set)")
    parser.add_argument("--real-scale", action="store_true", help="one bench.real_scale row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--weights", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--stage", choices=("dense", "sparse"), default="dense")
    args = parser.parse_args(argv)
    if args.real_width:
        rows = [("real_width", real_width(args.layers, args.seq_len, args.weights, args.stage))]
    elif args.real_scale:
        rows = [("real_scale", real_scale(args.layers, args.seq_len, args.stage))]
    else:
        rows = [(f"real_width 4 fp8 {stage} {T}", real_width(4, T, "fp8", stage))
                for T in (16384, 32768) for stage in ("dense", "sparse")]
        rows += [(f"real_scale {L} {stage} {T}", real_scale(L, T, stage))
                 for L, T in ((16, 32768), (16, 131072), (61, 131072)) for stage in ("dense", "sparse")]
    for name, (result, numbers) in rows:
        if args.real_width or args.real_scale:
            print(result.table())
        print(f"{name:32s} peak above base {numbers['peak_gib']:7.2f} GiB, total {numbers['peak_total_gib']:7.2f} GiB")


if __name__ == "__main__":
    main()
