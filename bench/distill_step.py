"""End-to-end distillation step (capture + centroid KL losses + backward + AdamW step) in tokens/s,
fused kernels against the reference in the same run, on a random GlmMoeDsa of moderate shape.

    python -m bench.distill_step --out results/        (writes distill_step.json)
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bench.common import measure
from distill.objective import Distiller
from distill.pattern import Pattern
from train.model import build_model

# DeepSeek-V3.2 head shapes (MLA 128 nope + 64 rope, 64 indexer heads of 128, top-2048) in a narrow model.
MODEL = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, first_k_dense_replace=8,
             moe_intermediate_size=256, n_routed_experts=4, num_experts_per_tok=2, num_attention_heads=16,
             num_key_value_heads=16, q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
             v_head_dim=128, index_n_heads=64, index_head_dim=128, index_topk=2048, max_position_embeddings=16384,
             bos_token_id=0, eos_token_id=1, pad_token_id=2, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0})


def step_seconds(model, kernel: str, seq_len: int, batch: int, reps: int, sparse: bool):
    distiller = Distiller(model, Pattern.uniform(MODEL["num_hidden_layers"], 4), kernel=kernel)
    params = [p for p in distiller.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(3, MODEL["vocab_size"], (batch, seq_len), device="cuda")

    def step():
        distiller(ids, sparse=sparse).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, reps=reps, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model = build_model(dict(type="glm_moe_dsa", dtype="bfloat16", init_seed=0, config=MODEL), "cuda")
    rows = []
    for sparse in (False, True):
        for kernel in ("triton", "reference"):
            seconds, peak = step_seconds(model, kernel, args.seq_len, args.batch, args.reps, sparse)
            tokens = None if isinstance(seconds, str) else args.batch * args.seq_len / seconds
            rows.append(dict(kernel=kernel, stage="sparse" if sparse else "dense", seconds=seconds,
                             tokens_per_s=tokens, peak_gib=peak))
            print(rows[-1], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distill_step.json"), "w") as f:
        json.dump(dict(gpu=torch.cuda.get_device_name(), model=MODEL, seq_len=args.seq_len, batch=args.batch,
                       pattern="FSSSFSSS", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
