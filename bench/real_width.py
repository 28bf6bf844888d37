"""DeepSeek-V3.2 at its real width on one GPU: what a distillation step costs against the backbone's own forward.

A slice of DeepSeek-V3.2 (transformers' `deepseek_v32`, DeepseekV32Config's defaults: hidden 7168, vocabulary
129,280, 128 MLA heads of q/k 128 nope + 64 rope and v 128, q LoRA 1536, kv latent 512, indexer 64 heads of 128,
top-2048; layer 0 a dense MLP of 18432, the others MoE of 256 routed experts of 2048, 8 active, groups 8 / top 4, 1
shared expert, routed scaling 2.5) with `--layers` decoder layers, random weights made on the GPU (no checkpoint):
- fp8: every linear but `lm_head` and the indexers' a `distill.fp8.BlockFp8Linear`, every fused experts module a
  `BlockFp8Experts` (the modules `train.fp8_loader` makes of a published checkpoint), each weight drawn from
  N(0, initializer_range^2) and quantised per 128 x 128 block on the GPU, one tensor (one expert's projection) at a
  time;
- bf16: every weight in bf16 (the experts through transformers' own experts module).
Both: indexers bf16 `nn.Linear` (they train; `indexer.weights_proj` fp32, as transformers keeps it), the router's
weight random, `e_score_correction_bias` zeros, norms ones, RoPE's buffers built again on the device.

Per weights kind and T (batch 1), in one process, three rows, each timed with `bench.common.measure` (median of
--reps after --warmup) with its peak memory, then run once more under `torch.profiler`:
- forward: the backbone's own forward (the family forward of `distill.adapters` under a plain `Capture`: every
  layer's fused causal attention, no indexer, no loss, final norm; no lm_head): the cost a user cannot avoid;
- dense, sparse: one distillation step of that stage (`Distiller`'s streamed forward, the loss, backward into the
  indexer, AdamW) under the pattern F S...S: every layer served by layer 0's indexer, one group.
A row: seconds, tokens/s, peak GiB above the weights and in all, the ratio to the forward row's seconds, backbone
TFLOP/s and MFU (the backbone forward's FLOPs over the row's seconds: for a step, the share of the peak its
unavoidable part would run at), and the profiled step's CUDA kernel time in buckets (`BUCKETS`: the backbone's
GEMMs, fused attention, MoE routing and token dispatch, this repository's Triton kernels, other).

Backbone forward FLOPs (`forward_flops`), batch 1, T tokens, per layer:
    linears     2 T x (active parameters per token), attention: q_a 7168 x 1536 + q_b 1536 x 128 x 192
                + kv_a 7168 x 576 + kv_b 512 x 128 x 256 + o 128 x 128 x 7168; layer 0's MLP 3 x 7168 x 18432;
                an MoE layer's router 7168 x 256 + (8 routed + 1 shared) x 3 x 7168 x 2048
    attention   2 (Dq + Dv) H per (query, key) pair: QK^T 2 Dq, PV 2 Dv per head, Dq = 192, Dv = 128, H = 128;
                T (T + 1) / 2 causal pairs, so 2 x (T + 1) / 2 x H x (192 + 128) per token
lm_head, embedding, norms, RoPE and the indexer (which DSA inference would add) excluded. MFU against the dense
peak of an H100 / H200 SXM: 989 TFLOP/s bf16 for bf16 weights, 1979 TFLOP/s FP8 for FP8 weights (whose attention
still runs in bf16).

    python -m bench.real_width --layers 4 --seq-lens 16384 32768 --weights fp8 --out results/real_width-fp8.json
    python -m bench.real_width --layers 2 --seq-lens 16384 32768 --weights bf16 --out results/real_width-bf16.json
    python -m bench.real_width --smoke --out /tmp/real_width.json    (tiny width on the CPU, fp32: the test's run)

4 layers of FP8 weights take 36 GiB (an MoE layer's routed experts 10.5 GiB, embedding and lm_head 3.5 GiB in bf16), of
bf16 weights 69 GiB (21 GiB); a row or a weights kind that runs out of memory is recorded as 'OOM' and the others still
run. The JSON is rewritten after every row.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM
from triton.runtime.jit import JITFunction

from bench.common import measure
from bench.real_scale import optimizer_step
from distill.adapters import family_of
from distill.capture import Capture
from distill.fp8 import SCALE, BlockFp8, BlockFp8Experts, BlockFp8Linear, fp8_bits
from distill.objective import Distiller
from distill.pattern import Pattern
from distill.source import resolve_dtype
from train import fp8_loader

# DeepSeek-V3.2 (deepseek-ai/DeepSeek-V3.2-Exp): transformers 5.17 DeepseekV32Config defaults, spelled out
REAL = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "n_shared_experts": 1,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "num_attention_heads": 128,
        "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048,
        "initializer_range": 0.02}
# --smoke: the same layout at a width the CPU runs in seconds (T = 64 keeps the top-16 sparse)
TINY = {**REAL, "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128, "qk_nope_head_dim": 32,
        "qk_rope_head_dim": 16, "v_head_dim": 32, "index_n_heads": 4, "index_head_dim": 32, "index_topk": 16}
FP8_FORMAT = BlockFp8((128, 128))   # the published checkpoints' blocks
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}  # H100 / H200 SXM dense peaks
STAGES = ("forward", "dense", "sparse")
# kernel (GPU) or op (CPU smoke) name substrings, lower case, tried in this order after this repository's Triton
# kernels (TRITON_KERNELS); the rest is 'other'
BUCKETS = {
    "attention": ("flash", "cudnn", "fmha", "sdpa", "scaled_dot_product"),
    "gemm": ("gemm", "cutlass", "sm90", "nvjet", "scaled_mm", "aten::mm", "aten::bmm", "aten::addmm"),
    "moe_routing": ("topk", "sort", "bincount", "index_add", "indexfunc", "scatter", "gather", "index_select",
                    "indexselect", "index_elementwise"),
}
TRITON_KERNELS = frozenset(
    name for module in ("block_fp8", "centroid_kl", "indexer_topk", "sparse_attention", "sparse_centroid_kl")
    for name, value in vars(importlib.import_module(f"kernels.{module}")).items() if isinstance(value, JITFunction))


def bench_config(widths: dict, layers: int) -> DeepseekV32Config:
    """The DeepseekV32Config of `widths` (REAL or TINY) with `layers` decoder layers: a dense MLP at layer 0, MoE
    after it."""
    return DeepseekV32Config(**widths, num_hidden_layers=layers, first_k_dense_replace=1,
                             mlp_layer_types=["dense"] + ["sparse"] * (layers - 1), bos_token_id=0, eos_token_id=1,
                             pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


# ---- the random model ------------------------------------------------------------------------------------------
def random_model(config: DeepseekV32Config, weights: str, device: torch.device, dtype: torch.dtype,
                 seed: int = 0) -> nn.Module:
    """The causal LM of `config` on `device` in eval mode, built on the meta device and materialised there with
    random weights (see the module docstring): `weights` 'fp8' (block-FP8 frozen modules) or 'bf16' (`dtype`)."""
    with torch.device("meta"):
        model = DeepseekV32ForCausalLM(config)
    if weights == "fp8":
        _to_block_fp8(model)
    torch.manual_seed(seed)
    fp8_loader.rebuild_computed_buffers(model, device)
    _materialise(model, device, dtype, std=config.initializer_range)
    for module in model.modules():
        if isinstance(module, (BlockFp8Linear, BlockFp8Experts)):
            module.loaded()
    return model.eval()


def _to_block_fp8(model: nn.Module) -> None:
    """Swap, on the meta device, every fused experts module and every nn.Linear but lm_head and the indexers' for its
    block-FP8 form, as `train.fp8_loader` does for a published checkpoint."""
    indexers = fp8_loader.indexer_prefixes(model)
    for name, module in list(model.named_modules()):
        if name == "lm_head" or f"{name}.".startswith(indexers):
            continue
        fp8 = fp8_loader.fp8_form(module, FP8_FORMAT.block)
        if fp8 is not None:
            fp8_loader.replace_module(model, name, fp8)


def _random_fp8(rows: int, cols: int, std: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn [rows, cols], weight_scale_inv fp32 [rows / 128, cols / 128]) of an N(0, std^2) weight,
    quantised on `device`."""
    return FP8_FORMAT.quantize(torch.empty(rows, cols, device=device).normal_(0.0, std))


def _materialise(model: nn.Module, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Every tensor still on the meta device made on `device`, one at a time: FP8 weights quantised from N(0, std^2)
    (a routed expert's projection at a time), other matrices N(0, std^2) in `dtype` (fp32 where transformers keeps
    the module in fp32; buffers in their own dtype), vectors ones (norm weights) or zeros (biases,
    e_score_correction_bias)."""
    keep_fp32 = tuple(model._keep_in_fp32_modules or ()) + tuple(model._keep_in_fp32_modules_strict or ())
    for name, module in model.named_modules():
        if isinstance(module, BlockFp8Linear):
            weight, scale = _random_fp8(module.out_features, module.in_features, std, device)
            module.weight = nn.Parameter(fp8_bits(weight), requires_grad=False)
            module.register_buffer(SCALE, scale, persistent=False)
        elif isinstance(module, BlockFp8Experts):
            for proj, meta in list(module.named_parameters(recurse=False)):  # gate_proj, up_proj, down_proj
                E, rows, cols = meta.shape
                weight = torch.empty(E, rows, cols, dtype=torch.uint8, device=device)
                scale = torch.empty(FP8_FORMAT.scale_shape((E, rows, cols)), device=device)
                for e in range(E):
                    fp8, scale[e] = _random_fp8(rows, cols, std, device)
                    weight[e] = fp8_bits(fp8)
                setattr(module, proj, nn.Parameter(weight, requires_grad=False))
                module.register_buffer(f"{proj}_{SCALE}", scale, persistent=False)
        prefix = f"{name}." if name else ""
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if table is module._buffers:
                    kind = tensor.dtype
                else:
                    kind = torch.float32 if any(k in f"{prefix}{key}" for k in keep_fp32) else dtype
                made = torch.empty(tensor.shape, dtype=kind, device=device)
                if tensor.dim() > 1:
                    made.normal_(0.0, std)
                else:
                    made.fill_(1.0 if key == "weight" else 0.0)
                table[key] = nn.Parameter(made, requires_grad=False) if table is module._parameters else made


def weight_memory(model: nn.Module) -> dict[str, float]:
    """GiB of the model's parameters and buffers, by dtype ('float8_e4m3fn' for the FP8 modules' weights, kept as
    their bits in uint8; 'bfloat16', ...) and in all."""
    by_dtype: dict[str, float] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = "float8_e4m3fn" if tensor.dtype == torch.uint8 else str(tensor.dtype).removeprefix("torch.")
        by_dtype[key] = by_dtype.get(key, 0.0) + tensor.numel() * tensor.element_size() / 2**30
    return dict(by_dtype, total=sum(by_dtype.values()))


def model_info(model: nn.Module | None, weights: str, device: torch.device) -> dict:
    """What the JSON records of a built model: its weights' GiB by dtype, the routed experts' module, the device
    memory allocated; {'error': 'OOM'} for a model that did not fit (None)."""
    if model is None:
        return {"error": "OOM"}
    experts = "BlockFp8Experts" if weights == "fp8" else f"transformers {model.config._experts_implementation}"
    return {"weights_gib": weight_memory(model), "experts": experts,
            "allocated_gib": torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None}


# ---- FLOPs -----------------------------------------------------------------------------------------------------
def forward_flops(config: DeepseekV32Config, seq_len: int) -> dict[str, float]:
    """The backbone forward's FLOPs at batch 1, T = seq_len (module docstring): {'linear', 'attention', 'total'}."""
    hidden, H = config.hidden_size, config.num_attention_heads
    nope, rope, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    attention_params = (hidden * config.q_lora_rank + config.q_lora_rank * H * (nope + rope)
                        + hidden * (config.kv_lora_rank + rope) + config.kv_lora_rank * H * (nope + v)
                        + H * v * hidden)
    moe_params = (hidden * config.n_routed_experts
                  + (config.num_experts_per_tok + config.n_shared_experts) * 3 * hidden * config.moe_intermediate_size)
    mlp_params = [3 * hidden * config.intermediate_size if kind == "dense" else moe_params
                  for kind in config.mlp_layer_types]
    linear = 2 * seq_len * sum(attention_params + p for p in mlp_params)
    pairs = seq_len * (seq_len + 1) / 2
    attention = config.num_hidden_layers * 2 * (nope + rope + v) * H * pairs
    return {"linear": linear, "attention": attention, "total": linear + attention}


# ---- what runs -------------------------------------------------------------------------------------------------
def backbone_forward(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The final normed hidden states [B, T, hidden] of the backbone on ids [B, T]: the family forward with a plain
    capture (dense causal attention in every layer, no indexer)."""
    family = family_of(model)
    with torch.no_grad():
        return family.forward(model, ids, Capture(family, None, sparse=False, device=ids.device))


def timed(fn, device: torch.device, reps: int, warmup: int):
    """(median seconds, peak GiB above the allocation before) of fn(), or ('OOM', None): `bench.common.measure` on
    CUDA; on the CPU wall-clock time, and the process's resident-set high-water mark for the peak."""
    if device.type == "cuda":
        return measure(fn, reps=reps, warmup=warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def release(device: torch.device) -> None:
    """Hand what the objects just dropped held (a row or a model that ran out of memory, a finished model) back to
    the device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bucket_of(name: str) -> str:
    """The BUCKETS entry (or 'triton', 'other') of a CUDA kernel's or CPU op's name."""
    if name in TRITON_KERNELS:
        return "triton"
    lower = name.lower()
    return next((bucket for bucket, keys in BUCKETS.items() if any(k in lower for k in keys)), "other")


def profiled(fn, device: torch.device) -> dict:
    """One call of fn() under torch.profiler: {bucket: milliseconds} of CUDA kernel time (CPU op self time on the
    CPU), 'total', and 'other_top' (the five largest kernels of 'other', [name, ms]); {'error': 'OOM'} if it runs
    out of memory."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    try:
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"error": "OOM"}
    buckets = dict.fromkeys(("gemm", "attention", "moe_routing", "triton", "other"), 0.0)
    others = []
    for event in prof.key_averages():
        if event.device_type != (torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU):
            continue
        ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3
        bucket = bucket_of(event.key)
        buckets[bucket] += ms
        if bucket == "other":
            others.append([event.key[:120], ms])
    return dict(buckets, total=sum(buckets.values()), other_top=sorted(others, key=lambda o: -o[1])[:5])


def rows_at(model: nn.Module, distiller: Distiller, optimizer: torch.optim.Optimizer, config: DeepseekV32Config,
            weights: str, seq_len: int, device: torch.device, reps: int, warmup: int):
    """Yield the forward, dense and sparse rows (module docstring) at B = 1, T = seq_len."""
    ids = torch.randint(3, config.vocab_size, (1, seq_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    runs = {"forward": lambda: backbone_forward(model, ids),
            "dense": lambda: optimizer_step(distiller, optimizer, ids, sparse=False),
            "sparse": lambda: optimizer_step(distiller, optimizer, ids, sparse=True)}
    flops = forward_flops(config, seq_len)
    forward_seconds = None
    for stage in STAGES:
        seconds, peak = timed(runs[stage], device, reps=reps, warmup=warmup)
        row = {"weights": weights, "seq_len": seq_len, "stage": stage, "seconds": seconds, "peak_gib": peak,
               "peak_total_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        if not isinstance(seconds, str):  # else 'OOM': the row has its seconds and peak only
            if stage == "forward":
                forward_seconds = seconds
            tflops = flops["total"] / seconds / 1e12
            row.update(tokens_per_s=seq_len / seconds,
                       ratio_to_forward=None if forward_seconds is None else seconds / forward_seconds,
                       backbone_tflops=tflops, mfu=tflops / PEAK_TFLOPS[weights],
                       mfu_peak_tflops=PEAK_TFLOPS[weights], profile_ms=profiled(runs[stage], device))
        optimizer.zero_grad(set_to_none=True)  # the gradients of a step that ran out of memory
        release(device)  # and what it held
        yield row


# ---- the report ------------------------------------------------------------------------------------------------
def _cell(value, fmt: str) -> str:
    return value if isinstance(value, str) else "-" if value is None else format(value, fmt)


def print_row(row: dict) -> None:
    """One line of the table (header: HEADER)."""
    prof = row.get("profile_ms") or {}
    shares = [_cell(100 * prof[b] / prof["total"] if prof.get("total") else None, "5.1f")
              for b in ("gemm", "attention", "moe_routing", "triton", "other")]
    print(f"{row['weights']:5s} {row['seq_len']:7d} {row['stage']:8s} {_cell(row['seconds'], '8.3f')} "
          f"{_cell(row.get('tokens_per_s'), '9.0f')} {_cell(row['peak_gib'], '7.2f')} "
          f"{_cell(row.get('peak_total_gib'), '7.2f')} {_cell(row.get('ratio_to_forward'), '6.2f')} "
          f"{_cell(row.get('backbone_tflops'), '7.1f')} {_cell(100 * row['mfu'] if 'mfu' in row else None, '5.1f')} "
          + " ".join(f"{s:>5s}" for s in shares), flush=True)


HEADER = (f"{'kind':5s} {'T':>7s} {'stage':8s} {'s/step':>8s} {'tok/s':>9s} {'peak':>7s} {'total':>7s} "
          f"{'ratio':>6s} {'TFLOP/s':>7s} {'MFU%':>5s} {'gemm%':>5s} {'attn%':>5s} {'moe%':>5s} {'trit%':>5s} "
          f"{'oth%':>5s}\n(peak: GiB above the weights, total: with them; ratio: seconds / the forward row's; "
          "TFLOP/s and MFU: the backbone forward's FLOPs, lm_head excluded, against 989 (bf16) / 1979 (fp8) TFLOP/s; "
          "%: shares of the profiled step's kernel time)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers: one dense, the others MoE")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                        help="T values (batch 1); default 16384 32768, 64 with --smoke")
    parser.add_argument("--weights", choices=("fp8", "bf16", "both"), default="both")
    parser.add_argument("--reps", type=int, default=2, help="timed calls per row (the row reports their median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before them (they compile the kernels)")
    parser.add_argument("--out", default="results/real_width.json", help="the JSON file to write")
    parser.add_argument("--smoke", action="store_true", help="TINY width on the CPU (fp32), for the test")
    args = parser.parse_args(argv)
    if args.layers < 1:
        parser.error("--layers: at least 1")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = resolve_dtype("auto", device)
    seq_lens = args.seq_lens or ([64] if args.smoke else [16384, 32768])
    config = bench_config(TINY if args.smoke else REAL, args.layers)
    pattern = Pattern("F" + "S" * (args.layers - 1))
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "layers": args.layers,
              "batch": 1, "reps": args.reps, "warmup": args.warmup, "pattern": str(pattern),
              "peak_tflops": PEAK_TFLOPS,
              "model": {k: getattr(config, k) for k in (*REAL, "num_hidden_layers", "mlp_layer_types",
                                                        "rope_parameters")},
              "flops_per_token": {str(t): forward_flops(config, t)["total"] / t for t in seq_lens},
              "models": {}, "rows": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    print(HEADER, flush=True)
    for weights in ["fp8", "bf16"] if args.weights == "both" else [args.weights]:
        try:
            model = random_model(config, weights, device, dtype)
        except torch.OutOfMemoryError:  # the weights alone do not fit: every row of the kind is OOM
            model = None
        release(device)
        result["models"][weights] = model_info(model, weights, device)
        print(f"{weights} model: {json.dumps(result['models'][weights])}", flush=True)
        if model is None:
            result["rows"] += [{"weights": weights, "seq_len": t, "stage": stage, "seconds": "OOM", "peak_gib": None}
                               for t in seq_lens for stage in STAGES]
        else:
            distiller = Distiller(model, pattern, kernel="auto")
            optimizer = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-4)
            for seq_len in seq_lens:
                for row in rows_at(model, distiller, optimizer, config, weights, seq_len, device, args.reps,
                                   args.warmup):
                    result["rows"].append(row)
                    print_row(row)
                    save()
            del model, distiller, optimizer
            release(device)
        save()


if __name__ == "__main__":
    main()
