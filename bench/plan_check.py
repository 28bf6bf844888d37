"""The memory plan (train.plan) of the benchmarks' own settings, to check it against the peaks they measure.

    python -m bench.plan_check                        # bench.real_width (4 layers, FP8) and bench.real_scale rows
    python -m bench.plan_check --real-width --layers 4 --seq-len 32768 --weights fp8 --stage dense
    python -m bench.plan_check --full-size            # docs/PLAN.md's table of the published models

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
from distill.adapters import family_of
from train.plan import FP8_QUANTIZATION, GIB, Plan, allocated_peak, named_config, plan


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


def sharded(layers: int, seq_len: int, weights: str, stage: str, zero: int, offload_param: bool) -> tuple[Plan, dict]:
    """bench.sharded's setting: bench.real_width's model on one GPU under the job's DeepSpeed (`zero`, parameter
    offload), DeepSpeed's optimizer (fp32 master and moments), offload_saved on."""
    config: DeepseekV32Config = bench_config(REAL, layers)
    if weights == "fp8":
        config.quantization_config = dict(FP8_QUANTIZATION)
    result = plan(config, pattern=Pattern("F" + "S" * (layers - 1)), gpu_gib=141, weights=weights,
                  dense_seq_len=seq_len if stage == "dense" else None,
                  sparse_seq_len=seq_len if stage == "sparse" else None, zero=zero, offload_param=offload_param,
                  name=f"bench.sharded {layers} layers {weights} ZeRO-{zero}{' offload' if offload_param else ''}",
                  suggest=False)
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


FULL_SIZE = ("deepseek_v32", "glm5", "deepseek_v4")
SETTINGS = (("ZeRO-2", 2, False), ("ZeRO-3", 3, False), ("ZeRO-3 + param offload", 3, True))
LENGTHS = (("32K", 32768, 32768), ("32K dense, 128K sparse", 32768, 131072))


def full_size(host_gib: float = 2048) -> str:
    """docs/PLAN.md's table: the published models (FP8 weights, retention 1/4, B = 1, offload_saved on) on 8 and 16
    GPUs of 141 and 80 GiB, nodes of 8 GPUs with `host_gib` each, under each setting of SETTINGS and LENGTHS."""
    lines = ["| model | GPUs | GPU GiB | T | setting | peak / GPU (GiB) | host / node (GiB) | fits |",
             "|---|---|---|---|---|---|---|---|"]
    for model in FULL_SIZE:
        config, title, _ = named_config(model, "fp8")
        pattern = Pattern.from_retention(family_of(config).num_dsa_layers(config), 0.25)
        for gpus in (8, 16):
            for gpu_gib in (141, 80):
                for length, dense, sparse in LENGTHS:
                    for setting, zero, offload in SETTINGS:
                        p = plan(config, pattern=pattern, gpus_per_node=8, nodes=gpus // 8, gpu_gib=gpu_gib,
                                 host_gib=host_gib, dense_seq_len=dense, sparse_seq_len=sparse, weights="fp8",
                                 zero=zero, offload_param=offload, suggest=False)
                        host = sum(p.host.values()) / GIB
                        fits = "yes" if p.fits else "**no** (" + ("GPU" if not p.fits_gpu else "host") + ")"
                        lines.append(f"| {title.split(' (')[0]} | {gpus} | {gpu_gib} | {length} | {setting} | "
                                     f"{p.peak / GIB:.1f} | {host:.0f} | {fits} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-width", action="store_true", help="one bench.real_width row (else the default set)")
    parser.add_argument("--real-scale", action="store_true", help="one bench.real_scale row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--weights", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--stage", choices=("dense", "sparse"), default="dense")
    parser.add_argument("--full-size", action="store_true", help="the published models' table (docs/PLAN.md)")
    args = parser.parse_args(argv)
    if args.full_size:
        print(full_size())
        return
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
