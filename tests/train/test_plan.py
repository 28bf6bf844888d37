"""The memory plan (train/plan.py): terms scale as the tensors they name, the job refuses a plan that does not fit
before any weight loads, and the command line prints a table for a named model. CPU only, no weights."""
import subprocess
import sys

import pytest
import torch

from distill.pattern import Pattern
from distill.source import MODEL_TYPES
from tests.conftest import ROOT
from tests.jobs import cfg
from train import plan as planning
from train.distill import prepare

TINY = {"vocab_size": 260, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4,
            "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
            "kv_lora_rank": 32, "q_lora_rank": 48, "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32,
            "index_topk": 16, "index_head_dim": 32, "index_n_heads": 4}
PATTERN = Pattern("FSSSFSSS")


def tiny(**over):
    return MODEL_TYPES["glm_moe_dsa"][0](**{**TINY, **over})


def tiny_plan(config=None, **kw):
    args = {"pattern": PATTERN, "gpu_gib": 80, "dense_seq_len": 1024, "sparse_seq_len": 1024, "weights": "bf16",
            "zero": 2}
    return planning.plan(config or tiny(), **{**args, **kw})


def stage(p, name):
    return next(s for s in p.stages if s.stage == name)


def test_tiny_plan_fits_and_names_its_terms():
    p = tiny_plan()
    assert p.fits and p.supported and p.peak > planning.FRAMEWORK_BYTES
    dense, sparse = stage(p, "dense"), stage(p, "sparse")
    assert any(k.startswith("main_q") for k in dense.terms) and any(k.startswith("target") for k in sparse.terms)
    assert "fits" in p.table()


def test_double_tokens_double_the_activations():
    one, two = tiny_plan(), tiny_plan(dense_seq_len=2048, sparse_seq_len=2048)
    for name in ("dense", "sparse"):
        a, b = stage(one, name), stage(two, name)
        for key, value in a.terms.items():
            assert b.terms[key] == 2 * value, key
        assert b.host_saved == 2 * a.host_saved
    # the group buffers: G x B x T x H x Dq x 2 bytes (nope 32 + rope 16 = 48; G = 4, H = 4)
    assert stage(one, "dense").terms["main_q [G,B,T,H,Dq]"] == 4 * 1024 * 4 * 48 * 2


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_zero3_divides_the_parameters_by_world_and_keeps_the_buffers_whole(weights):
    config = tiny()
    inv = planning.inventory(config, PATTERN, fp8=weights == "fp8")
    one = tiny_plan(config, zero=2, gpus_per_node=8, weights=weights)
    three = tiny_plan(config, zero=3, gpus_per_node=8, weights=weights)
    offload = tiny_plan(config, zero=3, gpus_per_node=8, weights=weights, offload_param=True)
    replicated = next(v for k, v in one.gpu.items() if k.startswith("weights"))
    shard = next(v for k, v in three.gpu.items() if k.startswith("weights"))
    buffers = next(v for k, v in three.gpu.items() if k.startswith("buffers"))
    assert replicated == inv.total and 0 < inv.replicated < inv.total
    assert shard == (replicated - buffers) // 8 and buffers == inv.replicated
    assert next(v for k, v in three.gpu.items() if k.startswith("gathered layers")) == 2 * max(inv.layer)
    assert next(v for k, v in offload.gpu.items() if k.startswith("weights")) == 2 * max(inv.layer)
    host = next(v for k, v in offload.host.items() if k.startswith("CPU-offloaded"))
    assert host == (inv.total - inv.replicated) * 8 // 8  # one node: its 8 ranks' shards are the whole model
    assert three.supported and offload.supported
    assert not tiny_plan(config, zero=2, offload_param=True).supported  # offload needs ZeRO-3


def test_fp8_halves_the_linear_weights():
    config = tiny(hidden_size=256, intermediate_size=512, moe_intermediate_size=128, q_lora_rank=256,
                  kv_lora_rank=128)
    bf16 = planning.inventory(config, PATTERN, fp8=False, fp32_modules=False)
    fp8 = planning.inventory(config, PATTERN, fp8=True, fp32_modules=False)
    # a layer is linear weights (halved, plus one fp32 scale per 128 x 128 block) and a few small vectors (kept)
    for b, f in zip(bf16.layer, fp8.layer):
        assert 0.5 * b <= f < 0.55 * b
    assert bf16.trainable == fp8.trainable > 0  # the indexers train in the compute dtype either way


def test_offload_saved_moves_the_saved_tensors_to_the_host():
    on, off = tiny_plan(offload_saved=True), tiny_plan(offload_saved=False)
    assert stage(on, "dense").host_saved > 0 and stage(off, "dense").host_saved == 0
    assert off.peak > on.peak


def test_a_plan_that_does_not_fit_names_settings_that_would():
    p = tiny_plan(gpu_gib=0.001)
    assert not p.fits and p.suggestions
    assert "does NOT fit" in p.table()


def test_named_models_weights():
    config, _, _ = planning.named_config("deepseek_v32", "fp8")
    inv = planning.inventory(config, Pattern.from_retention(61, 0.25), fp8=True)
    assert 620 * 2**30 < inv.total < 700 * 2**30  # 671B parameters, ~1 byte each
    p = planning.plan(config, pattern=Pattern.from_retention(61, 0.25), gpus_per_node=8, gpu_gib=141,
                      dense_seq_len=32768, sparse_seq_len=32768, zero=2, _inventory=inv)
    assert not p.fits  # 671 GB of FP8 weights do not fit one 141 GB GPU replicated
    assert any("zero3" in change for change, _, _ in p.suggestions)


def test_prepare_refuses_a_plan_that_does_not_fit(tmp_path):
    with pytest.raises(planning.PlanError, match=r"does NOT fit.*fix: .*plan\.check=false"):
        prepare(cfg("plan.gpu_gib=0.0001"), str(tmp_path / "refused"), 1, torch.device("cpu"))
    config, pattern, _, _ = prepare(cfg("plan.gpu_gib=0.0001", "plan.check=false"), str(tmp_path / "anyway"), 1,
                                    torch.device("cpu"))
    assert config.model_type == "glm_moe_dsa" and str(pattern)
    prepare(cfg("plan.gpu_gib=80"), str(tmp_path / "fits"), 1, torch.device("cpu"))


def test_command_line_prints_a_named_models_table():
    out = subprocess.run([sys.executable, "-m", "train.plan", "--model", "glm5", "--gpus", "8", "--gpu-gib", "141",
                          "--seq-len", "32768"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "GLM-5" in out and "main_q [G,B,T,H,Dq]" in out and "peak per GPU" in out
