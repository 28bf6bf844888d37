"""Real-scale distillation steps: DeepSeek-V3.2 attention shapes at full depth, one GPU.

A random GlmMoeDsa with DeepSeek-V3.2's attention (128 MLA heads, q/k 128 nope + 64 rope, v 128, q LoRA 1536,
kv latent 512, 64 indexer heads of 128, top-2048) and a narrow rest (hidden, dense MLP and vocabulary small
enough to fit 61 layers), under GLM-5.2's kind of pattern (transformers' rule, index_topk_freq 4 with
index_skip_topk_offset 3: F F F S S S F ...; 17 F of 61). Per stage: one optimizer step (streamed forward +
backward + AdamW on the F indexers), its peak memory and tokens/s in the steady state (the second step at T), after
a warm-up step.

    python -m bench.real_scale --layers 61 --seq-len 131072 --out results/     (one call per configuration)
    python -m bench.real_scale --layers 16 --seq-len 131072 --tiles topk_select=2048 --out results/

--tiles overrides the GPU's tiles for the run (kernels.tiles.tiles_override; recorded in the JSON), so that a tile
choice timed on one kernel by bench.tune_tiles can be timed on the whole step before it becomes a default.

Writes real_scale-<layers>x<seq_len>.json; docs/BENCHMARKS.md gathers the rows with the GPU and the command.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench.common import measure
from distill.objective import Distiller
from distill.pattern import Pattern
from kernels.tiles import parse_overrides, tiles_override
from train.model import build_model

HIDDEN = 1024
# DeepSeek-V3.2's attention and indexer (transformers' DeepseekV32Config defaults, deepseek-ai/DeepSeek-V3.2-Exp)
V32_ATTENTION = dict(num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                     qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, index_n_heads=64, index_head_dim=128,
                     index_topk=2048)
# everything but the attention: narrow hidden, MLPs, experts and vocabulary
NARROW = dict(vocab_size=4096, hidden_size=HIDDEN, intermediate_size=1024, moe_intermediate_size=256,
              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
              bos_token_id=0, eos_token_id=1, pad_token_id=2,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def model_config(layers: int, seq_len: int, attention: dict = V32_ATTENTION, moe_from: int | None = None) -> dict:
    """A transformers config mapping: `attention` (a family's real attention and indexer shapes, and any keys of
    its own) over NARROW, `layers` decoder layers, positions up to `seq_len`; dense MLPs, or NARROW's 4 experts
    from layer `moe_from` on."""
    mlp = ["dense" if moe_from is None or i < moe_from else "sparse" for i in range(layers)]
    return dict(NARROW, **attention, num_hidden_layers=layers, mlp_layer_types=mlp, max_position_embeddings=seq_len)


def real_scale_run(layers: int, seq_len: int, offload_saved: bool | str = "auto"):
    """(config, pattern, Distiller with fused kernels, ids [1, seq_len]) of the real-scale model, built on the GPU
    (a 61-layer model takes minutes to initialise on the CPU)."""
    config = model_config(layers, seq_len)
    with torch.device("cuda"):
        model = build_model(dict(type="glm_moe_dsa", dtype="bfloat16", config=config, init_seed=0), "cuda")
    pattern = Pattern.from_freq(layers, 4, "transformers", offset=3)
    distiller = Distiller(model, pattern, kernel="triton", offload_saved=offload_saved)
    ids = torch.randint(3, config["vocab_size"], (1, seq_len), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    return config, pattern, distiller, ids


def optimizer_step(distiller: Distiller, optimizer: torch.optim.Optimizer, ids: torch.Tensor, sparse: bool) -> None:
    """One distillation step: the streamed forward, backward, and the optimizer on the F indexers."""
    distiller(ids, sparse=sparse).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed_steps(distiller: Distiller, ids: torch.Tensor, stages=("dense", "sparse"), warm_tokens: int | None = None,
                steps: int | list[int] = 2):
    """Yield one row per stage: `steps` optimizer steps (or steps[i] for stages[i]; streamed forward + backward +
    AdamW on the F indexers) on ids [B, T], each timed, after a warm-up forward + backward of every stage on
    ids[:, :warm_tokens] (all of T by default) that compiles every kernel. The first step at T also allocates what
    later steps reuse (the pinned host buffers of the offloaded saved tensors, the caching allocator's blocks); the
    row's `seconds` is the last step (the steady state a run sees), `seconds_first` the first; the stages share
    those buffers (the same sizes), so a stage after another one is warm from its first step. A row: stage, steps,
    seconds (or 'OOM'), seconds_first, tokens/s, peak GiB above the allocation before the last step (the model, the
    optimizer state) and peak GiB in all."""
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for sparse in (False, True):
        distiller(ids[:, :warm_tokens], sparse=sparse).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    for i, stage in enumerate(stages):
        timings = []
        for _ in range(steps if isinstance(steps, int) else steps[i]):
            seconds, peak = measure(lambda: optimizer_step(distiller, optimizer, ids, stage == "sparse"), reps=1)
            timings.append(seconds)
            if isinstance(seconds, str):
                break
        seconds = timings[-1]
        tokens_per_s = None if isinstance(seconds, str) else ids.numel() / seconds
        yield dict(stage=stage, steps=len(timings), seconds=seconds, seconds_first=timings[0],
                   tokens_per_s=tokens_per_s, peak_gib=peak, peak_total_gib=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=61)
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--stages", default="dense,sparse")
    parser.add_argument("--steps", type=int, nargs="+", default=[2],
                        help="timed steps per stage, one number for all or one per --stages entry (a row reports the "
                             "last)")
    parser.add_argument("--tiles", nargs="*", default=[], metavar="KEY=INT",
                        help="tile overrides (fields of kernels.tiles.Tiles) for this run")
    parser.add_argument("--offload-saved", choices=("auto", "on", "off"), default="auto",
                        help="keep the indexer projections' saved inputs in pinned CPU memory until backward")
    args = parser.parse_args()
    stages = args.stages.split(",")
    if len(args.steps) not in (1, len(stages)):
        parser.error(f"--steps: one number, or one per stage of {stages}")
    steps = args.steps * len(stages) if len(args.steps) == 1 else args.steps
    offload = {"auto": "auto", "on": True, "off": False}[args.offload_saved]
    try:
        tiles = parse_overrides(args.tiles)
    except ValueError as error:
        parser.error(f"--tiles {error}")
    with tiles_override("cuda", **tiles):
        config, pattern, distiller, ids = real_scale_run(args.layers, args.seq_len, offload)
        rows = []
        # the warm-up at 4K compiles every kernel (the same specialisations as at T) at a fraction of a step at T
        for row in timed_steps(distiller, ids, stages, warm_tokens=4096, steps=steps):
            rows.append(row)
            print(row, flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"real_scale-{args.layers}x{args.seq_len}.json")
    with open(path, "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, model=config, pattern=str(pattern),
                       groups=len(pattern.full_layers), seq_len=args.seq_len, offload_saved=args.offload_saved,
                       tiles=tiles, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
