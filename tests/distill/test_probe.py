"""distill.probe: retrieval samples planted in code documents, and their scores under a pattern against transformers'
own forward; the probe in the `train.evaluate` app."""
import inspect
import json
import os
import textwrap

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from distill.pattern import Pattern
from distill.probe import (NEEDLE_PREFIX, NEEDLE_SUFFIX, QUERY, ProbeSample, make_samples, predict_values, retrieval,
                           score)
from tests.conftest import ROOT
from tests.distill.test_evaluate import native_shared_model
from train.evaluate import run_evaluation
from train.tokenizer import ByteTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def documents():
    """Python sources of a few standard-library modules (thousands of tokens each, indented and top-level lines)."""
    import json.decoder
    import shlex
    import string

    return [inspect.getsource(module) for module in (json.decoder, shlex, string, textwrap)]


@pytest.fixture(scope="module")
def bpe():
    """The reference model's byte-level BPE tokenizer: a newline often merges with the next line's indentation."""
    return load_tokenizer(OmegaConf.load(os.path.join(ROOT, "conf", "model", "reference.yaml")))


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)


def starts_a_line(tokenizer, token):
    return tokenizer.decode([int(token)]).startswith("\n")


@pytest.mark.parametrize("tokenizer_name", ["bpe", "byte"])
def test_samples_length_needle_at_depth_value_and_query(tokenizer_name, bpe, documents):
    tokenizer = bpe if tokenizer_name == "bpe" else ByteTokenizer()
    lengths, depths = [200, 333], [0.0, 0.3, 0.5, 1.0]
    samples = make_samples(tokenizer, documents, lengths=lengths, depths=depths, needles=1, digits=5,
                           samples_per_cell=3, seed=1)
    assert [(s.length, s.depth) for s in samples] == [(n, d) for n in lengths for d in [*depths, None] for _ in "abc"]
    for s in samples:
        ids = s.input_ids.tolist()
        assert s.input_ids.dtype == torch.int64 and len(ids) == s.length and ids[0] == tokenizer.bos_token_id
        assert len(s.value) == 5 and s.value.isdigit() and tokenizer.decode(s.value_ids.tolist()) == s.value
        query = encode(tokenizer, QUERY.replace("{key}", s.key))
        assert ids[s.value_start - len(query):] == query + encode(tokenizer, s.value)  # the query is last
        if s.depth is None:  # control: the key is never planted
            assert s.needle_start is None and s.key not in tokenizer.decode(ids[:s.value_start - len(query)])
            continue
        needle = encode(tokenizer, NEEDLE_PREFIX.format(key=s.key)) + s.value_ids.tolist() + encode(
            tokenizer, NEEDLE_SUFFIX)
        assert ids[s.needle_start:s.needle_start + len(needle)] == needle
        # the needle sits before the window's line start nearest the requested depth
        window = ids[1:s.needle_start] + ids[s.needle_start + len(needle):s.value_start - len(query)]
        cuts = [0, *(p for p in range(1, len(window)) if starts_a_line(tokenizer, window[p])), len(window)]
        at, target = s.needle_start - 1, s.depth * len(window)
        assert at in cuts and abs(at - target) == min(abs(c - target) for c in cuts)
        if s.depth == 0.0:
            assert s.needle_start == 1
        if s.depth == 1.0:
            assert s.needle_start + len(needle) == s.value_start - len(query)


def test_distractors_planted_with_distinct_keys(bpe, documents):
    samples = make_samples(bpe, documents, lengths=[400], depths=[0.5], needles=4, digits=6, samples_per_cell=4,
                           seed=2)
    for s in samples:
        text = bpe.decode(s.input_ids.tolist())
        lines = [line for line in text.split("\n") if len(line) == 17 and line[6:10] == ' = "' and line[-1] == '"']
        planted = len(lines)
        assert planted == (4 if s.depth is not None else 3)
        assert len({line[:6] for line in lines}) == planted
        assert (f'{s.key} = "{s.value}"' in lines) == (s.depth is not None)


def test_samples_are_deterministic_by_seed(bpe, documents):
    def ids(seed):
        samples = make_samples(bpe, documents, lengths=[150], depths=[0.2, 0.8], needles=3, digits=4,
                               samples_per_cell=3, seed=seed)
        return [(s.input_ids.tolist(), s.key, s.value, s.needle_start, s.document) for s in samples]
    assert ids(7) == ids(7)
    assert ids(7) != ids(8)


@pytest.mark.parametrize("arguments, message", [
    ({"depths": [0.5, 1.5]}, r"depths \[1.5\] .* between 0 and 1"),
    ({"depths": []}, r"depths .* non-empty list of depths between 0 and 1"),
    ({"lengths": [0]}, r"lengths must be a non-empty list of positive token counts"),
    ({"lengths": [30]}, r"length 30 leaves no room for the document.* longer probe lengths or fewer needles"),
    ({"lengths": [100_000]}, r"no probe document is long enough.* 100000 .* shorter probe lengths or documents that "
                             r"are longer \(e.g. data=stdlib_long"),
    ({"needles": 0}, r"needles must be a positive integer"),
    ({"query": "print(x)"}, r"query 'print\(x\)' does not name the key: write \{key\}"),
])
def test_bad_sample_arguments_are_refused(bpe, documents, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_samples(bpe, documents, **{"lengths": [200], "depths": [0.5], **arguments})


def test_refusals_of_the_forward(glm, documents):
    with pytest.raises(ValueError, match="no documents to plant needles in: pass held-out"):
        make_samples(ByteTokenizer(), [], lengths=[200], depths=[0.5])
    samples = make_samples(ByteTokenizer(), documents, lengths=[1100], depths=[0.5], samples_per_cell=1)
    with pytest.raises(ValueError, match=r"lengths \[1100\] are longer than the model's context "
                                         r"\(max_position_embeddings 1024\): use probe lengths of at most 1024"):
        retrieval(glm, None, samples)
    with pytest.raises(ValueError, match="topk has no meaning in dense mode"):
        retrieval(glm, None, samples[:1], topk=4)
    with pytest.raises(ValueError, match="got no samples: make them with make_samples"):
        retrieval(glm, "FSSSFSSS", [])


def native_argmax(model, ids):
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].argmax(-1)


def test_predictions_equal_transformers_forward_under_a_pattern(glm):
    """A hand-built sample whose value is the native model's greedy continuation under the pattern, its last token
    then made wrong: the probe predicts the continuation, so 3 of 4 value tokens are right and the value is not."""
    pattern = Pattern.parse("FSSFSSFS")
    native = native_shared_model(glm, pattern)
    ids = torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        ids = torch.cat([ids, native_argmax(native, ids)[-1:]])
    greedy = ids[-4:].clone()
    ids[-1] = (ids[-1] + 1) % 256
    sample = ProbeSample(ids, depth=0.5, key="k", value="v", value_start=96, needle_start=40, document=0)
    assert torch.equal(predict_values(glm, pattern, [sample])[0], greedy)
    assert torch.equal(native_argmax(native, ids)[95:99], greedy)
    metrics = retrieval(glm, pattern, [sample])
    assert metrics["cells"] == [{"length": 100, "depth": 0.5, "samples": 1, "exact_match": 0.0, "token_accuracy": 0.75}]
    assert (metrics["mode"], metrics["pattern"], metrics["index_topk"]) == ("sparse", "FSSFSSFS", 16)
    dense = predict_values(glm, None, [sample])[0]
    assert not torch.equal(dense, greedy)  # the pattern's sparse attention changes the predictions here
    native.config.index_topk = 100
    for attention in native.model.layers:
        if attention.self_attn.indexer is not None:
            attention.self_attn.indexer.index_topk = 100  # every causal key: dense
    assert torch.equal(native_argmax(native, ids)[95:99], dense)


def test_batches_and_lengths_do_not_change_predictions(glm, documents):
    samples = make_samples(ByteTokenizer(), documents, lengths=[128, 96], depths=[0.1, 0.9], needles=2, digits=3,
                           samples_per_cell=2, seed=3)
    one_by_one = [predict_values(glm, "FSFSFSFS", [s], topk=8)[0] for s in samples]
    batched = predict_values(glm, "FSFSFSFS", samples, topk=8, batch_size=3)
    assert all(torch.equal(a, b) for a, b in zip(one_by_one, batched, strict=True))
    metrics = score(samples, batched)
    assert [(c["length"], c["depth"], c["samples"]) for c in metrics["cells"]] == [
        (128, 0.1, 2), (128, 0.9, 2), (96, 0.1, 2), (96, 0.9, 2)]
    assert [(c["length"], c["samples"]) for c in metrics["control"]] == [(128, 2), (96, 2)]
    right = [int((p == s.value_ids).sum()) for s, p in zip(samples, batched) if s.depth is not None]
    total = [s.value_ids.numel() for s in samples if s.depth is not None]
    expected = sum(r / t for r, t in zip(right[0::2], total[0::2])) / 4 + sum(
        r / t for r, t in zip(right[1::2], total[1::2])) / 4
    assert metrics["token_accuracy"] == pytest.approx(expected)


def test_evaluate_app_adds_the_probe(tmp_path):
    overrides = ["pattern=FSSFSSFS", "batches.seq_len=48", "batches.batch_size=2", "batches.max_batches=1",
                 "overlap_batches=1", "device=cpu", f"cache_dir={tmp_path / 'cache'}", "logger=disabled",
                 "probe.enabled=true", "probe.lengths=[96]", "probe.depths=[0.25,0.75]", "probe.needles=2",
                 "probe.digits=3", "probe.samples_per_cell=2", "probe.max_documents=4"]
    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    run_dir = tmp_path / "run"
    run_evaluation(cfg, str(run_dir))
    probe = json.loads((run_dir / "metrics.json").read_text())["probe"]
    assert set(probe) == {"pattern", "dense", "full"}
    assert (probe["pattern"]["pattern"], probe["full"]["pattern"], probe["dense"]["mode"]) == (
        "FSSFSSFS", "FFFFFFFF", "dense")
    assert [(c["length"], c["depth"], c["samples"]) for c in probe["dense"]["cells"]] == [(96, 0.25, 2), (96, 0.75, 2)]
    assert probe["dense"]["control"][0]["samples"] == 2
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["probe/full/exact_match"] == probe["full"]["exact_match"]
