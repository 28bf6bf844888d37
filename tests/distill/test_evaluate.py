"""distill.evaluate on tiny GlmMoeDsa / DeepseekV32 models: losses against transformers' own forwards."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import GlmMoeDsaForCausalLM

from distill.adapters import family_of
from distill.capture import Capture
from distill.evaluate import CalibrationError, evaluate, pattern_applied, plot_overlap, topk_overlap
from distill.model import NotDSAModelError, apply_pattern, dsa_attentions
from distill.pattern import Pattern, PatternError
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 40), generator=g), torch.randint(0, 256, (1, 40), generator=g)]


def native_loss(model, batches):
    """Token-mean of transformers' own shifted-label loss over the batches."""
    with torch.no_grad():
        sums = [model(input_ids=ids, labels=ids).loss.item() * ids.shape[0] * (ids.shape[1] - 1) for ids in batches]
    return sum(sums) / sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)


def native_shared_model(model, pattern):
    """transformers' GlmMoeDsa built with `indexer_types` from `model`'s weights (S layers have no indexer)."""
    config = copy.deepcopy(model.config)
    config.indexer_types = pattern.indexer_types()
    native = GlmMoeDsaForCausalLM(config).eval()
    result = native.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == []
    assert sorted({k.split(".")[2] for k in result.unexpected_keys}) == [str(i) for i in range(len(pattern))
                                                                         if i not in pattern.full_layers]
    assert all(".self_attn.indexer." in k for k in result.unexpected_keys)
    return native


def test_all_full_equals_transformers_forward(glm, dsv32, batches):
    for model in (glm, dsv32):
        metrics = evaluate(model, Pattern.all_full(len(dsa_attentions(model))), batches)
        assert metrics["loss"] == pytest.approx(native_loss(model, batches), rel=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
        assert metrics["tokens"] == sum(ids.shape[0] * (ids.shape[1] - 1) for ids in batches)


def test_shared_pattern_equals_transformers_indexer_types(glm, batches):
    pattern = Pattern.parse("FSSFSFSS")
    native = native_shared_model(glm, pattern)
    expected = native_loss(native, batches)
    assert evaluate(glm, pattern, batches)["loss"] == pytest.approx(expected, rel=1e-5)
    assert evaluate(native, pattern, batches)["loss"] == pytest.approx(expected, rel=1e-5)  # S layers without indexer
    assert abs(expected - native_loss(glm, batches)) > 1e-4  # the shared top-k changes the loss


def test_f_layer_without_an_indexer_is_refused(glm, batches):
    """A layer that the model shares (no indexer in transformers' own or under an applied pattern) can
    only be S: evaluation and the top-k overlap refuse a pattern that makes it F, naming the layer."""
    pattern = Pattern.parse("FSSFSFSS")
    applied = copy.deepcopy(glm)
    apply_pattern(applied, pattern)
    for model in (native_shared_model(glm, pattern), applied):
        for measure in (lambda m=model: evaluate(m, "FFSFSFSS", batches), lambda m=model: topk_overlap(m, batches)):
            with pytest.raises(NotDSAModelError, match="layer 1 is F in .* but the model has no indexer there"):
                measure()


def test_caller_model_is_left_unchanged(glm, dsv32, batches):
    for model, pattern in ((glm, "FSFSSFSS"), (dsv32, "FSFS")):
        indexers = [attn.indexer for attn in dsa_attentions(model)]
        skip = [getattr(attn, "skip_topk", None) for attn in dsa_attentions(model)]
        flags = [p.requires_grad for p in model.parameters()]
        types = copy.copy(getattr(model.config, "indexer_types", None))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        before = native_loss(model, batches)
        evaluate(model, pattern, batches, topk=8)
        topk_overlap(model, batches, topk=8)
        with pattern_applied(model, Pattern.parse(pattern), topk=8) as applied:
            assert (applied.relay is None) == family_of(model).shares_topk
            model(batches[0])  # transformers' own forward under the pattern
        assert [attn.indexer for attn in dsa_attentions(model)] == indexers
        assert [getattr(attn, "skip_topk", None) for attn in dsa_attentions(model)] == skip
        assert not any("forward" in vars(ix) for ix in indexers)  # the relay's wrapping is gone
        assert all(ix.index_topk == model.config.index_topk for ix in indexers)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert getattr(model.config, "indexer_types", None) == types
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert native_loss(model, batches) == before


def test_dense_mode_equals_topk_covering_every_key(glm, batches):
    dense = evaluate(glm, None, batches)
    assert dense["mode"] == "dense" and "topk_recall" not in dense
    wide = evaluate(glm, "FSSSFSSS", batches, topk=batches[0].shape[1])
    assert wide["loss"] == pytest.approx(dense["loss"], rel=1e-5)
    assert wide["topk_recall"] == pytest.approx([1.0] * 8)
    sparse = evaluate(glm, "FSSSFSSS", batches)
    assert abs(sparse["loss"] - dense["loss"]) > 1e-4
    assert all(0 < r < 1 for r in sparse["topk_recall"])


def test_topk_mass_matches_direct_computation(glm):
    """The capture's recall, mean_h exp(LSE over the top-k - LSE over all causal keys), equals the dense
    head-averaged attention summed over the top-k keys, computed directly."""
    family = family_of(glm)
    x = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(3))
    seen = {}

    class Probe(Capture):
        def sparse_attended(self, layer, forms, topk, lse):
            if layer == 2:
                q, k, _ = forms.expanded()
                seen.update(mass=self.topk_mass(forms, topk, topk_lse=lse), mass_lazy=self.topk_mass(forms, topk),
                            q=q, k=k, scale=forms.scale, topk=topk)

    with torch.no_grad():
        family.forward(glm, x, Probe(family, Pattern.parse("FFSSFSSS"), sparse=True, device=x.device, index_topk=5))
    T = x.shape[1]
    logits = torch.einsum("bthd,bshd->bhts", seen["q"], seen["k"]) * seen["scale"]
    attention = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).softmax(-1).mean(1)
    idx = seen["topk"].long()
    expected = attention.gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0).sum(-1)
    torch.testing.assert_close(seen["mass"], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["mass_lazy"], expected, rtol=1e-4, atol=1e-5)
    assert (expected < 0.999).any() and torch.allclose(expected[:, :5], torch.ones(2, 5))


def native_topk(model, ids):
    """Each layer's top-k sets from transformers' own all-F DSA forward: [L][B][T] sets of key indices."""
    sets, handles = {}, []
    for layer, attn in enumerate(dsa_attentions(model)):
        handles.append(attn.indexer.register_forward_hook(
            lambda module, args, out, layer=layer: sets.__setitem__(layer, out)))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return [[[{s for s in row if s <= t} for t, row in enumerate(batch)] for batch in sets[l].tolist()]
            for l in range(len(sets))]


def test_topk_overlap_matches_set_intersections(glm, batches):
    matrix = topk_overlap(glm, batches, chunk_size=7)
    total, rows = torch.zeros(8, 8, dtype=torch.float64), 0
    for ids in batches:
        sets = native_topk(glm, ids)
        for a in range(8):
            for c in range(8):
                total[a, c] += sum(len(x & y) / len(x) for bx, by in zip(sets[a], sets[c]) for x, y in zip(bx, by))
        rows += ids.numel()
    torch.testing.assert_close(matrix, (total / rows).float())
    torch.testing.assert_close(matrix.diagonal(), torch.ones(8))
    assert (matrix < 1).any()
    assert torch.equal(topk_overlap(glm, batches, topk=40), torch.ones(8, 8))  # every row keeps all its keys


def test_bad_input_errors(glm, batches):
    with pytest.raises(CalibrationError, match="empty"):
        evaluate(glm, "FFFFFFFF", [])
    with pytest.raises(CalibrationError, match="integer tensor"):
        evaluate(glm, "FFFFFFFF", [torch.rand(2, 8)])
    with pytest.raises(CalibrationError, match="2 tokens"):
        topk_overlap(glm, [torch.zeros(2, 1, dtype=torch.long)])
    with pytest.raises(PatternError, match="8 DSA layers"):
        evaluate(glm, "FSF", batches)
    with pytest.raises(PatternError, match="starts with S"):
        evaluate(glm, "SFFFFFFF", batches)
    with pytest.raises(ValueError, match="dense"):
        evaluate(glm, None, batches, topk=4)
    with pytest.raises(ValueError, match="topk"):
        evaluate(glm, "FFFFFFFF", batches, topk=0)


def test_plot_overlap_writes_png(tmp_path):
    path = plot_overlap(torch.rand(5, 5), str(tmp_path / "overlap.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_evaluate_entry_point_writes_metrics_heatmap_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.evaluate", "pattern=FSSFSSFS", "batches.seq_len=48", "batches.batch_size=2",
           "batches.max_batches=2", "overlap_batches=1", "device=cpu", f"cache_dir={tmp_path / 'cache'}",
           "logger=offline", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=ROOT, check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pattern"]["pattern"] == "FSSFSSFS"
    assert set(metrics) == {"pattern", "dense", "full", "topk_overlap"}
    assert metrics["pattern"]["tokens"] == 4 * 47
    assert len(metrics["pattern"]["topk_recall"]) == 8 and len(metrics["topk_overlap"]) == 8
    assert (run_dir / "topk_overlap.png").read_bytes()[:4] == b"\x89PNG"
    assert any(name.startswith("offline-run-") for name in os.listdir(run_dir / "wandb"))
