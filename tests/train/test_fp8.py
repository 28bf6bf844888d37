"""Published block-FP8 checkpoints (docs/DESIGN.md section 7): loaded as FP8 and equal to their dequantised twin, a
2-step job that distils and exports one in its own format, transformers loading the export with the job's top-k,
and every malformed checkpoint refused before a weight loads, naming the tensor and the fix."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from distill.export import _half_to_interleaved_rope
from distill.fp8 import SCALE, BlockFp8, BlockFp8Experts, BlockFp8Linear, Fp8FormatError, scale_name
from distill.source import load_config
from kernels import reference
from tests.conftest import ROOT
from tests.fp8_checkpoint import write_fp8_checkpoint
from tests.jobs import job, jobs, metrics
from train import fp8_loader
from train.model import build_model

CONF = Path(ROOT) / "conf" / "model"


def tiny(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


def local(path, **extra) -> dict:
    return {"name": "local", "path": str(path), "type": None, "dtype": "float32", "config": {}, **extra}


# ---- the format ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, block", [((300, 200), (128, 128)), ((37, 5), (8, 16)), ((1, 129), (128, 128))])
@pytest.mark.parametrize("power_of_two", [False, True])
def test_block_quantisation_round_trips_within_fp8_rounding(shape, block, power_of_two):
    weight = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # blocks of very different scales
    quantised, scale_inv = reference.quantize_block_fp8(weight, block, power_of_two)
    assert quantised.dtype == torch.float8_e4m3fn and scale_inv.shape == BlockFp8(block).scale_shape(shape)
    if power_of_two:
        assert torch.equal(torch.exp2(torch.log2(scale_inv).round()), scale_inv)
    back = reference.dequantize_block_fp8(quantised, scale_inv, block)
    # e4m3: 3 mantissa bits (relative 2^-4 at most); below 2^-6 of the block's range, subnormal steps of 2^-9
    step = scale_inv.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]
    assert ((back - weight).abs() <= weight.abs() * 2 ** -4 + step * 2 ** -9 * 448 / 256 + 1e-12).all()


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "awq"}, "quant_method 'awq'"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt 'e5m2'"),
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size [128]"),
    ({"quant_method": "fp8", "weight_block_size": None}, "per-tensor FP8 is not supported"),
])
def test_quantization_configs_it_cannot_run_are_named(qc, message):
    with pytest.raises(Fp8FormatError, match=re.escape(message)):
        BlockFp8.of(type("Config", (), {"quantization_config": qc})())


# ---- loading ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dsv32_fp8(tmp_path_factory):
    """A DeepseekV32 checkpoint in the published layout whose blocks do not divide every weight (16 x 16 blocks
    over 40-row kv_a_proj_with_mqa, as DeepSeek-V3.2's 128 x 128 over its 576 rows), and its dequantised twin."""
    return write_fp8_checkpoint(tmp_path_factory.mktemp("dsv32_fp8"), tiny("tiny_dsv32"), block=(16, 16))


@pytest.mark.parametrize("name, block", [("tiny_glm", (8, 8)), ("tiny_dsv32", (16, 16))])
def test_fp8_model_equals_its_dequantised_twin(tmp_path, name, block):
    path, twin = write_fp8_checkpoint(tmp_path, tiny(name), block=block, power_of_two=name == "tiny_glm")
    model = build_model(local(path))
    linears = [m for m in model.modules() if isinstance(m, BlockFp8Linear)]
    # the FP8 weights kept as their bytes (distill.fp8.fp8_bits), frozen
    assert linears and all(m.weight.dtype == torch.uint8 and not m.weight.requires_grad for m in linears)
    assert any(isinstance(m, BlockFp8Experts) for m in model.modules())
    assert model.model.layers[0].self_attn.indexer.wq_b.weight.dtype == torch.float32  # dequantised: it trains
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, twin(ids).logits
    # fp32 on both sides; the FP8 model dequantises per call, the twin once: equal up to fp32 summation order
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_shared_layers_indexers_are_not_loaded(dsv32_fp8):
    path, _ = dsv32_fp8
    model = build_model(local(path), shared_layers=(1, 3))
    assert all(p.is_meta for p in model.model.layers[1].self_attn.indexer.parameters())
    assert not any(p.is_meta for p in model.model.layers[2].self_attn.indexer.parameters())


def _rewrite(path, name, change):
    """Rewrite the shard of tensor `name` with change(tensors) applied."""
    shard = json.loads((Path(path) / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(Path(path) / shard)
    change(tensors)
    save_file(tensors, Path(path) / shard, metadata={"format": "pt"})


@pytest.fixture
def fp8_copy(dsv32_fp8, tmp_path):
    path, _ = dsv32_fp8
    os.system(f"cp -r {path} {tmp_path}/ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Fails the test if any tensor is placed into the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was loaded before the checkpoint was refused")
    monkeypatch.setattr(fp8_loader._Slot, "place", refuse)


def test_corrupt_scale_is_refused_before_any_weight_loads(fp8_copy, no_weight_loads):
    name = f"model.layers.2.mlp.experts.1.down_proj.{SCALE}"
    _rewrite(fp8_copy, name, lambda t: t[name].view(-1).__setitem__(0, float("nan")))
    with pytest.raises(Fp8FormatError, match=rf"{re.escape(name)} holds scales \[nan\].*corrupt; download it again"):
        build_model(local(fp8_copy))


def test_scales_of_another_block_size_are_refused(fp8_copy, no_weight_loads):
    config = json.loads((fp8_copy / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [32, 32]
    (fp8_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(Fp8FormatError, match=r"scale_inv has shape .* another block size .* fix weight_block_size"):
        build_model(local(fp8_copy))


def test_packed_fp4_experts_are_refused_naming_the_fix(fp8_copy, no_weight_loads):
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"
    _rewrite(fp8_copy, name, lambda t: t.__setitem__(name, torch.zeros(32, 32, dtype=torch.int8)))
    with pytest.raises(Fp8FormatError, match=r"packed FP4 .* convert the experts to block-FP8 or bf16 first"):
        build_model(local(fp8_copy))


def test_missing_and_unknown_tensors_are_refused(fp8_copy, no_weight_loads):
    name = "model.layers.0.self_attn.q_b_proj.weight"
    _rewrite(fp8_copy, name, lambda t: t.__setitem__("model.layers.0.self_attn.extra.weight", t.pop(name)))
    index = fp8_copy / "model.safetensors.index.json"
    mapping = json.loads(index.read_text())
    mapping["weight_map"]["model.layers.0.self_attn.extra.weight"] = mapping["weight_map"].pop(name)
    index.write_text(json.dumps(mapping))
    with pytest.raises(Fp8FormatError, match=rf"lacks \['{re.escape(name)}'\]"):
        build_model(local(fp8_copy))


def test_zero3_partitions_each_layer_as_soon_as_it_is_read(tmp_path, monkeypatch):
    """Under ZeRO-3 the loader hands each decoder layer to the partitioner whole, once, as soon as its last tensor is
    in place: with the published layout (a shard per layer) no other layer is whole meanwhile, so loading holds one
    layer on the device, never the model. What it hands are the FP8 weights as bytes, GEMM layouts already made."""
    path, _ = write_fp8_checkpoint(tmp_path, tiny("tiny_dsv32"), block=(16, 16), by_layer=True)
    events = []  # ("placed", checkpoint tensor name) and ("partition", parameter ids), in order
    placed = fp8_loader._Units.placed
    monkeypatch.setattr(fp8_loader._Units, "placed",
                        lambda self, name: events.append(("placed", name)) or placed(self, name))

    def partition(params):
        assert all(p.dtype != torch.float8_e4m3fn for p in params)
        events.append(("partition", [id(p) for p in params]))

    config = load_config(path)
    model = fp8_loader.load_block_fp8(path, config, torch.device("cpu"), torch.float32, BlockFp8.of(config),
                                      shared_layers=(1, 3), partition=partition)
    name_of = {id(p): n for n, p in model.named_parameters()}
    handed = [name_of[i] for kind, ids in events if kind == "partition" for i in ids]
    loaded = [n for n, p in model.named_parameters() if not p.is_meta]
    assert sorted(handed) == sorted(loaded)  # every loaded parameter once; the S layers' indexers never loaded
    assert not any(".indexer." in n for n in handed if n.startswith(("model.layers.1.", "model.layers.3.")))
    layer = re.compile(r"model\.layers\.(\d+)\.")
    open_layers = set()
    for kind, what in events:
        if kind == "placed":
            m = layer.match(what)
            open_layers |= {int(m.group(1))} if m else set()
            continue
        layers = {int(layer.match(name_of[i]).group(1)) for i in what if layer.match(name_of[i])}
        assert len(layers) <= 1 and open_layers == layers, (open_layers, layers)  # this layer whole, no other
        if layers:
            n = layers.pop()
            assert sorted(name_of[i] for i in what) == sorted(x for x in loaded if x.startswith(f"model.layers.{n}."))
        open_layers -= {int(layer.match(name_of[i]).group(1)) for i in what if layer.match(name_of[i])}


# ---- the job and its export ------------------------------------------------------------------------------------
def _f_layer_topk(model, ids, layers):
    """{layer: top-k indices} of the F layers' indexers in transformers' own forward of `model`."""
    found = {}
    hooks = [model.model.layers[i].self_attn.indexer.register_forward_hook(
        lambda m, args, out, i=i: found.__setitem__(i, out)) for i in layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return found


@pytest.mark.slow
def test_fp8_backbone_partitioned_or_offloaded_trains_as_replicated(tmp_path):
    """The FP8 backbone partitioned by ZeRO-3 over two processes (each holding half of it), and offloaded to the
    host, trains as the replicated one under ZeRO-2 on one process: the same losses, gradient norms and indexers
    after dense and sparse steps of the same rows."""
    source, _ = write_fp8_checkpoint(tmp_path / "source", tiny("tiny_dsv32"), block=(8, 8))
    steps = ["model=local", f"model.path={source}", "distill.dense_steps=2", "distill.sparse_steps=1",
             "distill.pattern=FSFS", "distill.seq_len=32", "distill.lm_eval=false", "distill.log_every=1",
             "distill.save_every=3", "export.enabled=false"]
    partition_all = "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"  # the tiny model's too
    runs = {zero: tmp_path / zero for zero in ("zero2", "zero3", "zero3_offload")}
    outs = jobs(((tmp_path, runs["zero2"], *steps, "deepspeed=zero2", "distill.micro_batch_size=2"), {}),
                ((tmp_path, runs["zero3"], *steps, "deepspeed=zero3", partition_all, "distill.micro_batch_size=1"),
                 {"nproc": 2}))
    outs.append(job(tmp_path, runs["zero3_offload"], *steps, "deepspeed=zero3_offload", partition_all,
                    "distill.micro_batch_size=1", nproc=2))
    for out in outs[1:]:
        held, whole = map(float, re.search(r"backbone loaded partitioned \(([\d.]+) of ([\d.]+) MiB", out).groups())
        assert abs(held / whole - 0.5) < 0.02
    curves = {zero: [m[key] for m in metrics(run) if "train/loss" in m for key in ("train/loss", "train/grad_norm")]
              for zero, run in runs.items()}
    assert len(curves["zero2"]) == 6  # 3 steps
    saved = {zero: load_file(run / "checkpoints" / "step_3" / "indexers.safetensors") for zero, run in runs.items()}
    for zero in ("zero3", "zero3_offload"):
        assert curves[zero] == pytest.approx(curves["zero2"], rel=1e-4)
        for k in saved["zero2"]:
            torch.testing.assert_close(saved[zero][k], saved["zero2"][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fp8_job_distils_and_exports_in_the_source_format(tmp_path):
    source, _ = write_fp8_checkpoint(tmp_path / "source", tiny("tiny_dsv32"), block=(8, 8))
    run_dir = tmp_path / "run"
    # two processes under ZeRO-2: the frozen FP8 weights are broadcast as bytes, the checkpoints hold the indexers only
    out = job(tmp_path, run_dir, "model=local", f"model.path={source}", "distill.dense_steps=1",
              "distill.sparse_steps=1", "distill.pattern=FSFS", "distill.seq_len=32", "distill.lm_eval=false",
              "export.full_model=true", "deepspeed=zero2", "distill.save_every=1", nproc=2)
    assert "world 2" in out
    saved = torch.load(run_dir / "checkpoints" / "step_2" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {str(t.dtype) for t in saved["module"].values()} == {"torch.float32"}  # no FP8 backbone weight in it
    export = run_dir / "export"
    trained = load_file(export / "indexers.safetensors")
    model_dir = export / "model"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    fmt, config = BlockFp8((8, 8)), load_config(source)
    quantised = 0
    for name, weight in trained.items():
        scales = scale_name(name)
        if scales not in index:  # k_norm, weights_proj: unquantised in the source, so in the export
            continue
        with safe_open(model_dir / index[name], "pt") as f:
            fp8 = f.get_tensor(name)
        with safe_open(model_dir / index[scales], "pt") as f:
            scale = f.get_tensor(scales)
        # the export converted DeepseekV32's half-split indexer RoPE rows: compare against the converted weights
        converted = _half_to_interleaved_rope({name: weight}, config)[name]
        assert fp8.dtype == torch.float8_e4m3fn
        assert torch.equal(scale, fmt.quantize(converted)[1])  # the scales computed from the trained weights
        back = fmt.dequantize(fp8, scale, torch.float32)
        assert ((back - converted).norm() / converted.norm()) < 2 ** -4
        quantised += 1
    assert quantised == 4  # wq_b and wk of the two F layers
    # shards with no indexer tensor are the source's, byte for byte (hard links)
    source_index = json.loads((Path(source) / "model.safetensors.index.json").read_text())["weight_map"]
    untouched = {s for s in set(source_index.values())
                 if not any(".indexer." in n for n, v in source_index.items() if v == s)}
    assert untouched
    for shard in untouched:
        assert os.path.samefile(Path(source) / shard, model_dir / shard)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [8, 8]
    assert config["index_topk_pattern"] == "FSFS" and config["indexer_rope_interleave"] is True
    # transformers loads the FP8 directory (dequantising on the CPU) and selects what this framework's FP8 model of
    # the same directory selects under the pattern
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    theirs = _f_layer_topk(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), ids, (0, 2))
    ours = _f_layer_topk(build_model(local(model_dir)), ids, (0, 2))
    for layer in (0, 2):
        same = (theirs[layer].sort(-1).values == ours[layer].sort(-1).values).float().mean()
        assert same > 0.99, (layer, same)
