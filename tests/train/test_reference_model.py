"""The shipped reference models (models/reference, models/reference_deep) with plain transformers on the CPU in fp32:
each loads as a GlmMoeDsa, its greedy tokens and held-out losses match the values stored with it
(reference_outputs.json, written by `python -m train.pretrain stage=reference`), and its model card states those
losses."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GlmMoeDsaForCausalLM

from distill.pattern import Pattern
from tests.conftest import ROOT

MODELS = {"reference": 32 * 10**6, "reference_deep": 60 * 10**6}  # shipped model -> most bytes of its weights
LOSS_TOLERANCE = 2e-3  # nats: fp32 CPU runs on different machines and library versions agree to ~1e-6
MIN_SHARING_PENALTY = 0.1  # nats: the card's claim that retention 1/8 with untrained sharing is measurably worse


@pytest.fixture(scope="module", params=list(MODELS))
def model_dir(request) -> Path:
    return Path(ROOT) / "models" / request.param


@pytest.fixture(scope="module")
def stored(model_dir) -> dict:
    return json.loads((model_dir / "reference_outputs.json").read_text())


@pytest.fixture(scope="module")
def heldout(model_dir, stored) -> torch.Tensor:
    rows, tokens = stored["heldout_slice"]["rows"], stored["heldout_slice"]["tokens"]
    return load_file(model_dir / "heldout.safetensors")["input_ids"][:rows, :tokens].long()


def load(model_dir: Path, **config_overrides) -> GlmMoeDsaForCausalLM:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config_overrides).eval()


@pytest.fixture(scope="module")
def model(model_dir) -> GlmMoeDsaForCausalLM:
    return load(model_dir)


def heldout_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids, use_cache=False).loss.item()


def test_shipped_model_is_a_small_all_full_dsa_checkpoint(model_dir, model, heldout):
    assert (model_dir / "model.safetensors").stat().st_size <= MODELS[model_dir.name]
    assert isinstance(model, GlmMoeDsaForCausalLM)
    assert Pattern.from_indexer_types(model.config.indexer_types) == Pattern.all_full(model.config.num_hidden_layers)
    assert model.config.index_topk < heldout.shape[1] < model.config.max_position_embeddings  # DSA drops keys
    assert len(AutoTokenizer.from_pretrained(model_dir)) == model.config.vocab_size


def test_greedy_tokens_match_the_stored_ones(model_dir, model, stored):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = tokenizer(stored["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=len(stored["greedy_tokens"]), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    assert out[0, prompt.shape[1]:].tolist() == stored["greedy_tokens"]


def test_heldout_losses_match_the_model_card(model_dir, model, stored, heldout):
    layers = model.config.num_hidden_layers
    uniform = Pattern.uniform(layers, 8).indexer_types()
    losses = {
        "dense": heldout_loss(load(model_dir, index_topk=heldout.shape[1]), heldout),  # top-k of every key: dense
        "dsa_all_full": heldout_loss(model, heldout),
        "dsa_uniform_1_8": heldout_loss(load(model_dir, indexer_types=uniform), heldout),
    }
    card = (model_dir / "MODEL_CARD.md").read_text()
    for name, loss in losses.items():
        assert loss == pytest.approx(stored["heldout_loss"][name], abs=LOSS_TOLERANCE), name
        assert f"{stored['heldout_loss'][name]:.4f}" in card, f"MODEL_CARD.md does not state the {name} loss"
    assert losses["dsa_uniform_1_8"] > losses["dsa_all_full"] + MIN_SHARING_PENALTY


def test_dense_pretraining_attention_is_dense_attention_without_indexers():
    from omegaconf import OmegaConf

    from distill.evaluate import evaluate
    from train.model import build_model
    from train.pretrain import dense_attention

    model = build_model(OmegaConf.load(Path(ROOT) / "conf" / "model" / "tiny_glm.yaml"))
    ids = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    before = dict(model.named_parameters())
    with dense_attention(model):
        trained = dict(model.named_parameters())
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
    assert set(before) - set(trained) == {name for name in before if ".indexer." in name} != set()
    assert all(p.grad is not None for p in trained.values()) and all(p.grad is None for n, p in before.items()
                                                                     if n not in trained)
    assert dict(model.named_parameters()).keys() == before.keys() and model.config._attn_implementation == "sdpa"
    assert loss.item() == pytest.approx(evaluate(model, None, [ids])["loss"], abs=1e-5)
    assert evaluate(model, Pattern.all_full(8), [ids])["loss"] != pytest.approx(loss.item(), abs=1e-5)  # DSA differs
