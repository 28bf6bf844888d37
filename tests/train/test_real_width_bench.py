"""bench/real_width.py's smoke mode: the whole benchmark (random FP8 and bf16 models built on the meta device and
materialised, backbone forward, dense and sparse distillation steps, profile buckets, FLOPs) at a tiny width on the
CPU, FP8 weights through the dequantising fallback."""
import json
import math

import torch

from bench import real_width
from distill.fp8 import BlockFp8Experts, BlockFp8Linear


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def test_smoke_rows_finite(tmp_path):
    out = tmp_path / "real_width.json"
    real_width.main(["--smoke", "--layers", "3", "--reps", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["pattern"] == "FSS"
    rows = result["rows"]
    assert [(r["weights"], r["stage"]) for r in rows] == [(w, s) for w in ("fp8", "bf16") for s in real_width.STAGES]
    for row in rows:
        assert row["seq_len"] == 64
        for key in ("seconds", "tokens_per_s", "peak_gib", "ratio_to_forward", "backbone_tflops", "mfu"):
            assert _finite(row[key]) and row[key] > 0, (row["weights"], row["stage"], key, row[key])
        profile = row["profile_ms"]
        buckets = [profile[b] for b in ("gemm", "attention", "moe_routing", "triton", "other")]
        assert all(_finite(b) and b >= 0 for b in buckets) and profile["total"] > 0
        assert math.isclose(sum(buckets), profile["total"])
        assert profile["gemm"] > 0  # the CPU ops are bucketed, not all 'other'
        if row["stage"] != "sparse":  # the sparse stage's attention is the reference's gather on the CPU
            assert profile["attention"] > 0
    assert all(r["ratio_to_forward"] == 1 for r in rows if r["stage"] == "forward")
    fp8, bf16 = result["models"]["fp8"]["weights_gib"], result["models"]["bf16"]["weights_gib"]
    assert fp8["float8_e4m3fn"] > 0 and "float8_e4m3fn" not in bf16 and fp8["total"] < bf16["total"]


def test_fp8_model_layout():
    """Every linear but lm_head and the indexers' is block-FP8 (the routed experts too), all materialised; the
    indexers stay trainable-dtype nn.Linear, weights_proj in fp32."""
    config = real_width.bench_config(real_width.TINY, 2)
    model = real_width.random_model(config, "fp8", torch.device("cpu"), torch.float32)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    attn, moe = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert isinstance(attn.q_b_proj, BlockFp8Linear) and isinstance(moe.shared_experts.down_proj, BlockFp8Linear)
    assert isinstance(moe.experts, BlockFp8Experts) and moe.experts.gate_proj.dtype == torch.uint8
    assert type(model.lm_head) is torch.nn.Linear and type(attn.indexer.wq_b) is torch.nn.Linear
    assert attn.indexer.weights_proj.weight.dtype == torch.float32
    assert bool((moe.gate.e_score_correction_bias == 0).all())
    hidden = real_width.backbone_forward(model, torch.randint(3, config.vocab_size, (1, 32)))
    assert hidden.shape == (1, 32, config.hidden_size) and bool(hidden.isfinite().all())


def test_forward_flops_formula():
    """DeepSeek-V3.2's per-token numbers, by hand: 186.6M attention parameters a layer, 396.4M in the dense MLP,
    398.2M active in an MoE layer (router + 9 experts of 3 x 7168 x 2048); attention 2 (T + 1) / 2 x 128 x 320."""
    config = real_width.bench_config(real_width.REAL, 2)
    T = 1024
    flops = real_width.forward_flops(config, T)
    attention_params = 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 128 * 128 * 7168
    moe = 7168 * 256 + 9 * 3 * 7168 * 2048
    assert flops["linear"] == 2 * T * (2 * attention_params + 3 * 7168 * 18432 + moe)
    assert flops["attention"] == 2 * 2 * 128 * 320 * T * (T + 1) / 2
