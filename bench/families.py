"""Every model family on one GPU at 8K tokens: one dense-stage and one sparse-stage distillation step on a random
model of the family's real attention and indexer shapes.

For each family of REAL_SHAPES (one entry per family of `distill.adapters.FAMILIES`): a random model with the real
model's attention heads, MLA head dims, q / kv LoRA ranks, indexer heads and dim, top-k and the family's own keys
(HY-V4's hyper-connection streams, A.X-K2's gated-norm rank; sinks and output gates come with the family's
modules), bench.real_scale's narrow rest (hidden 1024, vocabulary 4096, dense MLP at layer 0 then 4 small experts),
8 layers under FSSSFSSS (retention 1/4, two groups of four), bf16, built on the GPU. Per stage, after a warm-up
step of both stages at T: one optimizer step (streamed forward + backward + AdamW on the F indexers, fused
kernels) timed with CUDA events, its tokens/s and peak memory. A family that fails is recorded with its error and
the others still run; the JSON is rewritten after every family.

    python -m bench.families --out results/families.json      (B = 1, T = 8192; --families glm_moe_dsa,hy_v4)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import traceback
from dataclasses import dataclass, field

import torch

from bench.real_scale import model_config, timed_steps
from distill.objective import Distiller
from distill.pattern import Pattern
from train.model import build_model

LAYERS = 8
PATTERN = Pattern.uniform(LAYERS, 4)  # FSSSFSSS
MOE_FROM = 1                          # layer 0 has a dense MLP, the others the narrow MoE


@dataclass(frozen=True)
class RealShapes:
    """A family's real attention and indexer config values (and keys of its own), and where they come from.
    layer_keys: config keys that replace the bench's own (per-layer lists; None: the family's default)."""
    source: str
    attention: dict
    layer_keys: dict = field(default_factory=dict)


def _mla(heads: int, q_lora: int, kv_lora: int, nope: int, rope: int, v: int, index_heads: int, index_dim: int,
         topk: int, **own) -> dict:
    """The config keys of an MLA DSA attention: `heads` heads of q/k `nope` + `rope` and v `v`, LoRA ranks,
    `index_heads` indexer heads of `index_dim`, top-`topk`; `own`: keys of the family's own."""
    return dict(num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=q_lora, kv_lora_rank=kv_lora,
                qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v, index_n_heads=index_heads,
                index_head_dim=index_dim, index_topk=topk, **own)


REAL_SHAPES = {
    "glm_moe_dsa": RealShapes("GLM-5 (zai-org/GLM-5): transformers 5.17 GlmMoeDsaConfig defaults",
                              _mla(64, 2048, 512, 192, 64, 256, 32, 128, 2048)),
    "deepseek_v32": RealShapes("DeepSeek-V3.2 (deepseek-ai/DeepSeek-V3.2-Exp): transformers 5.17 DeepseekV32Config "
                               "defaults", _mla(128, 1536, 512, 128, 64, 128, 64, 128, 2048)),
    # every layer keeps its indexer (transformers' default indexer_types shares), so the pattern decides
    "hy_v4": RealShapes("HY-V4 (tencent/Hy4-preview): transformers 5.17 HYV4Config defaults; per-head sinks and "
                        "output gate", _mla(32, 1536, 512, 192, 64, 256, 16, 128, 2048, hc_mult=4,
                                            indexer_types=["full"] * LAYERS)),
    "deepseek_v4": RealShapes("DeepSeek-V4-Flash (deepseek-ai/DeepSeek-V4-Flash-Base): transformers 5.17 "
                              "DeepseekV4Config defaults; every bench layer a CSA layer (4:1 entries, top-512)",
                              dict(num_attention_heads=64, num_key_value_heads=1, head_dim=512, q_lora_rank=1024,
                                   partial_rotary_factor=0.125, index_n_heads=64, index_head_dim=128, index_topk=512,
                                   sliding_window=128, o_groups=8, o_lora_rank=1024, hc_mult=4,
                                   compress_rates={"compressed_sparse_attention": 4,
                                                   "heavily_compressed_attention": 128}),
                              layer_keys=dict(layer_types=["compressed_sparse_attention"] * LAYERS,
                                              mlp_layer_types=["hash_moe"] + ["moe"] * (LAYERS - 1),
                                              rope_parameters=None)),
    "axk2": RealShapes("A.X-K2 (skt/A.X-K2): transformers 5.17 AXK2Config defaults (its docstring calls the "
                       "ungrouped routing the A.X-K2-Light default); fused query + output gate",
                       _mla(32, 384, 128, 64, 32, 64, 16, 128, 2048, gated_norm_rank=16)),
}


def model_cfg(model_type: str, seq_len: int) -> dict:
    """The conf/model mapping of a family's bench model: REAL_SHAPES' attention, narrow elsewhere, LAYERS layers,
    positions up to seq_len, bf16."""
    shapes = REAL_SHAPES[model_type]
    config = {key: value for key, value in {**model_config(LAYERS, seq_len, shapes.attention, moe_from=MOE_FROM),
                                            **shapes.layer_keys}.items() if value is not None}
    return dict(type=model_type, dtype="bfloat16", init_seed=0, config=config)


def family_rows(model_type: str, seq_len: int):
    """Yield the dense and the sparse row (bench.real_scale.timed_steps) of a family's bench model at B = 1, T =
    seq_len, fused kernels."""
    cfg = model_cfg(model_type, seq_len)
    with torch.device("cuda"):  # initialised on the GPU: 128 heads of 8 layers take long on the CPU
        model = build_model(cfg, "cuda")
    distiller = Distiller(model, PATTERN, kernel="triton")
    ids = torch.randint(3, cfg["config"]["vocab_size"], (1, seq_len), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    yield from timed_steps(distiller, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--families", default=",".join(REAL_SHAPES), help="comma-separated model types")
    args = parser.parse_args()
    unknown = sorted(set(args.families.split(",")) - set(REAL_SHAPES))
    if unknown:
        parser.error(f"--families: {unknown} not among {sorted(REAL_SHAPES)}")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, seq_len=args.seq_len, batch=1,
                  pattern=str(PATTERN), families={})
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for model_type in args.families.split(","):
        entry = result["families"][model_type] = dict(source=REAL_SHAPES[model_type].source,
                                                      model=model_cfg(model_type, args.seq_len)["config"], rows=[])
        try:
            for row in family_rows(model_type, args.seq_len):
                entry["rows"].append(row)
                print(model_type, row, flush=True)
        except Exception as e:  # recorded; the next family still runs
            entry["error"] = f"{type(e).__name__}: {e}"
            print(f"{model_type} failed:\n{traceback.format_exc()}", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
