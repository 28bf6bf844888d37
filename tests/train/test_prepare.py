"""Data at scale: compressed and parquet corpora, the cheap cache key, `python -m train.prepare` and data.prepared,
and per-stage row lengths (distill.dense_seq_len / sparse_seq_len) in the job, resumed across the stage boundary."""
import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

import train.data as data
from tests.jobs import cfg, job, jobs, metrics
from train.checkpoint import CheckpointError
from train.data import DataError, build_corpus, packed_datasets
from train.distill import _loader_state
from train.prepare import main as prepare_main
from train.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()
RECORDS = [{"text": "first document", "id": 1}, {"text": ""}, {"text": "caf\u00e9 \u2603\nsecond line", "id": 3},
           {"text": "x" * 300}]


@pytest.fixture(autouse=True)
def default_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def jsonl_bytes(records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_zst(path, payload: bytes):
    try:
        import zstandard
        path.write_bytes(zstandard.ZstdCompressor().compress(payload))
    except ImportError:
        with pa.CompressedOutputStream(str(path), "zstd") as out:
            out.write(payload)
    return str(path)


def texts(path, cache):
    corpus = build_corpus({"source": "text", "files": path, "validation_files": path, "val_fraction": 0.5}, cache)
    return list(corpus["train"]["text"])


def test_gzip_zstd_and_parquet_read_as_the_plain_jsonl(tmp_path, monkeypatch):
    plain = tmp_path / "c.jsonl"
    plain.write_bytes(jsonl_bytes(RECORDS))
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
    write_zst(tmp_path / "c.jsonl.zst", jsonl_bytes(RECORDS))
    pq.write_table(pa.table({"text": [r["text"] for r in RECORDS]}), str(tmp_path / "c.parquet"), row_group_size=2)
    cache = str(tmp_path / "cache")
    expected = texts(str(plain), cache)
    assert expected == [r["text"] for r in RECORDS if r["text"]]
    for name in ("c.jsonl.gz", "c.jsonl.zst", "c.parquet"):
        assert texts(str(tmp_path / name), cache) == expected, name
    monkeypatch.setattr(data, "_zstandard", lambda: None)  # without the zstandard package: pyarrow's zstd codec
    assert texts(write_zst(tmp_path / "d.jsonl.zst", jsonl_bytes(RECORDS)), cache) == expected
    monkeypatch.setattr(data, "_pyarrow_zstd", lambda: False)
    with pytest.raises(DataError, match="pip install zstandard"):
        texts(write_zst(tmp_path / "e.jsonl.zst", jsonl_bytes(RECORDS[:1])), cache)
    (tmp_path / "bad.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot be read"):
        texts(str(tmp_path / "bad.jsonl.gz"), cache)
    pq.write_table(pa.table({"body": ["a"]}), str(tmp_path / "other.parquet"))
    with pytest.raises(DataError, match="not data.text_field 'text'"):
        texts(str(tmp_path / "other.parquet"), cache)


def test_a_cached_entry_opens_without_reading_the_corpus(tmp_path, monkeypatch):
    path = tmp_path / "c.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl_bytes(RECORDS)))
    text_cfg = {"source": "text", "files": str(path), "validation_files": str(path), "val_fraction": 0.5}
    cache = str(tmp_path / "cache")
    first = packed_datasets(text_cfg, BYTE, 8, cache)
    build = data.build_corpus
    monkeypatch.setattr(data, "build_corpus", lambda *a, **k: pytest.fail("the corpus was read again"))
    assert list(packed_datasets(text_cfg, BYTE, 8, cache)["train"]["input_ids"]) == list(first["train"]["input_ids"])
    monkeypatch.setattr(data, "build_corpus", build)
    os.utime(path, ns=(1, 1))  # another modification time: another entry
    packed_datasets(text_cfg, BYTE, 8, cache)
    assert len([e for e in os.listdir(cache) if e.startswith("text-8-")]) == 2


LENGTHS = ["distill.dense_seq_len=32", "distill.sparse_seq_len=64"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data.prepared directory of the job's QUICK corpus at 32 and 64 tokens, written by train.prepare's main."""
    root = tmp_path_factory.mktemp("prepared")
    directory = str(root / "prepared")
    entries = prepare_main(["model=tiny_glm", "data=stdlib_small", *LENGTHS, "data.num_proc=1",
                            f"cache_dir={root / 'cache'}", f"data.prepared={directory}"])
    assert sorted(entries) == [32, 64] and all(p.startswith(directory) for p in entries.values())
    return directory


def test_a_prepared_directory_opens_without_tokenizing_and_refuses_a_mismatch(prepared, monkeypatch):
    monkeypatch.setattr(data, "build_corpus", lambda *a, **k: pytest.fail("the corpus was read"))
    monkeypatch.setattr(data, "encode_batch", lambda *a, **k: pytest.fail("the corpus was tokenized"))
    job_data = cfg(*LENGTHS, f"data.prepared={prepared}", "data.document_mask=false").data  # not a content key
    rows = packed_datasets(job_data, BYTE, 32)
    assert len(rows["train"][0]["input_ids"]) == 32 and len(rows["validation"]) > 0
    with pytest.raises(DataError, match=r"data\.min_doc_tokens=0, this job has data\.min_doc_tokens=5.*"
                                        r"python -m train\.prepare"):
        packed_datasets(cfg(f"data.prepared={prepared}", "data.min_doc_tokens=5").data, BYTE, 64)
    with pytest.raises(DataError, match=r"no rows of seq_len=48 tokens \(it has 32, 64.*python -m train\.prepare"):
        packed_datasets(job_data, BYTE, 48)
    monkeypatch.setattr(data, "tokenizer_fingerprint", lambda tokenizer: "another")
    with pytest.raises(DataError, match="prepared with tokenizer 'byte'.*python -m train.prepare"):
        packed_datasets(job_data, BYTE, 64)
    with pytest.raises(DataError, match="is not a directory.*python -m train.prepare"):
        packed_datasets(cfg(f"data.prepared={prepared}/missing").data, BYTE, 64)


@pytest.mark.slow
def test_stages_of_two_row_lengths_resume_across_the_boundary(prepared, tmp_path):
    """Dense rows of 32 tokens, sparse rows of 64, from the prepared directory; resumed from the last dense
    checkpoint (the sparse loader's state, fresh) and from a mid-dense one, the weights equal an uninterrupted run's."""
    steps = [*LENGTHS, f"data.prepared={prepared}", "distill.dense_steps=2", "distill.sparse_steps=2",
             "distill.save_every=1", "distill.keep_checkpoints=0", "distill.eval_every=2", "distill.log_every=1",
             "distill.lm_eval=false", "export.enabled=false"]
    straight = tmp_path / "straight"
    out = job(tmp_path, straight, *steps)
    assert "prepared data" in out and "tokenizing" not in out
    assert [(m["step"], m["train/stage"]) for m in metrics(straight) if "train/stage" in m] == \
        [(1, 0), (2, 0), (3, 1), (4, 1)]
    meta = {s: json.loads((straight / "checkpoints" / f"step_{s}" / "meta.json").read_text())["loader"]
            for s in (1, 2, 3)}
    assert meta[1] == {"epoch": 0, "position": 1, "stage": "dense", "seq_len": 32}
    assert meta[2] == {"epoch": 0, "position": 0, "stage": "sparse", "seq_len": 64}
    assert meta[3] == {"epoch": 0, "position": 1, "stage": "sparse", "seq_len": 64}
    resumed = {s: tmp_path / f"from_{s}" for s in (1, 2)}
    jobs(*(((tmp_path, run, *steps, f"resume={straight}/checkpoints/step_{s}"), {}) for s, run in resumed.items()))
    final = load_file(straight / "checkpoints" / "step_4" / "indexers.safetensors")
    for run in resumed.values():
        theirs = load_file(run / "checkpoints" / "step_4" / "indexers.safetensors")
        assert theirs.keys() == final.keys() and all(torch.equal(theirs[k], final[k]) for k in final), run


def test_loader_state_belongs_to_its_stage_and_row_length():
    meta = {"micro_batch_size": 2, "world_size": 1, "config": {"distill": {"seq_len": 64}}}
    state = {"epoch": 1, "position": 3}
    key = "distill.sparse_seq_len"
    assert _loader_state({**meta, "loader": {**state, "stage": "sparse", "seq_len": 64}}, 2, "sparse", 64, key) == state
    assert _loader_state({**meta, "loader": state}, 2, "sparse", 64, key) == state  # before per-stage lengths
    # the dense loader's position is no use to the sparse stage at another length: it starts afresh
    assert _loader_state({**meta, "loader": {**state, "stage": "dense", "seq_len": 32}}, 2, "sparse", 64, key) is None
    with pytest.raises(CheckpointError, match="rows of 64 tokens, this run's distill.sparse_seq_len=32: resume with "
                                              "distill.sparse_seq_len=64"):
        _loader_state({**meta, "loader": {**state, "stage": "sparse", "seq_len": 64}}, 2, "sparse", 32, key)
