"""Every family end to end on the CPU: the distillation job, in this process, for one dense and one sparse step on
the family's tiny config, ending in an export that is checked; and the GPU benchmark's real-shape models
(bench/families.py) built on the meta device, so that script cannot rot unseen."""
import json
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from bench import families as bench_families
from distill.adapters import FAMILIES, family_of
from distill.export import load_indexers_into
from distill.model import dsa_attentions
from distill.objective import Distiller
from distill.pattern import Pattern
from tests.conftest import ROOT, tiny
from train.distill import prepare, run
from train.model import build_model

pytestmark = pytest.mark.slow  # jobs in processes of their own, or the whole job in this one

# the tiny config (conf/model/) of every family
TINY = {"glm_moe_dsa": "tiny_glm", "deepseek_v32": "tiny_dsv32", "hy_v4": "tiny_hy_v4", "axk2": "tiny_axk2",
        "deepseek_v4": "tiny_dsv4"}
# one dense and one sparse step of one 32-token row, one validation batch at the end, two groups; no warm-up
# (the other job tests warm up), so both steps train at the full rate
STEPS = ["data=stdlib_small", "distill.seq_len=32", "distill.micro_batch_size=1", "distill.dense_steps=1",
         "distill.sparse_steps=1", "distill.warmup_steps=0", "distill.eval_batches=1", "distill.lm_eval=false",
         "distill.retention=0.5", "logger=disabled", "resume=never"]


def test_every_family_has_a_tiny_config_and_a_bench_model():
    assert sorted(TINY) == sorted(FAMILIES) == sorted(bench_families.REAL_SHAPES)
    for model_type, name in TINY.items():
        assert OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{name}.yaml")).type == model_type


def cfg(model_type, *overrides):
    """The job's config for the family's tiny model and STEPS, the defaults otherwise (data.document_mask: null, on
    where the family's forward keeps packed documents apart)."""
    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("config", overrides=[f"model={TINY[model_type]}", *STEPS, *overrides])


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    """What the job sets in its process, undone after this module: the rendezvous variables (a free port), the
    data cache, the process group DeepSpeed starts (gloo), the SIGTERM handler; one intra-op thread, as the
    subprocess jobs of test_job run (the tiny matmuls only lose to threads spinning on a busy CPU)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sigterm, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                           "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu",
                           "INDEXCACHE_CACHE": str(tmp_path_factory.mktemp("cache"))}.items():
            patch.setenv(key, value)
        yield
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGTERM, sigterm)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_two_step_job_ends_in_an_export_of_the_trained_indexers(in_process, tmp_path, model_type):
    family = family_of(model_type)
    full_model = family.export_as is not None
    run_dir = tmp_path / "run"
    run(cfg(model_type, f"export.full_model={str(full_model).lower()}"), str(run_dir))

    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["source_model"]["type"] == model_type and manifest["step"] == 2
    trained = load_file(run_dir / "checkpoints" / "step_2" / "indexers.safetensors")
    exported = load_file(run_dir / "export" / "indexers.safetensors")
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)
    backbone = tiny(TINY[model_type])  # the same random backbone, before training
    pattern = Pattern.from_retention(family.num_dsa_layers(backbone.config), 0.5)  # over the DSA layers
    decoder_layer = family.dsa_layer_ids(backbone.config)
    assert manifest["pattern"] == str(pattern) and manifest["full_layers"] == pattern.full_layers
    assert {int(k.split(".")[2]) for k in exported} == {decoder_layer[p] for p in pattern.full_layers}
    assert set(exported) <= set(backbone.state_dict())  # names exactly as in the backbone's state dict
    initial = backbone.state_dict()
    head_weights = [k for k in exported if k.endswith("weights_proj.weight")]
    assert head_weights and all(not torch.equal(exported[k], initial[k]) for k in head_weights)  # both steps trained

    if not full_model:  # no transformers class shares top-k: indexers and manifest only, full_model refused
        assert manifest["model_dir"] is None and not (run_dir / "export" / "model").exists()
        with pytest.raises(ValueError, match=f"{model_type} has no transformers class that shares top-k"):
            prepare(cfg(model_type, "export.full_model=true"), str(tmp_path / "refused"), 1, torch.device("cpu"))
        return
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model")
    assert isinstance(loaded, FAMILIES[family.export_as].causal_lm)
    assert manifest["model_dir"]["model_type"] == family.export_as
    assert loaded.config.indexer_types == manifest["indexer_types"]
    load_indexers_into(backbone, run_dir / "export")  # the distilled model, in the source's own layout
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, backbone(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", sorted(bench_families.REAL_SHAPES))
def test_bench_model_has_the_real_shapes(model_type):
    """bench/families.py's model of each family, built on the meta device (no memory) as the bench builds it on
    the GPU, carries every real value of REAL_SHAPES and takes the bench's pattern."""
    real = bench_families.REAL_SHAPES[model_type].attention
    with torch.device("meta"):
        model = build_model(bench_families.model_cfg(model_type, seq_len=8192), "meta")
        assert type(model) is family_of(model_type).causal_lm
        assert {key: getattr(model.config, key) for key in real} == real
        distiller = Distiller(model, bench_families.PATTERN, kernel="reference")  # sets the pattern's indexer_types
    assert len(dsa_attentions(model)) == bench_families.LAYERS
    assert all(hasattr(attn, "sinks") == family_of(model_type).sinks for attn in dsa_attentions(model))
    trained = distiller.indexer_state_dict()  # only the F layers' indexers train
    assert trained and {int(k.split(".")[2]) for k in trained} == set(bench_families.PATTERN.full_layers)


def test_deepseek_v4_refuses_what_its_forward_cannot_run_before_any_weight_loads(tmp_path, monkeypatch):
    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        packed = compose("config", overrides=["model=tiny_dsv4", *STEPS, "data.document_mask=true"])
    with pytest.raises(ValueError, match="deepseek_v4 forward cannot keep packed documents apart; set "
                                         "data.document_mask=false"):
        prepare(packed, str(tmp_path / "packed"), 1, torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the fused kernels on this CPU
    prepare(cfg("deepseek_v4", "distill.kernel=triton"), str(tmp_path / "fused"), 1,
            torch.device("cpu"))  # the fused kernels of both stages take compressed entries


@pytest.mark.parametrize("model_type", ["deepseek_v4", "glm_moe_dsa"])
def test_document_mask_defaults_to_what_the_family_can(tmp_path, capsys, model_type):
    """data.document_mask left null (the default) becomes the family's: off for DeepSeek-V4, said in one line, on
    for the others, said nowhere; an explicit false stays false, silently."""
    default, off = cfg(model_type), cfg(model_type, "data.document_mask=false")
    for config in (default, off):
        prepare(config, str(tmp_path), 1, torch.device("cpu"))
    said = capsys.readouterr().out
    assert default.data.document_mask is family_of(model_type).documents and off.data.document_mask is False
    assert said.count("data.document_mask=false: the deepseek_v4 forward cannot keep packed documents apart") == \
        (model_type == "deepseek_v4")
