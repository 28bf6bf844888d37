"""distill.search on tiny models: prefix-cached and naive greedy search agree, and match distill.evaluate;
the train.search app writes its files."""
import itertools
import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from distill.evaluate import CalibrationError, evaluate
from distill.pattern import Pattern, PatternError
from distill.search import SearchError, calibration_loss, greedy_search, similarity_search, uniform_patterns
from tests.conftest import ROOT, tiny
from train.search import run_search


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (1, 32), generator=g)]


@pytest.fixture(scope="module")
def glm_searches(glm, batches):
    return (greedy_search(glm, batches, 0.25, prefix_cache=True),
            greedy_search(glm, batches, 0.25, prefix_cache=False))


def test_prefix_cached_and_naive_search_agree(glm_searches, dsv32, batches):
    cached, naive = glm_searches
    assert [(s["pattern"], s["loss"]) for s in cached] == [(s["pattern"], s["loss"]) for s in naive]
    assert sum(s["layer_forwards"] for s in cached) < sum(s["layer_forwards"] for s in naive)
    cached = greedy_search(dsv32, batches, 0.25, prefix_cache=True)
    naive = greedy_search(dsv32, batches, 0.25, prefix_cache=False)
    assert [(s["pattern"], s["loss"]) for s in cached] == [(s["pattern"], s["loss"]) for s in naive]
    assert cached[-1]["pattern"].count("F") == 1
    for step in cached:
        assert evaluate(dsv32, step["pattern"], batches)["loss"] == pytest.approx(step["loss"], rel=1e-5)


def test_greedy_steps_convert_one_layer_each_and_match_evaluate(glm, glm_searches, batches):
    steps = glm_searches[0]
    assert steps[0]["pattern"] == "FFFFFFFF"
    assert [s["retention"] for s in steps] == [(8 - i) / 8 for i in range(7)]
    for before, after in itertools.pairwise(steps):
        changed = [i for i, (a, b) in enumerate(zip(before["pattern"], after["pattern"])) if a != b]
        assert len(changed) == 1 and changed[0] > 0 and before["pattern"][changed[0]] == "F"
    for step in steps:
        assert evaluate(glm, step["pattern"], batches)["loss"] == pytest.approx(step["loss"], rel=1e-5)


def test_greedy_step_picks_the_conversion_with_least_loss(glm, glm_searches, batches):
    steps = glm_searches[0]
    for before, after in itertools.pairwise(steps[:3]):
        current = Pattern(before["pattern"])
        losses = {}
        for layer in current.full_layers[1:]:
            candidate = before["pattern"][:layer] + "S" + before["pattern"][layer + 1:]
            losses[candidate] = calibration_loss(glm, batches, candidate)
        best = min(losses, key=losses.get)
        assert after["pattern"] == best and after["loss"] == losses[best]


def test_similarity_search_merges_the_most_overlapping_pair_first(glm, batches):
    overlap = torch.rand(8, 8, generator=torch.Generator().manual_seed(2))
    steps = similarity_search(glm, batches, 0.25, overlap=overlap)
    assert steps[0]["pattern"] == "FFFFFFFF" and steps[-1]["pattern"].count("F") == 2
    for before, after in itertools.pairwise(steps):
        current = Pattern(before["pattern"])
        scores = {f: float(overlap[current.owner(f - 1), f]) for f in current.full_layers[1:]}
        layer = max(scores, key=scores.get)
        assert after["pattern"] == before["pattern"][:layer] + "S" + before["pattern"][layer + 1:]
        assert after["overlap"] == scores[layer]
        assert after["loss"] == calibration_loss(glm, batches, after["pattern"])


def test_uniform_patterns_are_distinct_uniform_rules():
    for num_layers in range(1, 12):
        patterns = uniform_patterns(num_layers)
        counts = [len(p.full_layers) for p in patterns]
        assert counts == sorted(set(counts), reverse=True)
        assert str(patterns[0]) == "F" * num_layers and str(patterns[-1]) == "F" + "S" * (num_layers - 1)
        assert all(any(p == Pattern.uniform(num_layers, n) for n in range(1, num_layers + 1)) for p in patterns)


def test_bad_input_errors(glm, batches):
    for target in (0.1, 0.0, 1.5, -1):
        with pytest.raises(SearchError, match="cannot be reached"):
            greedy_search(glm, batches, target)
    with pytest.raises(CalibrationError, match="empty"):
        greedy_search(glm, [], 0.5)
    with pytest.raises(PatternError, match="8 DSA layers"):
        calibration_loss(glm, batches, "FSFS")


def test_search_entry_point_writes_json_and_plot(tmp_path):
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("search", overrides=["target_retention=0.5", "compare_naive=true", "batches.seq_len=32",
                                           "batches.batch_size=2", "batches.max_batches=1", "device=cpu",
                                           f"cache_dir={tmp_path / 'cache'}", "logger=disabled"])
    run_dir = tmp_path / "run"
    run_search(cfg, str(run_dir))
    result = json.loads((run_dir / "search.json").read_text())
    assert set(result) == {"greedy", "uniform", "similarity", "cost"}
    assert result["cost"]["identical"] is True
    assert result["cost"]["naive"]["layer_forwards"] > result["cost"]["prefix_cache"]["layer_forwards"]
    for name in ("greedy", "uniform", "similarity"):
        assert all(Pattern.parse(s["pattern"], 8).retention == s["retention"] >= 0.5 for s in result[name])
    assert result["greedy"][-1]["retention"] == 0.5
    assert (run_dir / "search.png").read_bytes()[:4] == b"\x89PNG"


def test_deepseek_v4_search_resumes_at_its_csa_layers(batches):
    """DeepSeek-V4: the pattern runs over the CSA layers only, with HCA and sliding-window layers between them; the
    prefix cache (per decoder layer) resumes a candidate at its CSA layer's decoder layer and agrees with the naive
    search and with distill.evaluate."""
    v4 = tiny("tiny_dsv4")
    unpacked = [b[:, :32] for b in batches]
    cached = greedy_search(v4, unpacked, 0.5, prefix_cache=True)
    naive = greedy_search(v4, unpacked, 0.5, prefix_cache=False)
    assert [(s["pattern"], s["loss"]) for s in cached] == [(s["pattern"], s["loss"]) for s in naive]
    assert len(cached) > 1 and sum(s["layer_forwards"] for s in cached) < sum(s["layer_forwards"] for s in naive)
    for step in cached:
        assert evaluate(v4, step["pattern"], unpacked)["loss"] == pytest.approx(step["loss"], rel=1e-5)
