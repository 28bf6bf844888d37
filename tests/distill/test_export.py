"""The export (docs/DESIGN.md section 5): round trip, transformers loading with equal logits, integrity, atomicity,
model directories written shard by shard without building the backbone, what a re-export may replace, file modes."""
import gc
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV32ForCausalLM, GlmMoeDsaForCausalLM

import distill.export as export_module
from distill.export import ExportError, consumer_lines, export, export_checkpoint, load_export, load_indexers_into, main
from distill.files import sha256_file
from distill.model import apply_pattern
from distill.pattern import Pattern
from distill.source import random_model
from tests.conftest import ROOT
from train.model import build_model
from train.tokenizer import train_bpe_tokenizer

CONF = Path(ROOT) / "conf" / "model"
PATTERNS = {"tiny_glm": "FSSFSFSS", "tiny_dsv32": "FSFS"}


def model_cfg(name: str, **config) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cfg["config"].update(config)
    return cfg


def trained_model(cfg: dict, pattern: str, seed: int = 1):
    """The backbone under `pattern` with its F indexers moved away from the init (as training does)."""
    model = build_model(cfg)
    indexers = apply_pattern(model, Pattern.parse(pattern))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for indexer in indexers.values():
            for param in indexer.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def f_indexer_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".indexer." in k}


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))


def test_round_trip(tmp_path):
    cfg = model_cfg("tiny_glm")
    model = trained_model(cfg, "FSSFSFSS")
    out = export(model, "FSSFSFSS", tmp_path / "export", model_cfg=cfg, train_config={"lr": 1e-3},
                 metrics={"loss": torch.tensor(0.5)}, step=7)
    manifest, state = load_export(out)
    expected = f_indexer_state(model)
    assert sorted(state) == sorted(expected) == manifest["indexer_weights"]["tensors"]
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and state[name].is_contiguous()
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert manifest["pattern"] == "FSSFSFSS"
    assert manifest["indexer_types"] == Pattern.parse("FSSFSFSS").indexer_types()
    assert manifest["retention"] == 3 / 8
    assert manifest["source_model"]["location"] == "random:tiny_glm"
    assert manifest["source_model"]["init_seed"] == cfg["init_seed"]
    assert manifest["training_config"] == {"lr": 1e-3} and manifest["metrics"] == {"loss": 0.5}
    assert manifest["step"] == 7 and manifest["model_dir"] is None
    assert sorted(manifest["files"]) == ["indexers.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("name", ["tiny_glm", "tiny_dsv32"])
@pytest.mark.parametrize("keep_shared", [False, True])
def test_full_model_loads_with_equal_logits(tmp_path, input_ids, name, keep_shared):
    cfg, pattern = model_cfg(name), PATTERNS[name]
    model = trained_model(cfg, pattern)
    reference = logits(model, input_ids)
    untrained = build_model(cfg)
    apply_pattern(untrained, Pattern.parse(pattern))
    assert not torch.allclose(logits(untrained, input_ids), reference), "the perturbation must change the logits"

    out = export(model, pattern, tmp_path / "export", model_cfg=cfg, full_model=True,
                 keep_shared_indexers=keep_shared)
    manifest, _ = load_export(out)
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert isinstance(loaded, GlmMoeDsaForCausalLM)
    assert loaded.config.indexer_types == Pattern.parse(pattern).indexer_types()
    assert loaded.config.index_topk_pattern == pattern
    torch.testing.assert_close(logits(loaded, input_ids), reference, rtol=1e-6, atol=1e-6)

    assert manifest["model_dir"]["converted_from"] == (None if name == "tiny_glm" else "deepseek_v32")
    assert "model/config.json" in manifest["files"]
    shared = [i for i, c in enumerate(pattern) if c == "S"]
    with safe_open(out / "model" / "model.safetensors", "pt") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if ".indexer." in k and int(k.split(".")[2]) in shared}  # noqa: SIM118
    if keep_shared:
        assert manifest["unused_shared_indexers"]["layers"] == shared
        base = build_model(cfg)
        originals = {k: v for k, v in base.state_dict().items() if ".indexer." in k and int(k.split(".")[2]) in shared}
        assert sorted(kept) == sorted(originals)
        if name == "tiny_glm":  # the DeepseekV32 rows are permuted for interleaved RoPE
            for key, tensor in originals.items():
                torch.testing.assert_close(kept[key], tensor, rtol=0, atol=0)
    else:
        assert manifest["unused_shared_indexers"] is None and kept == {}


def test_manifest_freq_only_where_the_consumer_rule_matches(tmp_path):
    cfg = model_cfg("tiny_glm")
    cases = {"sglang": Pattern.from_freq(8, 4, "sglang"), "transformers": Pattern.uniform(8, 4),
             "irregular": Pattern.parse("FSSFSFSS")}
    for label, pattern in cases.items():
        model = trained_model(cfg, str(pattern))
        manifest, _ = load_export(export(model, pattern, tmp_path / label, model_cfg=cfg))
        forms = manifest["index_topk_freq"]
        for consumer, keys in forms.items():
            rebuilt = Pattern.from_freq(8, keys["index_topk_freq"], consumer, keys.get("index_skip_topk_offset", 2))
            assert rebuilt == pattern
        assert ("sglang" in forms) == (label == "sglang")
        assert ("transformers" in forms) == (label != "irregular")
        assert manifest["consumer_lines"] == consumer_lines(pattern)


def test_consumer_lines():
    lines = consumer_lines("FSSSFSSS")
    flag, payload = lines["vllm"].split(" ", 1)
    assert flag == "--hf-overrides"
    assert json.loads(payload.strip("'")) == {"use_index_cache": True, "index_topk_pattern": "FSSSFSSS"}
    flag, payload = lines["sglang"].split(" ", 1)
    assert flag == "--json-model-override-args"
    assert json.loads(payload.strip("'")) == {"index_topk_pattern": "FSSSFSSS"}


@pytest.fixture
def small_export(tmp_path):
    cfg = model_cfg("tiny_glm")
    return export(trained_model(cfg, "FSSFSFSS"), "FSSFSFSS", tmp_path / "export", model_cfg=cfg)


def rehash(out: Path, name: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(out / name)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_hash_mismatch(small_export):
    path = small_export / "indexers.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="indexers.safetensors: sha256"):
        load_export(small_export)


def test_corrupt_safetensors_with_matching_hash(small_export):
    (small_export / "indexers.safetensors").write_bytes(b"\xff" * 64)
    rehash(small_export, "indexers.safetensors")
    with pytest.raises(ExportError, match="indexers.safetensors is not a valid safetensors"):
        load_export(small_export)


def test_missing_files(small_export):
    (small_export / "indexers.safetensors").unlink()
    with pytest.raises(ExportError, match="indexers.safetensors is missing"):
        load_export(small_export)
    (small_export / "manifest.json").unlink()
    with pytest.raises(ExportError, match="manifest.json is missing"):
        load_export(small_export)


def test_failed_write_keeps_previous_export(tmp_path, monkeypatch):
    cfg = model_cfg("tiny_glm")
    out = tmp_path / "export"
    export(trained_model(cfg, "FSSFSFSS", seed=1), "FSSFSFSS", out, model_cfg=cfg)
    _, before = load_export(out)

    def failing_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", failing_write)
    second = trained_model(cfg, "FSSFSFSS", seed=2)
    with pytest.raises(OSError, match="disk full"):
        export(second, "FSSFSFSS", out, model_cfg=cfg)
    _, after = load_export(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(os.listdir(tmp_path)) == ["export"]

    monkeypatch.undo()
    export(second, "FSSFSFSS", out, model_cfg=cfg)
    _, replaced = load_export(out)
    assert all(torch.equal(replaced[k], v) for k, v in f_indexer_state(second).items())
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.slow
def test_killed_write_keeps_previous_export(small_export):
    """SIGKILL while the new export is being written: the earlier export still loads."""
    _, before = load_export(small_export)
    script = textwrap.dedent(f"""
        import os, signal
        import distill.export as export_module
        from omegaconf import OmegaConf
        from distill.model import apply_pattern
        from distill.pattern import Pattern
        from train.model import build_model
        cfg = OmegaConf.to_container(OmegaConf.load({str(CONF / "tiny_glm.yaml")!r}))
        model = build_model(cfg)
        apply_pattern(model, Pattern.parse("FSSFSFSS"))
        real = export_module.sha256_file
        def killed(path, sync=False):
            real(path, sync)
            os.kill(os.getpid(), signal.SIGKILL)
        export_module.sha256_file = killed
        export_module.export(model, "FSSFSFSS", {str(small_export)!r}, model_cfg=cfg)
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True)
    assert result.returncode == -9, result.stderr
    _, after = load_export(small_export)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_to_replace_a_directory_that_is_not_an_export(tmp_path):
    cfg = model_cfg("tiny_glm")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an export"):
        export(trained_model(cfg, "FSSFSFSS"), "FSSFSFSS", tmp_path, model_cfg=cfg)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_needs_the_pattern_applied(tmp_path):
    cfg = model_cfg("tiny_glm")
    with pytest.raises(ExportError, match="call distill.model.apply_pattern"):
        export(build_model(cfg), "FSSFSFSS", tmp_path / "export", model_cfg=cfg)
    with pytest.raises(ExportError, match="needs full_model=True"):
        export(trained_model(cfg, "FSSFSFSS"), "FSSFSFSS", tmp_path / "export", model_cfg=cfg,
               keep_shared_indexers=True)


def test_load_indexers_into(small_export, input_ids):
    cfg = model_cfg("tiny_glm")
    reference = trained_model(cfg, "FSSFSFSS")  # the exported model (same seeds)
    fresh = build_model(cfg)
    indexers = load_indexers_into(fresh, small_export)
    assert sorted(indexers) == Pattern.parse("FSSFSFSS").full_layers
    torch.testing.assert_close(logits(fresh, input_ids), logits(reference, input_ids), rtol=0, atol=0)

    with pytest.raises(ExportError, match="4 DSA layers"):
        load_indexers_into(build_model(model_cfg("tiny_glm", num_hidden_layers=4)), small_export)
    with pytest.raises(ExportError, match="shapes that do not match"):
        load_indexers_into(build_model(model_cfg("tiny_glm", index_head_dim=32)), small_export)
    with pytest.raises(ExportError, match="holds glm_moe_dsa indexers; the model is deepseek_v32"):
        load_indexers_into(build_model(model_cfg("tiny_dsv32", num_hidden_layers=8)), small_export)
    with pytest.raises(ExportError, match="not FFSSFSSS"):
        load_indexers_into(build_model(cfg), small_export, pattern="FFSSFSSS")
    _, state = load_export(small_export)
    with pytest.raises(ExportError, match="does not match the model under pattern FFSSFSSS"):
        load_indexers_into(build_model(cfg), state, pattern="FFSSFSSS")


def fabricate_run(run_dir: Path, cfg: dict, pattern: str, step: int = 20) -> Path:
    """A run dir as the distillation job writes it: checkpoints/step_<N>/{indexers.safetensors, meta.json}."""
    model = trained_model(cfg, pattern)
    step_dir = run_dir / "checkpoints" / f"step_{step}"
    step_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in f_indexer_state(model).items()}, step_dir / "indexers.safetensors")
    meta = {"pattern": pattern, "step": step, "model": cfg, "config": {"model": cfg, "distill": {"lr": 1e-3}},
            "metrics": {"loss": 0.25}}
    (step_dir / "meta.json").write_text(json.dumps(meta))
    (run_dir / "checkpoints" / "latest").write_text(f"step_{step}\n")
    return model


def test_export_checkpoint(tmp_path, input_ids):
    cfg = model_cfg("tiny_glm")
    cfg["tokenizer"] = str(tmp_path / "tokenizer")
    tokenizer = train_bpe_tokenizer(["def f(x):\n    return x + 1\n"] * 4, 260, cfg["tokenizer"])
    model = fabricate_run(tmp_path / "run", cfg, "FSSFSFSS")
    out = export_checkpoint(tmp_path / "run", tmp_path / "export", full_model=True)
    manifest, state = load_export(out)
    assert manifest["step"] == 20 and manifest["metrics"] == {"loss": 0.25}
    assert manifest["training_config"]["distill"] == {"lr": 1e-3}
    assert all(torch.equal(state[k], v) for k, v in f_indexer_state(model).items())
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids), rtol=1e-6, atol=1e-6)
    assert "model/tokenizer.json" in manifest["files"]
    text = "return x + 1"
    assert AutoTokenizer.from_pretrained(out / "model")(text).input_ids == tokenizer(text).input_ids


def test_export_checkpoint_errors(tmp_path):
    cfg = model_cfg("tiny_glm")
    fabricate_run(tmp_path / "run", cfg, "FSSFSFSS")
    step_dir = tmp_path / "run" / "checkpoints" / "step_20"
    meta = json.loads((step_dir / "meta.json").read_text())

    meta["pattern"] = "FFSSFSSS"  # a checkpoint that claims another pattern than its weights
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="does not fit its own model config"):
        export_checkpoint(step_dir, tmp_path / "export")
    meta["pattern"] = "FSSF"
    (step_dir / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="4-layer pattern"):
        export_checkpoint(step_dir, tmp_path / "export")
    (step_dir / "indexers.safetensors").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="indexers.safetensors is not a valid safetensors"):
        export_checkpoint(step_dir, tmp_path / "export")
    (step_dir / "indexers.safetensors").unlink()
    with pytest.raises(ExportError, match="indexers.safetensors is missing"):
        export_checkpoint(step_dir, tmp_path / "export")
    with pytest.raises(ExportError, match="neither a checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "export")
    (step_dir / "meta.json").write_text("{garbage")
    with pytest.raises(ExportError, match="step_20' is damaged: meta.json is unreadable"):
        export_checkpoint(step_dir, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_the_random_model_has_one_builder():
    """train.model.build_model's random model is distill.source.random_model's (the export rebuilds it from there):
    the same weights, RoPE frequencies in fp32 under a bf16 cast; the export's rebuild leaves the global RNG alone."""
    cfg = model_cfg("tiny_glm")
    cfg["dtype"] = "bfloat16"
    built = build_model(cfg)
    rng = torch.get_rng_state()
    rebuilt = random_model(cfg)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, rebuilt.state_dict()[k]) for k, v in built.state_dict().items())
    for model in (built, rebuilt):
        freqs = [m.inv_freq for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
        assert freqs and all(f.dtype == torch.float32 for f in freqs)
        assert next(model.parameters()).dtype == torch.bfloat16


def test_cli(tmp_path, capsys):
    cfg = model_cfg("tiny_glm")
    fabricate_run(tmp_path / "run", cfg, "FSSFSFSS")
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--full-model",
                 "--keep-shared-indexers"]) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "export") in printed
    for line in consumer_lines("FSSFSFSS").values():
        assert line in printed
    manifest, _ = load_export(tmp_path / "export")
    assert manifest["unused_shared_indexers"]["layers"] == [1, 2, 4, 6, 7]

    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "other")]) == 1
    assert "neither a checkpoint" in capsys.readouterr().err


# ---- export from a model directory's shards -----------------------------------------------------------
MODEL_CLASSES = (GlmMoeDsaForCausalLM, DeepseekV32ForCausalLM)


def save_source_dir(model_dir: Path, name: str, dtype: torch.dtype, max_shard_size: str, **config) -> dict:
    """A model directory of a random `name` in several shards, as a downloaded checkpoint has it: a tokenizer,
    and tensors transformers does not load (an MTP layer's projection and indexer, in a shard that also holds
    indexers). Returns its conf/model mapping."""
    cfg = model_cfg(name, **config)
    build_model(cfg).to(dtype).save_pretrained(model_dir, max_shard_size=max_shard_size)
    train_bpe_tokenizer(["def f(x):\n    return x + 1\n"] * 4, 260, str(model_dir))
    index_file = model_dir / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"]["model.layers.1.self_attn.indexer.wk.weight"]
    tensors = load_file(model_dir / shard)
    generator = torch.Generator().manual_seed(3)
    for extra in mtp_tensors(cfg["config"]["num_hidden_layers"]):
        tensors[extra] = torch.randn(16, cfg["config"]["hidden_size"], generator=generator).to(dtype)
        index["weight_map"][extra] = shard
    save_file(tensors, model_dir / shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    return {**model_cfg("local"), "path": str(model_dir), "type": cfg["type"], "name": name}


def mtp_tensors(num_layers: int) -> list[str]:
    """The names of the MTP-style tensors `save_source_dir` adds to a model of `num_layers` layers."""
    return [f"model.layers.{num_layers}.eh_proj.weight", f"model.layers.{num_layers}.self_attn.indexer.wk.weight"]


def shard_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory by name (tests only: small models)."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(load_file(model_dir / shard))
    assert sorted(tensors) == sorted(index)
    return tensors


def half_to_interleaved_rows(head_dim: int, rope: int = 8) -> torch.Tensor:
    """The row order that turns a half-split RoPE head (tiny models: 8 rope dims first) into an interleaved one."""
    order = torch.arange(head_dim)
    order[:rope] = torch.stack([torch.arange(rope // 2), torch.arange(rope // 2, rope)], dim=-1).flatten()
    return order


def raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def pattern_layer_indexer(name: str, num_layers: int) -> int | None:
    if not name.startswith("model.layers.") or ".indexer." not in name:
        return None
    layer = int(name.split(".")[2])
    return layer if layer < num_layers else None


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    """{name: conf/model mapping} of sharded model directories: a bf16 GlmMoeDsa and an fp32 DeepseekV32."""
    root = tmp_path_factory.mktemp("sources")
    return {"tiny_glm": save_source_dir(root / "glm", "tiny_glm", torch.bfloat16, "100KB"),
            "tiny_dsv32": save_source_dir(root / "dsv32", "tiny_dsv32", torch.float32, "100KB")}


def forbid_building(monkeypatch) -> None:
    """Make building any backbone (weights or not) fail."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("the export built the backbone")
    for cls in MODEL_CLASSES:
        monkeypatch.setattr(cls, "__init__", refuse)


@pytest.mark.parametrize("name,keep_shared", [("tiny_glm", False), ("tiny_dsv32", True)])
def test_full_model_from_shards(tmp_path, monkeypatch, source_dirs, input_ids, name, keep_shared):
    cfg, pattern = source_dirs[name], PATTERNS[name]
    source, letters = Path(cfg["path"]), PATTERNS[name]
    trained = fabricate_run(tmp_path / "run", cfg, pattern)
    checkpoint = load_file(tmp_path / "run" / "checkpoints" / "step_20" / "indexers.safetensors")
    with monkeypatch.context() as patch:
        forbid_building(patch)
        out = export_checkpoint(tmp_path / "run", tmp_path / "export", full_model=True,
                                keep_shared_indexers=keep_shared)
    manifest, _ = load_export(out)
    model_dir = out / "model"
    dtype = torch.bfloat16 if name == "tiny_glm" else torch.float32
    assert manifest["model_dir"]["dtype"] == str(dtype).removeprefix("torch.")
    assert manifest["model_dir"]["converted_from"] == (None if name == "tiny_glm" else "deepseek_v32")

    source_index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    num_layers = len(letters)
    by_shard = {}
    for tensor_name, shard in source_index.items():
        by_shard.setdefault(shard, []).append(tensor_name)
    unchanged = [s for s, names in by_shard.items() if all(pattern_layer_indexer(n, num_layers) is None for n in names)]
    assert len(by_shard) >= 3 and unchanged and len(unchanged) < len(by_shard)
    for shard in unchanged:
        assert (os.path.samefile(source / shard, model_dir / shard)
                or (source / shard).read_bytes() == (model_dir / shard).read_bytes())

    before, after = shard_tensors(source), shard_tensors(model_dir)
    for tensor_name, tensor in before.items():
        layer = pattern_layer_indexer(tensor_name, num_layers)
        if tensor_name == mtp_tensors(num_layers)[1] and name == "tiny_dsv32":  # its own, in GlmMoeDsa's layout
            torch.testing.assert_close(after[tensor_name], tensor[half_to_interleaved_rows(tensor.shape[0])], rtol=0,
                                       atol=0)
        elif layer is None:  # every other tensor, the MTP ones included: byte for byte
            assert raw_bytes(after[tensor_name]) == raw_bytes(tensor), tensor_name
        elif letters[layer] == "S":
            assert (tensor_name in after) == keep_shared, tensor_name
        elif name == "tiny_glm":  # DeepseekV32 rows are permuted for interleaved RoPE: the logits check them
            assert after[tensor_name].dtype == dtype
            torch.testing.assert_close(after[tensor_name], checkpoint[tensor_name].to(dtype), rtol=0, atol=0)
    assert all(extra in after for extra in mtp_tensors(num_layers))
    assert manifest["unused_shared_indexers"] == (
        {"layers": [i for i, c in enumerate(letters) if c == "S"], "note": export_module.UNUSED_NOTE}
        if keep_shared else None)

    for copied in ("tokenizer.json", "generation_config.json"):
        assert (model_dir / copied).read_bytes() == (source / copied).read_bytes()
        assert f"model/{copied}" in manifest["files"]
    text = "return x + 1"
    assert (AutoTokenizer.from_pretrained(model_dir)(text).input_ids
            == AutoTokenizer.from_pretrained(source)(text).input_ids)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert isinstance(loaded, GlmMoeDsaForCausalLM) and loaded.dtype == dtype
    assert loaded.config.indexer_types == Pattern.parse(pattern).indexer_types()
    assert loaded.config.index_topk_pattern == pattern
    reference = build_model({**cfg, "dtype": str(dtype).removeprefix("torch.")})
    load_indexers_into(reference, checkpoint, pattern)
    untrained = build_model({**cfg, "dtype": str(dtype).removeprefix("torch.")})
    apply_pattern(untrained, Pattern.parse(pattern))
    assert not torch.allclose(logits(untrained, input_ids), logits(reference, input_ids))
    torch.testing.assert_close(logits(loaded, input_ids), logits(reference, input_ids), rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(logits(loaded, input_ids), logits(trained, input_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_glm", "tiny_dsv32"])
def test_indexer_export_of_a_model_dir_builds_no_backbone(tmp_path, monkeypatch, source_dirs, name):
    cfg, pattern = source_dirs[name], PATTERNS[name]
    fabricate_run(tmp_path / "run", cfg, pattern)
    checkpoint = load_file(tmp_path / "run" / "checkpoints" / "step_20" / "indexers.safetensors")
    forbid_building(monkeypatch)
    manifest, state = load_export(export_checkpoint(tmp_path / "run", tmp_path / "export"))
    assert sorted(state) == sorted(checkpoint) == manifest["indexer_weights"]["tensors"]
    assert all(torch.equal(state[k], v) for k, v in checkpoint.items())
    assert manifest["source_model"]["type"] == cfg["type"] and manifest["source_model"]["location"] == cfg["path"]
    assert manifest["indexer_weights"]["rope_layout"] == ("interleave" if name == "tiny_glm" else "half")
    assert manifest["num_layers"] == len(pattern) and manifest["model_dir"] is None

    step_dir = tmp_path / "run" / "checkpoints" / "step_20"
    renamed = {k.replace("layers.0.", "layers.1."): v for k, v in checkpoint.items()}
    save_file(renamed, step_dir / "indexers.safetensors")
    with pytest.raises(ExportError, match="does not fit its own model config"):
        export_checkpoint(step_dir, tmp_path / "other")


def test_full_model_of_a_live_model_from_a_single_file(tmp_path, input_ids):
    """export() of a loaded model with a path takes model/ from the directory (one bf16 model.safetensors, no
    index): the dtype and the MTP tensor stay; hidden entries there (a download cache) are not copied."""
    source = tmp_path / "source"
    build_model(model_cfg("tiny_dsv32")).to(torch.bfloat16).save_pretrained(source)
    tensors = load_file(source / "model.safetensors")
    mtp = torch.randn(16, 64).to(torch.bfloat16)
    save_file({**tensors, "model.layers.4.eh_proj.weight": mtp}, source / "model.safetensors",
              metadata={"format": "pt"})
    (source / ".cache").mkdir()
    (source / ".cache" / "download.lock").write_text("")
    cfg = {**model_cfg("local"), "path": str(source), "type": "deepseek_v32", "name": "dsv32"}
    trained = trained_model(cfg, "FSFS")  # fp32, as on the CPU
    out = export(trained, "FSFS", tmp_path / "export", model_cfg=cfg, full_model=True)
    assert sorted(p.name for p in (out / "model").iterdir()) == ["config.json", "generation_config.json",
                                                                  "model.safetensors"]
    written = load_file(out / "model" / "model.safetensors")
    assert raw_bytes(written["model.layers.4.eh_proj.weight"]) == raw_bytes(mtp)
    assert not [k for k in written if k.startswith(("model.layers.1.", "model.layers.3.")) and ".indexer." in k]
    loaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert loaded.dtype == torch.bfloat16
    reference = build_model({**cfg, "dtype": "bfloat16"})
    load_indexers_into(reference, f_indexer_state(trained), "FSFS")
    torch.testing.assert_close(logits(loaded, input_ids), logits(reference, input_ids), rtol=1e-5, atol=1e-5)


def rss_kib(field: str) -> int:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def test_full_model_peak_memory_is_about_one_shard(tmp_path):
    """The export reads and writes shard by shard: its peak resident memory stays a few shards above where it
    started, far below the whole model (measured with the kernel's high-water mark, which clear_refs resets)."""
    clear_refs = Path("/proc/self/clear_refs")
    if not os.access(clear_refs, os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    cfg = save_source_dir(tmp_path / "source", "tiny_glm_dense", torch.float32, "14MB", intermediate_size=16384,
                          num_hidden_layers=10, first_k_dense_replace=10)
    fabricate_run(tmp_path / "run", cfg, "FSSFSFSSFS")
    shards = [p.stat().st_size for p in (tmp_path / "source").glob("*.safetensors")]
    assert sum(shards) > 8 * max(shards)
    gc.collect()
    clear_refs.write_text("5")
    start = rss_kib("VmRSS")
    export_checkpoint(tmp_path / "run", tmp_path / "export", full_model=True)
    peak = (rss_kib("VmHWM") - start) * 1024
    assert peak < 4 * max(shards), f"peak {peak >> 20} MiB for shards of at most {max(shards) >> 20} MiB"
    assert load_export(tmp_path / "export")[0]["model_dir"]["dtype"] == "float32"


# ---- writing over an earlier export -------------------------------------------------------------------
def test_reexport_replaces_only_its_own_files(tmp_path):
    cfg = model_cfg("tiny_glm")
    fabricate_run(tmp_path / "run", cfg, "FSSFSFSS")
    out = export_checkpoint(tmp_path / "run", tmp_path / "export", full_model=True)
    for user_file, named in ((out / "notes.txt", "notes.txt"), (out / "model" / "README.md", "model/README.md"),
                             (out / "mine" / "data.bin", "export/mine'")):
        user_file.parent.mkdir(exist_ok=True)
        user_file.write_text("keep me")
        with pytest.raises(ExportError, match=f"{named}.* are not part of it.*move them out"):
            export_checkpoint(tmp_path / "run", out, full_model=True)
        assert user_file.read_text() == "keep me"
        load_export(out)
        user_file.unlink()
        if user_file.parent != out and user_file.parent != out / "model":
            user_file.parent.rmdir()

    with pytest.raises(ExportError, match="full model directory .* --full-model"):
        export_checkpoint(tmp_path / "run", out)
    assert load_export(out)[0]["model_dir"] is not None
    export_checkpoint(tmp_path / "run", out, full_model=True)  # the export's own files: replaced
    shutil.rmtree(out / "model")  # dropped by hand: an export without model/ may replace it
    export_checkpoint(tmp_path / "run", out)
    assert load_export(out)[0]["model_dir"] is None and not (out / "model").exists()
    assert sorted(os.listdir(tmp_path)) == ["export", "run"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_files_follow_the_umask(tmp_path, umask):
    cfg = model_cfg("tiny_glm")
    fabricate_run(tmp_path / "run", cfg, "FSSFSFSS")
    previous = os.umask(umask)
    try:
        out = export_checkpoint(tmp_path / "run", tmp_path / "export", full_model=True)
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    assert any(p.name.endswith(".safetensors") for p in paths)
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path}: {oct(path.stat().st_mode)}"
