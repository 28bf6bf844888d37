"""train.pretrain's dense pretraining (a tiny model, a few CPU steps) and train.paper_table's list of runs."""
import json
import os

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT
from train.data import build_corpus
from train.paper_table import BOTH, cells, stages
from train.pretrain import HELDOUT, HELDOUT_SOURCES, RECORD, pretrain

CONF = os.path.join(ROOT, "conf")
TINY = ["model.config.num_hidden_layers=2", "model.config.first_k_dense_replace=2", "model.config.hidden_size=32",
        "model.config.intermediate_size=64", "model.config.index_topk=8", "model.config.max_position_embeddings=128",
        "train.seq_len=64", "train.batch_size=2", "train.max_steps=3", "train.time_budget_s=null",
        "train.eval_every=2", "train.eval_batches=1", "train.log_every=1", "save.heldout_rows=2", "logger=disabled",
        "data.packages=[omegaconf,yaml,hydra]", "data.min_doc_tokens=0", "data.val_fraction=0.3", "device=cpu"]


def test_deep_recipe_pretrains_and_saves_a_model_with_its_heldout_rows_and_sources(tmp_path):
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("pretrain_deep", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}"])
    assert (cfg.model.config.num_hidden_layers, cfg.train.seq_len) == (2, 64)
    record = pretrain(cfg, str(tmp_path))
    out = tmp_path / "model"
    assert record["steps"] == 3 and record["tokens"] == 3 * 2 * 64
    assert [e["step"] for e in record["heldout_evals"]] == [2, 3]
    assert json.loads((out / RECORD).read_text())["steps"] == 3
    assert load_file(out / HELDOUT)["input_ids"].shape == (2, 64)
    validation = build_corpus(cfg.data, str(tmp_path / "cache" / "data"))["validation"]["source"]
    assert (out / HELDOUT_SOURCES).read_text().splitlines() == list(validation) and validation
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and next(model.parameters()).dtype == torch.float32  # phase 1: fp32


def test_deep_recipe_second_phase_starts_from_the_first_phases_model(tmp_path):
    with initialize_config_dir(CONF, version_base="1.3"):
        first = compose("pretrain_deep", overrides=[*TINY, f"cache_dir={tmp_path / 'cache'}"])
        second = compose("pretrain_deep_8k", overrides=[
            *TINY, f"cache_dir={tmp_path / 'cache'}", f"model.path={tmp_path / 'first' / 'model'}", "train.seq_len=128",
            "train.max_steps=1", "train.lr=0"])  # no update: phase 2's model is phase 1's
    assert (first.save.dtype, second.save.dtype) == ("float32", "bfloat16")
    pretrain(first, str(tmp_path / "first"))
    record = pretrain(second, str(tmp_path / "second"))
    assert record["init_from"]["path"] == str(tmp_path / "first" / "model")
    assert record["init_from"]["record"]["steps"] == 3 and record["seq_len"] == 128
    phase_1, phase_2 = (load_file(tmp_path / phase / "model" / "model.safetensors") for phase in ("first", "second"))
    assert phase_1.keys() == phase_2.keys() and phase_1["model.embed_tokens.weight"].dtype == torch.float32
    assert all(torch.equal(phase_1[k].to(torch.bfloat16), phase_2[k]) for k in phase_1)


def search_json(out, patterns):
    (out / "search").mkdir(parents=True)
    (out / "search" / "search.json").write_text(json.dumps({"greedy": [{"pattern": p} for p in patterns]}))


def test_cells_are_each_pattern_and_target_then_the_stage_ablation_at_the_same_steps(tmp_path):
    search_json(tmp_path, ["FSFFFFFF", "FSFFFSFF", "FSFSFSFF", "FSFSFSFS", "FSSSFSFS", "FSSSFSSS", "FSSSSSSS"])
    runs = dict((name, overrides) for name, overrides in
                cells(str(tmp_path), "paper_table", [0.25, 0.125], ["distill.dense_steps=7", "distill.sparse_steps=3"]))
    uniform = {"FSSSFSSS", "FSSSSSSS"}  # Pattern.from_retention(8, 1/4) and (8, 1/8); greedy gives the same here
    assert list(runs) == ["FFFFFFFF-own"] + [f"{p}-{t}" for p in sorted(uniform) for t in ("own", "centroid")] + [
        "FSSSFSSS-centroid-dense-only", "FSSSFSSS-centroid-sparse-only"]
    assert runs["FSSSSSSS-own"] == ["distill.pattern=FSSSSSSS", "distill.target=own"]
    assert runs["FSSSFSSS-centroid-dense-only"][2:] == ["distill.dense_steps=10", "distill.sparse_steps=0"]
    assert runs["FSSSFSSS-centroid-sparse-only"][2:] == ["distill.dense_steps=0", "distill.sparse_steps=10"]
    assert [stages({"dense_steps": d, "sparse_steps": s}) for d, s in ((7, 3), (10, 0), (0, 10))] == [
        BOTH, "dense", "sparse"]


@pytest.mark.parametrize("experiment", ["paper_table", "paper_table_deep"])
def test_an_experiment_keeps_the_logger_chosen_on_the_command_line(experiment):
    """DISTILL_ARGS="logger=disabled" reaches every run of the table (a machine without wandb runs it)."""
    with initialize_config_dir(CONF, version_base="1.3"):
        for logger in ("disabled", "offline"):
            assert compose("config", overrides=[f"experiment={experiment}", f"logger={logger}"]).logger.mode == logger


def test_cells_refuse_a_search_that_did_not_reach_the_ratio(tmp_path):
    search_json(tmp_path, ["FSFFFFFF", "FSFFFSFF", "FSFSFSFF", "FSFSFSFS"])
    with pytest.raises(ValueError, match=r"no greedy pattern with 2 F layers; search down to retention 0.25"):
        cells(str(tmp_path), "paper_table", [0.25])


@pytest.mark.slow
def test_summarize_evaluates_each_row_with_the_probe_and_the_runs_that_finished(tmp_path):
    from tests.jobs import jobs
    from train.paper_table import summarize

    out = tmp_path / "out"
    search_json(out, ["FSFFFFFF", "FSFFFSFF", "FSFSFSFF", "FSFSFSFS", "FSSSFSFS", "FSSSSFSS"])
    steps = ["distill.dense_steps=3", "distill.sparse_steps=1", "distill.lm_eval=false", "distill.lr=0.05"]
    jobs(*[((tmp_path, out / "runs" / f"{p}-{t}", f"distill.pattern={p}", f"distill.target={t}", *steps), {})
           for p, t in (("FSSSFSSS", "centroid"), ("FFFFFFFF", "own"))])
    overrides = ["model=tiny_glm", "data=stdlib_small", "batches.seq_len=64", "batches.batch_size=2",
                 "batches.max_batches=1", "device=cpu", f"cache_dir={tmp_path / 'cache'}", "logger=disabled",
                 "probe.enabled=true", "probe.lengths=[96]", "probe.depths=[0.5]", "probe.needles=2", "probe.digits=3",
                 "probe.samples_per_cell=2", "probe.max_documents=4"]
    rows = summarize(str(out), overrides, prefill_len=64, ratios=[0.25])
    assert [(r["method"], r["pattern"]) for r in rows] == [
        ("dense attention", "-"), ("all-F DSA", "FFFFFFFF"), ("all-F DSA, distilled as long as the cells", "FFFFFFFF"),
        ("training-free", "FSSSFSSS"), ("distilled (centroid)", "FSSSFSSS"),
        ("training-free", "FSSSSFSS")]  # the runs that finished
    assert rows[2]["loss"] != rows[1]["loss"]
    free, distilled = rows[3], rows[4]
    assert distilled["stages"] == "dense+sparse" and distilled["loss"] != free["loss"]  # its indexers were loaded
    for r in rows:
        assert 0 <= r["probe_token_accuracy"] <= 1 and [c["length"] for c in r["probe_cells"]] == [96]
    table = (out / "table.md").read_text()
    assert "| probe token acc | probe exact |" in table and "| 96 @ 0.5 | control |" in table
    assert json.loads((out / "table.json").read_text())[4]["pattern"] == "FSSSFSSS"
