import json
import os

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk

from tests.conftest import ROOT
import train.data as data
from train.data import BatchLoader, DataError, build_corpus, eval_batches, packed_datasets, stdlib_sources
from train.tokenizer import ByteTokenizer, train_bpe_tokenizer

CONF_DIR = os.path.join(ROOT, "conf")
BYTE = ByteTokenizer()
SMALL_STDLIB = {"source": "stdlib", "val_fraction": 0.05, "max_documents": 200}


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def text_cfg(files, **extra):
    return {"source": "text", "files": files, "val_fraction": 0.5, **extra}


def byte_stream(texts):
    """[bos] bytes [eos] of every non-empty text, concatenated."""
    return [t for text in texts if text for t in [BYTE.bos_token_id, *text.encode(), BYTE.eos_token_id]]


def rows_dataset(num_rows, seq_len=4):
    """Row i is [i] * seq_len, so a batch tells which rows it holds."""
    features = Features({"input_ids": List(Value("int32"), length=seq_len)})
    return Dataset.from_dict({"input_ids": [[i] * seq_len for i in range(num_rows)]}, features=features)


def col(dataset, name):
    return list(dataset[name])


def cache_entries(cache_dir):
    """The packed entries of a cache directory (not the documents/ of text and hf_disk corpora)."""
    return sorted(e for e in os.listdir(cache_dir) if e != "documents") if os.path.isdir(cache_dir) else []


@pytest.fixture(autouse=True)
def default_cache_in_tmp(tmp_path, monkeypatch):
    """Corpora built without a cache directory write their documents under tmp_path, not ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


# --- corpora -------------------------------------------------------------------------------------

def test_stdlib_sources_are_sorted_python_files_without_site_packages():
    sources = stdlib_sources()
    paths = [path for path, _ in sources]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert all(path.endswith(".py") for path in paths)
    assert not any(part in ("site-packages", "dist-packages") for path in paths for part in path.split("/"))
    assert "os.py" in paths and "json/__init__.py" in paths
    assert dict(sources)["os.py"].startswith(open(os.__file__, encoding="utf-8").read()[:200])


def test_stdlib_corpus_is_deterministic_and_split_disjoint():
    first, second = build_corpus(SMALL_STDLIB), build_corpus(SMALL_STDLIB)
    for split in ("train", "validation"):
        assert first[split].to_dict() == second[split].to_dict()
    train, validation = set(col(first["train"], "source")), set(col(first["validation"], "source"))
    assert train and validation and not train & validation
    nonempty = [path for path, text in stdlib_sources() if text][:200]
    assert sorted(train | validation) == sorted(nonempty)
    assert col(first["train"], "source") == [p for p in nonempty if p in train]  # path order kept


def test_split_of_a_document_does_not_depend_on_the_others():
    fewer = build_corpus({**SMALL_STDLIB, "max_documents": 100})
    more = build_corpus(SMALL_STDLIB)
    kept = set(col(fewer["train"], "source") + col(fewer["validation"], "source"))
    for split in ("train", "validation"):
        assert set(col(fewer[split], "source")) == set(col(more[split], "source")) & kept


def test_text_source_reads_txt_and_jsonl(tmp_path):
    a = write(tmp_path / "a.txt", "first file\n\nsecond paragraph\n")
    b = write(tmp_path / "sub" / "b.jsonl", json.dumps({"body": "one"}) + "\n\n" + json.dumps({"body": "two"}) + "\n")
    corpus = build_corpus(text_cfg([str(tmp_path / "**" / "*.txt"), b], text_field="body",
                                   validation_files=a))
    assert col(corpus["train"], "text") == ["first file\n\nsecond paragraph\n", "one", "two"]
    assert col(corpus["train"], "source") == [a, f"{b}:1", f"{b}:3"]
    assert col(corpus["validation"], "text") == ["first file\n\nsecond paragraph\n"]
    paragraphs = build_corpus(text_cfg(a, sample_by="paragraph", validation_files=a))
    assert col(paragraphs["train"], "text") == ["first file", "second paragraph\n"]
    lines = build_corpus(text_cfg(a, sample_by="line", validation_files=a))
    assert col(lines["train"], "text") == ["first file", "second paragraph"]


def test_text_source_hash_split_is_stable(tmp_path):
    files = [write(tmp_path / f"doc{i:02d}.txt", f"document {i}") for i in range(40)]
    corpus = build_corpus(text_cfg(str(tmp_path / "*.txt")))
    again = build_corpus(text_cfg(list(reversed(files))))
    assert set(col(corpus["validation"], "source")) == set(col(again["validation"], "source"))
    assert 0 < len(corpus["validation"]) < 40 and len(corpus["train"]) + len(corpus["validation"]) == 40


def test_hf_disk_source(tmp_path):
    DatasetDict(train=Dataset.from_dict({"content": ["a b", "", "c", None]}),
                validation=Dataset.from_dict({"content": ["v"]})).save_to_disk(str(tmp_path / "dict"))
    corpus = build_corpus({"source": "hf_disk", "path": str(tmp_path / "dict"), "text_field": "content",
                           "val_fraction": 0.05})
    assert col(corpus["train"], "text") == ["a b", "c"] and col(corpus["validation"], "text") == ["v"]
    assert col(corpus["train"], "source") == ["train/0", "train/2"]
    Dataset.from_dict({"text": [f"row {i}" for i in range(50)]}).save_to_disk(str(tmp_path / "plain"))
    plain = {"source": "hf_disk", "path": str(tmp_path / "plain"), "val_fraction": 0.2}
    split = build_corpus(plain)
    assert len(split["train"]) + len(split["validation"]) == 50 and len(split["validation"]) > 0
    assert split["validation"].to_dict() == build_corpus(plain)["validation"].to_dict()
    cut = build_corpus({**plain, "max_documents": 20})
    assert len(cut["train"]) + len(cut["validation"]) == 20


def test_data_configs_compose_and_build(tmp_path):
    from hydra import compose, initialize_config_dir
    text_file = write(tmp_path / "t.txt", "text")
    Dataset.from_dict({"text": [f"row {i}" for i in range(100)]}).save_to_disk(str(tmp_path / "hf"))
    overrides = {"stdlib": [], "stdlib_small": [],
                 "text": [f"data.files=[{text_file}]", f"data.validation_files={text_file}"],
                 "hf_disk": [f"data.path={tmp_path / 'hf'}"]}
    corpora = {}
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        for name, extra in overrides.items():
            cfg = compose(overrides=[f"+data={name}", *extra]).data
            assert cfg.source in data.SOURCES and cfg.cache_dir is None and cfg.num_proc == 1
            if name != "stdlib":  # stdlib_small builds the same corpus, cut
                corpora[name] = build_corpus(cfg)
    assert len(corpora["stdlib_small"]["train"]) + len(corpora["stdlib_small"]["validation"]) == 200
    assert col(corpora["text"]["train"], "text") == col(corpora["text"]["validation"], "text") == ["text"]
    assert len(corpora["hf_disk"]["train"]) + len(corpora["hf_disk"]["validation"]) == 100


# --- packing and cache ---------------------------------------------------------------------------

def test_packing_joins_documents_with_bos_and_eos(tmp_path):
    train_texts = ["ab", "", "cdé", "fghij"]
    files = [write(tmp_path / f"train{i}.txt", text) for i, text in enumerate(train_texts)]
    validation = write(tmp_path / "val.txt", "validation text")
    packed = packed_datasets(text_cfg(files, validation_files=validation), BYTE, 5, str(tmp_path / "cache"))
    stream = byte_stream(train_texts)
    rows = col(packed["train"], "input_ids")
    assert len(rows) == len(stream) // 5 and all(len(row) == 5 for row in rows)
    assert [t for row in rows for t in row] == stream[:len(rows) * 5]
    assert col(packed["validation"], "input_ids") == np.reshape(byte_stream(["validation text"])[:15], (3, 5)).tolist()


def test_packing_with_a_trained_tokenizer(tmp_path):
    texts = ["def f(x):\n    return x\n", "class A:\n    pass\n", "ünïcode = 'ok'\n"]
    tokenizer = train_bpe_tokenizer(texts * 5, 300, str(tmp_path / "tok"))
    files = [write(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)]
    packed = packed_datasets(text_cfg(files, validation_files=files[0]), tokenizer, 4, str(tmp_path / "cache"))
    stream = [t for text in texts for t in
              [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]]
    rows = col(packed["train"], "input_ids")
    assert [t for row in rows for t in row] == stream[:len(rows) * 4] and len(rows) == len(stream) // 4


def test_second_call_loads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    calls = []
    encode = data.encode_batch
    monkeypatch.setattr(data, "encode_batch", lambda tok, texts: calls.append(len(texts)) or encode(tok, texts))
    cache = str(tmp_path / "cache")
    first = packed_datasets(SMALL_STDLIB, BYTE, 64, cache)
    assert calls and cache_entries(cache) and len(first["validation"]) > 0
    calls.clear()
    second = packed_datasets(SMALL_STDLIB, BYTE, 64, cache)
    assert not calls and len(cache_entries(cache)) == 1
    for split in ("train", "validation"):
        rows_first, rows_second = (packed[split].with_format("numpy")[:]["input_ids"] for packed in (first, second))
        assert np.array_equal(rows_first, rows_second)
    packed_datasets(SMALL_STDLIB, BYTE, 32, cache)
    assert calls and len(cache_entries(cache)) == 2  # another seq_len is another entry


def test_cache_entry_changes_with_the_corpus_text(tmp_path):
    path = tmp_path / "doc.txt"
    cfg = text_cfg(write(path, "x" * 40), validation_files=str(path))
    cache = str(tmp_path / "cache")
    before = col(packed_datasets(cfg, BYTE, 8, cache)["train"], "input_ids")
    write(path, "y" * 40)
    after = col(packed_datasets(cfg, BYTE, 8, cache)["train"], "input_ids")
    assert before != after and len(cache_entries(cache)) == 2


def test_cache_uses_data_cache_dir_when_no_directory_is_given(tmp_path):
    cfg = text_cfg(write(tmp_path / "doc.txt", "z" * 40), validation_files=str(tmp_path / "doc.txt"),
                   cache_dir=str(tmp_path / "configured"))
    packed_datasets(cfg, BYTE, 8)
    assert len(cache_entries(tmp_path / "configured")) == 1


def test_a_failed_save_leaves_no_cache_directory(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    save = DatasetDict.save_to_disk

    def crash_after_writing(self, path, **kwargs):
        save(self, path, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetDict, "save_to_disk", crash_after_writing)
    with pytest.raises(KeyboardInterrupt):
        packed_datasets(SMALL_STDLIB, BYTE, 64, str(cache))
    assert cache_entries(cache) == []
    monkeypatch.setattr(DatasetDict, "save_to_disk", save)
    packed_datasets(SMALL_STDLIB, BYTE, 64, str(cache))
    (entry,) = cache_entries(cache)
    assert not entry.startswith(".") and isinstance(load_from_disk(str(cache / entry)), DatasetDict)


# --- batches -------------------------------------------------------------------------------------

def test_batch_loader_resumes_with_the_next_batch():
    dataset = rows_dataset(23)
    loader = BatchLoader(dataset, batch_size=4, seed=7)
    assert loader.batches_per_epoch == 5
    for _ in range(8):  # into the second epoch
        next(loader)
    state = loader.state_dict()
    assert state == {"epoch": 1, "position": 3}
    expected = [next(loader) for _ in range(6)]
    resumed = BatchLoader(dataset, batch_size=4, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, [next(resumed) for _ in range(6)]))
    assert expected[0].dtype == torch.long and expected[0].shape == (4, 4)


def test_batch_loader_epochs_are_permutations_that_change_with_the_epoch():
    loader = BatchLoader(rows_dataset(12), batch_size=3, seed=0)
    epochs = [[row for _ in range(4) for row in next(loader)[:, 0].tolist()] for _ in range(3)]
    assert all(sorted(epoch) == list(range(12)) for epoch in epochs)
    assert epochs[0] != epochs[1]
    ordered = BatchLoader(rows_dataset(12), batch_size=3, seed=0, shuffle=False)
    assert [row for _ in range(4) for row in next(ordered)[:, 0].tolist()] == list(range(12))


def test_ranks_get_disjoint_shards_of_each_epoch():
    dataset, world_size = rows_dataset(50), 3
    loaders = [BatchLoader(dataset, batch_size=4, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert all(loader.batches_per_epoch == 4 for loader in loaders)
    shards = [{row for _ in range(4) for row in next(loader)[:, 0].tolist()} for loader in loaders]
    assert all(len(shard) == 16 for shard in shards)
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
    single = BatchLoader(dataset, batch_size=12, seed=1)  # the global batches of one process
    assert set().union(*shards) == {row for _ in range(4) for row in next(single)[:, 0].tolist()}


def test_eval_batches_are_the_first_rows_in_order():
    batches = eval_batches(rows_dataset(10), batch_size=4, max_batches=None)
    assert [b[:, 0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    limited = eval_batches(rows_dataset(10), batch_size=3, max_batches=2)
    assert [b[:, 0].tolist() for b in limited] == [[0, 1, 2], [3, 4, 5]] and limited[0].dtype == torch.long


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, message", [
    ({"source": "wiki"}, "unknown"),
    (text_cfg("missing.txt"), "is not a file"),
    (text_cfg("nowhere/*.jsonl"), "matches no file"),
    (text_cfg([]), "is empty"),
    ({"source": "hf_disk", "path": "no/such/dir", "val_fraction": 0.1}, "save_to_disk"),
    ({**SMALL_STDLIB, "val_fraction": 1.5}, "val_fraction"),
    ({**SMALL_STDLIB, "max_documents": 0}, "max_documents"),
])
def test_bad_sources_raise_data_error(cfg, message):
    with pytest.raises(DataError, match=message):
        build_corpus(cfg)


def test_bad_files_raise_data_error(tmp_path):
    blank = write(tmp_path / "blank.txt", "")
    with pytest.raises(DataError, match="no train documents"):
        build_corpus(text_cfg(blank))
    with pytest.raises(DataError, match="neither .txt nor .jsonl"):
        build_corpus(text_cfg(write(tmp_path / "data.csv", "a,b")))
    with pytest.raises(DataError, match=":2 is not valid JSON"):
        build_corpus(text_cfg(write(tmp_path / "bad.jsonl", '{"text": "a"}\n{oops\n')))
    with pytest.raises(DataError, match="no string field 'text'"):
        build_corpus(text_cfg(write(tmp_path / "field.jsonl", '{"body": "a"}\n')))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        build_corpus(text_cfg(str(tmp_path / "latin1.txt")))
    Dataset.from_dict({"body": ["a"]}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DataError, match="not data.text_field 'text'"):
        build_corpus({"source": "hf_disk", "path": str(tmp_path / "hf"), "val_fraction": 0.1})


def test_corpus_too_small_for_one_sequence(tmp_path):
    cfg = text_cfg(write(tmp_path / "train.txt", "x" * 100), validation_files=write(tmp_path / "val.txt", "short"))
    with pytest.raises(DataError, match="validation split .* fewer than seq_len=16 tokens"):
        packed_datasets(cfg, BYTE, 16, str(tmp_path / "cache"))
    assert cache_entries(tmp_path / "cache") == []
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchLoader(rows_dataset(5), batch_size=3, seed=0, world_size=2)


# --- documents in packed rows --------------------------------------------------------------------

def starts_of(rows):
    """Per row: 0 and every position of a bos token (the ByteTokenizer puts bos only at a document start)."""
    return [sorted({0} | {i for i, t in enumerate(row) if t == BYTE.bos_token_id}) for row in rows]


def documents_dataset(rows, doc_starts):
    features = Features({"input_ids": List(Value("int32"), length=len(rows[0])), "doc_starts": List(Value("int32"))})
    return Dataset.from_dict({"input_ids": rows, "doc_starts": doc_starts}, features=features)


def test_packed_rows_record_document_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DOCUMENTS_PER_PACKING_BATCH", 3)  # rows and documents span packing batches
    rng = np.random.default_rng(0)
    texts = ["x" * int(n) for n in rng.integers(1, 12, size=20)] + ["a long document " * 3]
    files = [write(tmp_path / f"d{i:02d}.txt", text) for i, text in enumerate(texts)]
    packed = packed_datasets(text_cfg(files, validation_files=files[-1]), BYTE, 8, str(tmp_path / "cache"))
    rows, doc_starts = col(packed["train"], "input_ids"), col(packed["train"], "doc_starts")
    assert [t for row in rows for t in row] == byte_stream(texts)[:len(rows) * 8]
    assert doc_starts == starts_of(rows)
    assert col(packed["validation"], "doc_starts") == [[0]] * 6  # one 50-token document: 6 rows that continue it
    assert packed["train"].features["doc_starts"] == List(Value("int32"))


def test_batches_carry_cu_seqlens_of_the_flattened_rows():
    dataset = documents_dataset([[1] * 6, [2] * 6, [3] * 6], [[0, 2, 5], [0], [0, 4]])
    (batch,) = eval_batches(dataset, batch_size=3, documents={})
    assert isinstance(batch, data.Batch) and batch.input_ids.dtype == torch.long and batch.input_ids.shape == (3, 6)
    assert batch.cu_seqlens.dtype == torch.int32 and batch.cu_seqlens.tolist() == [0, 2, 5, 6, 12, 16, 18]
    assert batch.max_seqlen == 6 and batch.position_ids is None  # positions run on unless asked
    # the middle row continues one document: one segment, exactly its row, as without document masking
    only_middle = eval_batches(dataset.select([1]), batch_size=1, documents={})[0]
    assert only_middle.cu_seqlens.tolist() == [0, 6]
    assert all(isinstance(b, torch.Tensor) for b in eval_batches(dataset, batch_size=2))  # the tensor API stays


def test_position_ids_restart_only_when_asked():
    dataset = documents_dataset([[1] * 6, [2] * 6], [[0, 2, 5], [0, 4]])
    restarted = eval_batches(dataset, batch_size=2, documents={"restart_positions": True})[0]
    assert restarted.position_ids.tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    assert restarted.position_ids.dtype == torch.long and restarted.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12]
    unmasked = eval_batches(dataset, batch_size=2, documents={"document_mask": False, "restart_positions": True})[0]
    assert unmasked.cu_seqlens is None and torch.equal(unmasked.position_ids, restarted.position_ids)
    moved = restarted.to("meta")
    assert moved.input_ids.is_meta and moved.cu_seqlens.is_meta and moved.position_ids.is_meta


def test_document_mask_false_gives_no_cu_seqlens():
    batch = next(BatchLoader(rows_dataset(4), batch_size=2, seed=0, documents={"document_mask": False}))
    assert batch.cu_seqlens is None and batch.max_seqlen is None and batch.position_ids is None
    assert batch.input_ids.shape == (2, 4)  # a dataset without doc_starts serves when no boundary is asked for
    with pytest.raises(DataError, match="doc_starts.*packed_datasets"):
        BatchLoader(rows_dataset(4), batch_size=2, seed=0, documents={})
    with pytest.raises(DataError, match="document_mask must be true or false"):
        BatchLoader(rows_dataset(4), batch_size=2, seed=0, documents={"document_mask": "yes"})
    with pytest.raises(DataError, match="start with 0 in every row"):
        eval_batches(documents_dataset([[1] * 4], [[1, 2]]), batch_size=1, documents={})


def test_batch_loader_with_documents_resumes_exactly():
    doc_starts = [[0] + sorted({int(i) for i in np.random.default_rng(i).integers(1, 8, size=i % 4)})
                  for i in range(23)]
    dataset = documents_dataset([[i] * 8 for i in range(23)], doc_starts)
    options = {"document_mask": True, "restart_positions": True}
    loader = BatchLoader(dataset, batch_size=4, seed=7, documents=options)
    for _ in range(8):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]
    resumed = BatchLoader(dataset, batch_size=4, seed=7, documents=options)
    resumed.load_state_dict(state)
    for a, b in zip(expected, [next(resumed) for _ in range(6)]):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.cu_seqlens, b.cu_seqlens)
        assert torch.equal(a.position_ids, b.position_ids)
    first = expected[0]
    rows = first.input_ids[:, 0].tolist()
    assert first.cu_seqlens.tolist() == [b * 8 + s for b, row in enumerate(rows) for s in doc_starts[row]] + [32]


def test_min_doc_tokens_packs_only_long_documents(tmp_path):
    texts = ["ab", "cdefghij", "k", "lmnop", "qrstuvwxyz"]
    files = [write(tmp_path / f"{i}.txt", text) for i, text in enumerate(texts)]
    cfg = text_cfg(files, validation_files=files[1], min_doc_tokens=5)
    cache = str(tmp_path / "cache")
    packed = packed_datasets(cfg, BYTE, 4, cache)
    kept = [text for text in texts if len(text) >= 5]
    rows = col(packed["train"], "input_ids")
    assert [t for row in rows for t in row] == byte_stream(kept)[:len(rows) * 4]
    assert col(packed["train"], "doc_starts") == starts_of(rows)
    packed_datasets({**cfg, "document_mask": False, "restart_positions": True}, BYTE, 4, cache)
    assert len(cache_entries(cache)) == 1  # batch options do not change the packed rows
    packed_datasets({**cfg, "min_doc_tokens": 0}, BYTE, 4, cache)
    assert len(cache_entries(cache)) == 2
    with pytest.raises(DataError, match="min_doc_tokens=20 tokens are kept"):
        packed_datasets({**cfg, "min_doc_tokens": 20}, BYTE, 4, cache)


def test_join_by_directory_or_file_makes_one_document_per_group(tmp_path):
    a1 = write(tmp_path / "a" / "1.txt", "one\n\ntwo")
    b1 = write(tmp_path / "b" / "1.txt", "three")
    a2 = write(tmp_path / "a" / "2.txt", "four")
    files = [a1, b1, a2]  # a's files are not adjacent: groups keep the order of their first document
    joined = build_corpus(text_cfg(files, validation_files=b1, join_by="directory"))
    assert col(joined["train"], "text") == ["one\n\ntwo\n\nfour", "three"]
    assert col(joined["train"], "source") == [os.path.dirname(a1), os.path.dirname(b1)]
    paragraphs = text_cfg([a1], validation_files=a1, sample_by="paragraph")
    assert col(build_corpus(paragraphs)["train"], "text") == ["one", "two"]
    assert col(build_corpus({**paragraphs, "join_by": "file"})["train"], "text") == ["one\n\ntwo"]
    with pytest.raises(DataError, match="join_by 'package' is unknown"):
        build_corpus(text_cfg(files, join_by="package"))
    DatasetDict(train=Dataset.from_dict({"text": ["x", "y", "z", ""], "repo": ["r1", "r2", "r1", "r1"]}),
                validation=Dataset.from_dict({"text": ["v"], "repo": ["r3"]})).save_to_disk(str(tmp_path / "hf"))
    hf = build_corpus({"source": "hf_disk", "path": str(tmp_path / "hf"), "val_fraction": 0.1, "join_by": "repo"})
    assert list(zip(col(hf["train"], "source"), col(hf["train"], "text"))) == [("r1", "x\n\nz"), ("r2", "y")]


def test_stdlib_long_joins_each_package_into_one_long_document():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        cfg = compose(overrides=["+data=stdlib_long", "data.max_documents=300"]).data
    assert cfg.join_by == "directory" and cfg.document_mask is True and cfg.restart_positions is False
    long, plain = build_corpus(cfg), build_corpus({**SMALL_STDLIB, "max_documents": 300})
    lengths = {name: np.array([len(t) for split in corpus.values() for t in split["text"]])
               for name, corpus in (("long", long), ("plain", plain))}
    assert lengths["long"].sum() >= lengths["plain"].sum() and lengths["long"].mean() > 3 * lengths["plain"].mean()
    in_long_documents = {name: x[x >= 100_000].sum() / x.sum() for name, x in lengths.items()}  # characters' share
    assert in_long_documents["long"] > 3 * in_long_documents["plain"]
    files = [(path, text) for path, text in stdlib_sources()[:300] if text]
    documents = dict(zip(*(col(long["train"], c) + col(long["validation"], c) for c in ("source", "text"))))
    package = next(os.path.dirname(path) for path, _ in files if os.path.dirname(path))
    assert documents[package] == "\n\n".join(text for path, text in files if os.path.dirname(path) == package)
    module = next(path for path, _ in files if "/" not in path)
    assert documents[module] == dict(files)[module]  # a top-level module stays one document


def test_packages_source_joins_each_package_directory_and_splits_by_relative_path(tmp_path):
    root = tmp_path / "site"
    write(root / "pkg" / "a.py", "A = 1")
    write(root / "pkg" / "b.py", "B = 2")
    write(root / "pkg" / "sub" / "c.py", "C = 3")
    write(root / "pkg" / "data.txt", "not python")
    write(root / "other" / "d.py", "D = 4")
    (root / "pkg" / "bad.py").write_bytes(b"\xff\xfe")  # not UTF-8: left out
    assert data.package_sources(["pkg"], str(root)) == [("pkg/a.py", "A = 1"), ("pkg/b.py", "B = 2"),
                                                         ("pkg/sub/c.py", "C = 3")]
    cfg = {"source": "packages", "packages": ["pkg", "other"], "packages_root": str(root), "val_fraction": 0.5,
           "join_by": "directory"}
    corpus = build_corpus(cfg, str(tmp_path / "cache"))
    documents = dict(zip(*(col(corpus["train"], c) + col(corpus["validation"], c) for c in ("source", "text"))))
    assert documents == {"pkg": "A = 1\n\nB = 2", "pkg/sub": "C = 3", "other": "D = 4"}
    for split in ("train", "validation"):  # the split hashes the path relative to the root, not where it lies
        assert all(data._in_validation(key, 0.5) == (split == "validation") for key in col(corpus[split], "source"))
    moved = tmp_path / "elsewhere"
    root.rename(moved)
    assert data.source_identity({**cfg, "packages_root": str(moved)}) != data.source_identity(
        {**cfg, "packages_root": str(moved), "packages": ["pkg"]})
    with pytest.raises(DataError, match=r"data.packages: nope not installed under .*data.packages_root"):
        build_corpus({**cfg, "packages_root": str(moved), "packages": ["pkg", "nope"]})
    with pytest.raises(DataError, match=r"data.packages='pkg': list the installed packages"):
        data.package_sources("pkg", str(moved))


def test_packages_data_config_reads_this_interpreters_site_packages():
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.abspath(CONF_DIR), version_base=None):
        cfg = compose(overrides=["+data=packages", "data.packages=[omegaconf]"]).data
    assert cfg.source == "packages" and cfg.join_by == "directory" and cfg.min_doc_tokens == 8192
    corpus = build_corpus({**cfg, "val_fraction": 0.3})
    sources = col(corpus["train"], "source") + col(corpus["validation"], "source")
    assert "omegaconf" in sources and all(s.startswith("omegaconf") for s in sources)


def test_text_and_hf_disk_documents_are_memory_mapped_arrow_files(tmp_path):
    files = [write(tmp_path / f"{i}.txt", f"document {i}") for i in range(3)]
    Dataset.from_dict({"text": [f"row {i}" for i in range(10)]}).save_to_disk(str(tmp_path / "hf"))
    cache = tmp_path / "cache"
    for cfg in (text_cfg(files, validation_files=files[0]),
                {"source": "hf_disk", "path": str(tmp_path / "hf"), "val_fraction": 0.5}):
        corpus = build_corpus(cfg, str(cache))
        for split in ("train", "validation"):
            documents = corpus[split]
            assert isinstance(documents, Dataset) and documents.cache_files
            assert all(f["filename"].startswith(str(cache / "documents")) for f in documents.cache_files)
            assert type(documents.data).__name__ == "MemoryMappedTable"
    assert col(build_corpus(text_cfg(files, validation_files=files[0]), str(cache))["train"], "text") == \
        [f"document {i}" for i in range(3)]
    cut = build_corpus(text_cfg(files, validation_files=files[0], max_documents=2), str(cache))  # over all files
    assert col(cut["train"], "text") == ["document 0", "document 1"]
