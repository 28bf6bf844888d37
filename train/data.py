"""Training text: corpora (stdlib sources, local txt/jsonl, HF datasets on disk), packed token sequences, batches.

A corpus is a `DatasetDict` with splits "train" and "validation" and columns "text" and "source".
`packed_datasets` tokenizes it, joins documents as `[bos] doc [eos] [bos] doc [eos] ...` and cuts the
stream into rows of `seq_len` tokens (column "input_ids"), cached on disk. `BatchLoader` serves those
rows to each rank as resumable, endlessly repeating epochs.
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk
from datasets.table import InMemoryTable

from train.tokenizer import encode_batch, tokenizer_fingerprint

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "text", "hf_disk")
SPLITS = ("train", "validation")
TEXT_SAMPLE_BY = ("document", "paragraph", "line")
# Keys of a data config that do not change the packed sequences (left out of the cache key).
NON_CONTENT_KEYS = ("name", "num_proc", "cache_dir")
CACHE_FORMAT = 1


class DataError(ValueError):
    """A data source or config that yields no usable training text."""


def stdlib_sources() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, source text) of every standard-library `.py` file, sorted by path.

    Site-packages/dist-packages and files that cannot be read or are not UTF-8 are left out.
    """
    root = sysconfig.get_paths()["stdlib"]
    sources = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in ("site-packages", "dist-packages")]
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            sources.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    sources.sort(key=lambda source: source[0])
    return sources


def build_corpus(data_cfg: Mapping) -> DatasetDict:
    """The "train" and "validation" splits (columns "text", "source") of a `conf/data/*.yaml` mapping.

    source stdlib: one document per standard-library file. source text: `files` (.txt/.jsonl paths or
    globs). source hf_disk: `datasets.load_from_disk(path)`. Unless the source has its own validation
    documents, a document goes to validation when a SHA-256 hash of its "source" falls below
    `val_fraction`, so the split of a document never depends on the others. `max_documents` keeps the
    first documents (in the source's order) before the split.
    """
    source = data_cfg.get("source")
    if source == "stdlib":
        corpus = _split(_documents_dataset(stdlib_sources()), data_cfg)
    elif source == "text":
        corpus = _text_corpus(data_cfg)
    elif source == "hf_disk":
        corpus = _hf_disk_corpus(data_cfg)
    else:
        raise DataError(f"data.source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    for split in SPLITS:
        if len(corpus[split]) == 0:
            raise DataError(f"data source {source!r} gives no {split} documents "
                            f"({len(corpus['train']) + len(corpus['validation'])} in all); "
                            f"check data.files/path, data.max_documents and data.val_fraction")
    return corpus


def corpus_fingerprint(corpus: DatasetDict) -> str:
    """SHA-256 hex digest of the text of every document, split by split, in order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split.encode())
        for batch in corpus[split].select_columns(["text"]).iter(batch_size=1000):
            for text in batch["text"]:
                data = text.encode("utf-8")
                digest.update(len(data).to_bytes(8, "little"))
                digest.update(data)
    return digest.hexdigest()


def packed_datasets(data_cfg: Mapping, tokenizer, seq_len: int, cache_dir: str | None = None) -> DatasetDict:
    """"train" and "validation" rows of `seq_len` token ids (column "input_ids", int32).

    Each split's documents are tokenized (`datasets.map`, batched, `data_cfg.num_proc` processes) and
    joined as [bos] doc [eos] (bos only if the tokenizer has one) into one stream that is cut into
    rows; the last partial row is dropped. The result is cached under `cache_dir` (default:
    `data_cfg.cache_dir`, else `default_cache_dir()`), keyed by the corpus text, the tokenizer, seq_len
    and the data config; a cache directory appears only complete (written to a temporary directory,
    then renamed).
    """
    if int(seq_len) < 1:
        raise DataError(f"seq_len must be a positive number of tokens, got {seq_len}")
    seq_len = int(seq_len)
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token, which packing puts between documents")
    corpus = build_corpus(data_cfg)
    key_fields = {"format": CACHE_FORMAT, "corpus": corpus_fingerprint(corpus),
                  "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": seq_len,
                  "data": {k: v for k, v in _plain(data_cfg).items() if k not in NON_CONTENT_KEYS}}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True, default=str).encode()).hexdigest()
    root = cache_dir or data_cfg.get("cache_dir") or default_cache_dir()
    path = os.path.join(os.path.expanduser(root), f"{data_cfg.get('source')}-{seq_len}-{key[:20]}")
    if os.path.isdir(path):
        log.info("packed data from cache %s", path)
        return load_from_disk(path)
    start = time.perf_counter()
    packed = DatasetDict({split: _pack(corpus[split], tokenizer, seq_len, int(data_cfg.get("num_proc") or 1),
                                       fingerprint=f"{key[:20]}-{split}")
                          for split in SPLITS})
    for split in SPLITS:
        if len(packed[split]) == 0:
            raise DataError(
                f"the {split} split ({len(corpus[split])} documents) has fewer than seq_len={seq_len} tokens, "
                f"so it packs into no sequence; use more documents (data.max_documents, data.val_fraction) "
                f"or a shorter seq_len")
    _save_atomically(packed, path)
    log.info("packed %d train and %d validation sequences of %d tokens in %.1f s into %s",
             len(packed["train"]), len(packed["validation"]), seq_len, time.perf_counter() - start, path)
    return load_from_disk(path)


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/indexcache/data, by default ~/.cache/indexcache/data."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "indexcache", "data")


class BatchLoader:
    """Endless LongTensor batches [batch_size, seq_len] of one rank's share of each epoch.

    Epoch e visits the rows in the order of a permutation seeded by seed + e (or in order without
    shuffle); its global batches are consecutive runs of batch_size * world_size rows, of which rank r
    takes the r-th batch_size rows, so ranks never share a row within an epoch. A trailing part smaller
    than one global batch is skipped. `state_dict`/`load_state_dict` resume at the next batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"BatchLoader needs batch_size >= 1 and 0 <= rank < world_size, got "
                            f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        if "input_ids" not in dataset.column_names:
            raise DataError(f"BatchLoader needs an \"input_ids\" column, the dataset has {dataset.column_names}")
        self.rows = dataset.with_format("numpy", columns=["input_ids"])
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = len(dataset) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{len(dataset)} sequences are fewer than one global batch of batch_size {batch_size} "
                            f"x {world_size} ranks")
        self.epoch = 0
        self.position = 0
        self._order_epoch = None
        self._order = None

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            num_rows = len(self.rows)
            self._order = (np.random.default_rng(self.seed + self.epoch).permutation(num_rows) if self.shuffle
                           else np.arange(num_rows))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = (self.position * self.world_size + self.rank) * self.batch_size
        indices = self._epoch_order()[start:start + self.batch_size]
        self.position += 1
        return torch.from_numpy(self.rows[indices]["input_ids"].astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(f"BatchLoader state {dict(state)} does not fit {self.batches_per_epoch} batches per epoch")
        self.epoch, self.position = epoch, position


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int | None = None) -> list[torch.Tensor]:
    """The first rows of `dataset` in order, as LongTensor batches [<= batch_size, seq_len] (the last may be short)."""
    rows = dataset.with_format("numpy", columns=["input_ids"])
    num_rows = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    return [torch.from_numpy(rows[start:min(start + batch_size, num_rows)]["input_ids"].astype(np.int64))
            for start in range(0, num_rows, batch_size)]


def _pack(documents: Dataset, tokenizer, seq_len: int, num_proc: int, fingerprint: str) -> Dataset:
    """Rows of seq_len tokens cut from the stream [bos] doc [eos] [bos] doc [eos] ... of `documents`."""
    prefix = np.array([] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id], dtype=np.int32)
    suffix = np.array([tokenizer.eos_token_id], dtype=np.int32)

    def tokenize(batch):
        ids = encode_batch(tokenizer, batch["text"])
        return {"input_ids": [np.concatenate([prefix, np.asarray(x, dtype=np.int32), suffix]) for x in ids]}

    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names,
                              num_proc=num_proc if num_proc > 1 else None,
                              keep_in_memory=True, features=Features({"input_ids": List(Value("int32"))}),
                              new_fingerprint=fingerprint, desc="tokenize")
    chunks = [chunk.flatten() for chunk in tokenized.data.column("input_ids").chunks]
    stream = pa.concat_arrays(chunks) if chunks else pa.array([], pa.int32())
    num_rows = len(stream) // seq_len
    rows = pa.FixedSizeListArray.from_arrays(stream.slice(0, num_rows * seq_len), seq_len)
    return Dataset(InMemoryTable(pa.table({"input_ids": rows})))


def _save_atomically(dataset: DatasetDict, path: str) -> None:
    """`dataset.save_to_disk(path)` through a temporary sibling directory, so `path` is complete or absent."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        dataset.save_to_disk(staging)
        try:
            os.rename(staging, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            shutil.rmtree(staging)  # another process wrote the same cache entry first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _plain(cfg: Mapping) -> dict:
    """A data config as plain Python containers (OmegaConf resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        return dict(cfg)
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)


def _documents_dataset(documents: list[tuple[str, str]]) -> Dataset:
    """Columns "text" and "source" of the non-empty documents."""
    documents = [(source, text) for source, text in documents if text]
    return Dataset.from_dict({"text": [text for _, text in documents], "source": [source for source, _ in documents]})


def _max_documents(data_cfg: Mapping) -> int | None:
    limit = data_cfg.get("max_documents")
    if limit is not None and int(limit) < 1:
        raise DataError(f"data.max_documents must be a positive count or null, got {limit}")
    return None if limit is None else int(limit)


def _head(dataset: Dataset, limit: int | None) -> Dataset:
    return dataset if limit is None or len(dataset) <= limit else dataset.select(range(limit))


def _in_validation(key: str, val_fraction: float) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") < val_fraction * 2 ** 64


def _split(documents: Dataset, data_cfg: Mapping) -> DatasetDict:
    """Train/validation by the hash of each document's "source", after keeping the first max_documents."""
    val_fraction = data_cfg.get("val_fraction")
    if val_fraction is None or not 0 < float(val_fraction) < 1:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    documents = _head(documents, _max_documents(data_cfg))
    in_validation = np.array([_in_validation(key, float(val_fraction)) for key in documents["source"]], dtype=bool)
    return DatasetDict(train=documents.select(np.flatnonzero(~in_validation)),
                       validation=documents.select(np.flatnonzero(in_validation)))


def _text_corpus(data_cfg: Mapping) -> DatasetDict:
    train = _documents_dataset(_text_documents(data_cfg, "files"))
    if not data_cfg.get("validation_files"):
        return _split(train, data_cfg)
    validation = _documents_dataset(_text_documents(data_cfg, "validation_files"))
    limit = _max_documents(data_cfg)
    return DatasetDict(train=_head(train, limit), validation=_head(validation, limit))


def _text_documents(data_cfg: Mapping, key: str) -> list[tuple[str, str]]:
    """(source, text) of the .txt/.jsonl files of `data_cfg[key]`: source is "path" or "path:number"."""
    sample_by = data_cfg.get("sample_by", "document")
    if sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"data.sample_by {sample_by!r} is unknown; use one of {', '.join(TEXT_SAMPLE_BY)}")
    text_field = data_cfg.get("text_field", "text")
    documents = []
    for path in _expand_files(data_cfg.get(key), key):
        if path.endswith(".jsonl"):
            documents += _jsonl_documents(path, text_field)
            continue
        text = _read_text(path)
        if sample_by == "document":
            documents.append((path, text))
        else:
            pieces = re.split(r"\n\s*\n", text) if sample_by == "paragraph" else text.splitlines()
            documents += [(f"{path}:{i}", piece) for i, piece in enumerate(pieces) if piece.strip()]
    return documents


def _expand_files(patterns, key: str) -> list[str]:
    """The files of a path/glob or a list of them, each pattern's matches sorted, duplicates dropped."""
    if not patterns:
        raise DataError(f"data.{key} is empty: list .txt or .jsonl files or globs")
    if isinstance(patterns, str):
        patterns = [patterns]
    paths = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not matches:
            raise DataError(f"data.{key}: {pattern!r} " +
                            ("matches no file" if glob.has_magic(pattern) else "is not a file"))
        for path in matches:
            if not path.endswith((".txt", ".jsonl")):
                raise DataError(f"data.{key}: {path!r} is neither .txt nor .jsonl")
            if path not in paths:
                paths.append(path)
    return paths


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path!r} is not UTF-8 text: {error}") from None


def _jsonl_documents(path: str, text_field: str) -> list[tuple[str, str]]:
    documents = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise DataError(f"{path}:{number} has no string field {text_field!r} (data.text_field)")
        documents.append((f"{path}:{number}", record[text_field]))
    return documents


def _hf_disk_corpus(data_cfg: Mapping) -> DatasetDict:
    """A dataset saved with `save_to_disk`: its train_split and validation_split (default "train",
    "validation"), or a hash split of train_split (or of a plain Dataset) by row number."""
    path = data_cfg.get("path")
    if not path or not os.path.isdir(os.path.expanduser(path)):
        raise DataError(f"data.path {path!r} is not a directory saved by datasets' save_to_disk")
    try:
        saved = load_from_disk(os.path.expanduser(path))
    except (FileNotFoundError, ValueError) as error:
        raise DataError(f"data.path {path!r} cannot be loaded with datasets.load_from_disk: {error}") from None
    train_split = data_cfg.get("train_split", "train")
    validation_split = data_cfg.get("validation_split", "validation")
    if isinstance(saved, DatasetDict):
        if train_split not in saved:
            raise DataError(f"data.path {path!r} has splits {list(saved)}, not data.train_split {train_split!r}")
        train = saved[train_split]
        validation = saved[validation_split] if validation_split and validation_split in saved else None
    else:
        train, validation = saved, None
    text_field = data_cfg.get("text_field", "text")
    limit = _max_documents(data_cfg)

    def documents(dataset: Dataset, split: str) -> Dataset:
        """The non-empty texts of `dataset`, source "<split>/<row number>"."""
        if text_field not in dataset.column_names:
            raise DataError(f"data.path {path!r} split {split!r} has columns {dataset.column_names}, "
                            f"not data.text_field {text_field!r}")
        texts = dataset.select_columns([text_field]).with_format("arrow")[:][text_field]
        rows = np.flatnonzero(pc.fill_null(pc.greater(pc.utf8_length(texts), 0), False).to_numpy(zero_copy_only=False))
        rows = rows if limit is None else rows[:limit]
        dataset = dataset.select_columns([text_field]).select(rows)
        if text_field != "text":
            dataset = dataset.rename_column(text_field, "text")
        return dataset.add_column("source", [f"{split}/{i}" for i in rows])

    if validation is None:
        return _split(documents(train, train_split), {**_plain(data_cfg), "max_documents": None})
    return DatasetDict(train=documents(train, train_split), validation=documents(validation, validation_split))
