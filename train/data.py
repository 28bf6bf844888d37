"""Training text: corpora (stdlib or installed packages' sources, local txt/jsonl(.gz/.zst)/parquet, HF datasets on
disk), packed token sequences, batches.

A corpus is a `DatasetDict` with splits "train" and "validation" and columns "text" and "source". Text and
hf_disk corpora are memory-mapped Arrow datasets written under the cache directory, never Python lists of
documents, so they may be larger than memory. `packed_datasets` tokenizes a corpus, joins documents as
`[bos] doc [eos] [bos] doc [eos] ...` and cuts the stream into rows of `seq_len` tokens (column
"input_ids") with each row's document starts (column "doc_starts"), cached on disk under a cheap key (the
source files' paths, sizes and modification times, the tokenizer, seq_len and the data settings: the corpus is
not read again once packed), each entry with a `manifest.json`. `python -m train.prepare` packs ahead of the job;
`data.prepared=<dir>` opens what it wrote there without looking at the corpus (`open_prepared`). `BatchLoader`
serves those rows to each rank as resumable, endlessly repeating epochs; with `documents=` it yields `Batch`es
that carry the document boundaries (`cu_seqlens`) and, if asked, per-document positions.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, Features, List, Value, load_from_disk
from datasets.arrow_writer import ArrowWriter
from datasets.exceptions import DatasetGenerationError

from distill.containers import plain
from train.tokenizer import encode_batch, tokenizer_fingerprint

log = logging.getLogger(__name__)

SOURCES = ("stdlib", "packages", "text", "hf_disk")
SPLITS = ("train", "validation")
TEXT_SAMPLE_BY = ("document", "paragraph", "line")
# data.join_by of the stdlib, packages and text sources: documents whose source path shares a directory / a file join.
JOIN_BY_PATH = ("directory", "file")
JOIN_SEPARATOR = "\n\n"
# Keys of a data config that do not change the packed sequences (left out of the cache key).
NON_CONTENT_KEYS = ("name", "num_proc", "cache_dir", "document_mask", "restart_positions", "prepared")
CACHE_FORMAT = 3  # 2: rows carry "doc_starts"; min_doc_tokens and join_by. 3: keyed by the source files' identity
                  # (paths, sizes, mtimes), not their text; manifest.json in each entry
MANIFEST = "manifest.json"  # in each packed entry: what it was packed from (see `packing_manifest`)
DOCUMENTS_PER_PACKING_BATCH = 256
# data.files of the text source: plain or compressed JSON lines (one record per line), parquet, or plain text
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt", *JSONL_SUFFIXES, ".parquet")
STAGES = ("dense", "sparse")
PREPARE_FIX = ("run `python -m train.prepare` with this job's overrides (the same data=..., model=..., data.* and "
               "distill.* seq_len/steps) to prepare it, or leave data.prepared unset to tokenize in the job")


class DataError(ValueError):
    """A data source or config that yields no usable training text."""


def stdlib_sources() -> list[tuple[str, str]]:
    """(path relative to the stdlib root, source text) of every standard-library `.py` file, sorted by path.

    Site-packages/dist-packages and files that cannot be read or are not UTF-8 are left out.
    """
    root = sysconfig.get_paths()["stdlib"]
    return _python_sources(root, _stdlib_paths(root))


def package_sources(packages, root: str | None = None) -> list[tuple[str, str]]:
    """(path relative to `root`, source text) of every `.py` file of the installed `packages` (directory names under
    `root`, default: this interpreter's site-packages, sysconfig's "purelib"), sorted by path: "torch/nn/linear.py".

    The paths are relative, so a document's split (a hash of its path) is the same wherever the packages are
    installed. Files that cannot be read or are not UTF-8 are left out; a package that is not a directory under
    `root` is a DataError naming it.
    """
    root = root or sysconfig.get_paths()["purelib"]
    return _python_sources(root, _package_paths(packages, root))


def _python_sources(root: str, paths) -> list[tuple[str, str]]:
    sources = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        sources.append((os.path.relpath(path, root).replace(os.sep, "/"), text))
    sources.sort(key=lambda source: source[0])
    return sources


def _stdlib_paths(root: str) -> Iterator[str]:
    """The .py files under the stdlib `root`, site-packages and dist-packages left out."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [d for d in subdirectories if d not in ("site-packages", "dist-packages")]
        yield from (os.path.join(directory, name) for name in files if name.endswith(".py"))


def _package_paths(packages, root: str) -> list[str]:
    """The .py files under `root`/<package> of each of `packages`, sorted."""
    if not packages or isinstance(packages, str):
        raise DataError(f"data.packages={packages!r}: list the installed packages to read, e.g. [torch, numpy]")
    missing = [name for name in packages if not os.path.isdir(os.path.join(root, str(name)))]
    if missing:
        raise DataError(f"data.packages: {', '.join(map(str, missing))} not installed under {root} (a package is a "
                        f"directory there); install it, drop it from data.packages or set data.packages_root")
    return sorted(os.path.join(directory, name) for package in packages
                  for directory, _, files in os.walk(os.path.join(root, str(package)))
                  for name in files if name.endswith(".py"))


def source_identity(data_cfg: Mapping) -> str:
    """A digest of what the corpus is read from, without reading it: the source's files (stdlib .py files, data.files
    and data.validation_files, the files of an hf_disk directory) by absolute path, size and modification time."""
    source = data_cfg.get("source")
    if source == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        return _digest("stdlib", root, _file_stats(sorted(_stdlib_paths(root))))
    if source == "packages":
        root = data_cfg.get("packages_root") or sysconfig.get_paths()["purelib"]
        return _digest("packages", root, _file_stats(_package_paths(data_cfg.get("packages"), root)))
    if source == "text":
        keys = ["files"] + (["validation_files"] if data_cfg.get("validation_files") else [])
        return _digest("text", {key: _file_stats(_expand_files(data_cfg.get(key), key)) for key in keys})
    if source == "hf_disk":
        path = os.path.expanduser(str(data_cfg.get("path")))
        if not data_cfg.get("path") or not os.path.isdir(path):
            raise DataError(f"data.path {data_cfg.get('path')!r} is not a directory saved by datasets' save_to_disk")
        files = sorted(os.path.join(directory, name) for directory, _, names in os.walk(path) for name in names)
        return _digest("hf_disk", _file_stats(files))
    raise DataError(f"data.source {source!r} is unknown; use one of {', '.join(SOURCES)}")


def _file_stats(paths) -> list[tuple[str, int, int]]:
    stats = []
    for path in paths:
        stat = os.stat(path)
        stats.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
    return stats


def stage_seq_lens(distill_cfg: Mapping) -> dict[str, int]:
    """{stage: row length} of the stages that run (distill.dense_steps / sparse_steps > 0): distill.dense_seq_len and
    distill.sparse_seq_len, each distill.seq_len when unset."""
    lengths = {}
    for stage in STAGES:
        if (distill_cfg.get(f"{stage}_steps") or 0) > 0:
            value = distill_cfg.get(f"{stage}_seq_len")
            lengths[stage] = int(distill_cfg["seq_len"] if value is None else value)
    return lengths


def build_corpus(data_cfg: Mapping, cache_dir: str | None = None) -> DatasetDict:
    """The "train" and "validation" splits (columns "text", "source") of a `conf/data/*.yaml` mapping.

    source stdlib: one document per standard-library file. source packages: one per `.py` file of the installed
    packages `packages` (`package_sources`). source text: `files` (.txt/.jsonl paths or
    globs). source hf_disk: the text column of `datasets.load_from_disk(path)`. Text and hf_disk
    documents are written once to memory-mapped Arrow files under `<cache_dir>/documents` (default:
    `data_cfg.cache_dir`, else `default_cache_dir()`). `max_documents` keeps the first documents (in the
    source's order); then `join_by` joins the documents of one source directory, file or (hf_disk) column
    value into one long document, groups in order of first appearance, members in order, separated by a
    blank line; its "source" becomes the group. Unless the source has its own validation documents, a
    document goes to validation when a SHA-256 hash of its "source" falls below `val_fraction`, so the
    split of a document never depends on the others (and a joined group lies in one split).
    """
    source = data_cfg.get("source")
    documents_dir = os.path.join(_cache_root(data_cfg, cache_dir), "documents")
    if source in ("stdlib", "packages"):
        files = _documents_dataset(stdlib_sources() if source == "stdlib" else
                                   package_sources(data_cfg.get("packages"), data_cfg.get("packages_root")))
        corpus = _split(_joined(_head(files, _max_documents(data_cfg)), data_cfg, documents_dir), data_cfg)
    elif source == "text":
        corpus = _text_corpus(data_cfg, documents_dir)
    elif source == "hf_disk":
        corpus = _hf_disk_corpus(data_cfg, documents_dir)
    else:
        raise DataError(f"data.source {source!r} is unknown; use one of {', '.join(SOURCES)}")
    for split in SPLITS:
        if len(corpus[split]) == 0:
            raise DataError(f"data source {source!r} gives no {split} documents "
                            f"({len(corpus['train']) + len(corpus['validation'])} in all); "
                            f"check data.files/path, data.max_documents and data.val_fraction")
    return corpus


def packed_datasets(data_cfg: Mapping, tokenizer, seq_len: int, cache_dir: str | None = None) -> DatasetDict:
    """"train" and "validation" rows of `seq_len` tokens: columns "input_ids" (int32 [seq_len]) and
    "doc_starts" (int32 [num_starts]: the sorted positions in the row where a document begins; always 0
    first, since a document cut at the end of a row goes on at position 0 of the next).

    With data.prepared set: the rows `python -m train.prepare` wrote into that directory (`open_prepared`), the
    corpus never read. Otherwise each split's documents are tokenized (`datasets.map`, batched,
    `data_cfg.num_proc` processes, into Arrow files on disk); those of fewer than `data_cfg.min_doc_tokens`
    tokens (bos/eos not counted) are dropped; the rest are joined as [bos] doc [eos] (bos only if the
    tokenizer has one) into one stream that is cut into rows; the last partial row is dropped. Packing streams
    over the tokenized documents, so neither step holds the corpus in memory. The result is cached under
    `cache_dir` (default: `data_cfg.cache_dir`, else `default_cache_dir()`), keyed by the source's files (paths,
    sizes, modification times: `source_identity`), the tokenizer, seq_len and the data config, so a cached entry
    opens without reading the corpus; a cache directory appears only complete (written to a temporary directory,
    then renamed).
    """
    if data_cfg.get("prepared"):
        return open_prepared(data_cfg, tokenizer, seq_len)
    return pack_to(data_cfg, tokenizer, seq_len, cache_dir)[0]


def pack_to(data_cfg: Mapping, tokenizer, seq_len: int, cache_dir: str | None = None, out_dir: str | None = None,
            num_proc: int | None = None) -> tuple[DatasetDict, str, bool]:
    """(rows, entry directory, whether they were packed now) of `packed_datasets`, the entry found or written under
    `out_dir` (default: the cache root); the documents of text and hf_disk corpora go to the cache root's
    documents/ either way. num_proc: tokenizing processes (default data.num_proc)."""
    seq_len, min_doc_tokens = _packing_options(tokenizer, seq_len, data_cfg)
    root = _cache_root(data_cfg, cache_dir)
    out = os.path.expanduser(out_dir) if out_dir else root
    manifest = packing_manifest(data_cfg, tokenizer, seq_len, source_identity(data_cfg))
    key = _digest(*(manifest[field] for field in KEY_FIELDS))
    path = os.path.join(out, f"{data_cfg.get('source')}-{seq_len}-{key[:20]}")
    if os.path.isdir(path):
        log.info("packed data from cache %s", path)
        return load_from_disk(path), path, False
    log.info("no packed rows of %d tokens of this corpus under %s: tokenizing (`python -m train.prepare` with the "
             "same overrides does this once, on every core)", seq_len, out)
    start = time.perf_counter()
    corpus = build_corpus(data_cfg, root)
    os.makedirs(out, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.work-", dir=out)
    num_proc = int(num_proc or data_cfg.get("num_proc") or 1)
    try:
        packed = DatasetDict({split: _pack(corpus[split], tokenizer, seq_len, num_proc, min_doc_tokens,
                                           os.path.join(work_dir, split), fingerprint=f"{key[:20]}-{split}")
                              for split in SPLITS})
        for split in SPLITS:
            if len(packed[split]) == 0:
                raise DataError(
                    f"the {split} split ({len(corpus[split])} documents"
                    + (f", of which those of >= data.min_doc_tokens={min_doc_tokens} tokens are kept" if min_doc_tokens
                       else "") +
                    f") has fewer than seq_len={seq_len} tokens, so it packs into no sequence; use more documents "
                    f"(data.max_documents, data.val_fraction, data.min_doc_tokens) or a shorter seq_len")
        manifest.update(rows={split: len(packed[split]) for split in SPLITS},
                        documents={split: len(corpus[split]) for split in SPLITS},
                        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
        _save_atomically(packed, path, manifest)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    packed = load_from_disk(path)
    log.info("packed %d train and %d validation sequences of %d tokens in %.1f s into %s",
             len(packed["train"]), len(packed["validation"]), seq_len, time.perf_counter() - start, path)
    return packed, path, True


# The manifest fields that make the cache key (the others describe the entry).
KEY_FIELDS = ("format", "source", "tokenizer", "seq_len", "data")


def packing_manifest(data_cfg: Mapping, tokenizer, seq_len: int, identity: str | None = None) -> dict:
    """What packed rows depend on: the cache format, the source's identity (`source_identity`), the tokenizer's
    fingerprint (and name), seq_len and the data config's content keys (all but NON_CONTENT_KEYS)."""
    return {"format": CACHE_FORMAT, "source": identity, "tokenizer": tokenizer_fingerprint(tokenizer),
            "tokenizer_name": str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)),
            "seq_len": int(seq_len), "data": _content(data_cfg)}


def open_prepared(data_cfg: Mapping, tokenizer, seq_len: int) -> DatasetDict:
    """The rows of `seq_len` tokens that `python -m train.prepare` wrote into the directory data.prepared, opened
    without reading the corpus: the newest entry whose manifest has this seq_len, this tokenizer and these data
    settings (data.* but name, num_proc, cache_dir, document_mask, restart_positions, prepared). Anything else is a
    DataError naming what differs and the fix."""
    directory = os.path.expanduser(str(data_cfg.get("prepared")))
    seq_len = _packing_options(tokenizer, seq_len, data_cfg)[0]
    if not os.path.isdir(directory):
        raise DataError(f"data.prepared={directory!r} is not a directory: {PREPARE_FIX}")
    entries = []
    for name in sorted(os.listdir(directory)):
        try:
            with open(os.path.join(directory, name, MANIFEST)) as f:
                entries.append((os.path.join(directory, name), json.load(f)))
        except (OSError, ValueError):
            continue  # not a prepared entry (a temporary directory, documents/, ...)
    if not entries:
        raise DataError(f"data.prepared={directory!r} holds no prepared data (no <entry>/{MANIFEST}): {PREPARE_FIX}")
    lengths = sorted({manifest.get("seq_len") for _, manifest in entries}, key=str)
    entries = sorted((e for e in entries if e[1].get("seq_len") == seq_len), key=lambda e: str(e[1].get("created")),
                     reverse=True)
    if not entries:
        raise DataError(f"data.prepared={directory!r} has no rows of seq_len={seq_len} tokens (it has "
                        f"{', '.join(map(str, lengths))}; this job's row lengths are distill.dense_seq_len and "
                        f"distill.sparse_seq_len, by default distill.seq_len): {PREPARE_FIX}")
    wanted = packing_manifest(data_cfg, tokenizer, seq_len)
    for path, manifest in entries:
        if _manifest_mismatch(manifest, wanted) is None:
            log.info("prepared data %s (%s train, %s validation rows of %d tokens)", path,
                     *(manifest.get("rows", {}).get(split, "?") for split in SPLITS), seq_len)
            return load_from_disk(path)
    path, manifest = entries[0]
    raise DataError(f"data.prepared={directory!r}: its rows of {seq_len} tokens ({path}) were prepared with "
                    f"{_manifest_mismatch(manifest, wanted)}: {PREPARE_FIX}")


def _manifest_mismatch(manifest: Mapping, wanted: Mapping) -> str | None:
    """What differs between a prepared entry's manifest and this job's (`packing_manifest`), or None."""
    if manifest.get("format") != wanted["format"]:
        return f"cache format {manifest.get('format')!r}, this version of train.data packs format {wanted['format']}"
    if manifest.get("tokenizer") != wanted["tokenizer"]:
        return (f"tokenizer {manifest.get('tokenizer_name')!r} ({str(manifest.get('tokenizer'))[:12]}), this job's "
                f"is {wanted['tokenizer_name']!r} ({wanted['tokenizer'][:12]}): model.tokenizer / model.path / model=")
    theirs, ours = manifest.get("data") or {}, wanted["data"]
    for key in sorted(set(theirs) | set(ours)):
        if theirs.get(key) != ours.get(key):
            return f"data.{key}={theirs.get(key)!r}, this job has data.{key}={ours.get(key)!r}"
    return None


def _content(data_cfg: Mapping) -> dict:
    """The data config's keys that change the packed rows, JSON-normalised (lists, not tuples)."""
    return json.loads(json.dumps({k: v for k, v in plain(data_cfg).items() if k not in NON_CONTENT_KEYS},
                                 sort_keys=True, default=str))


def _packing_options(tokenizer, seq_len, data_cfg: Mapping) -> tuple[int, int]:
    """(seq_len, data.min_doc_tokens), checked."""
    if int(seq_len) < 1:
        raise DataError(f"seq_len must be a positive number of tokens, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos token, which packing puts between documents")
    min_doc_tokens = data_cfg.get("min_doc_tokens") or 0
    if not isinstance(min_doc_tokens, int) or min_doc_tokens < 0:
        raise DataError(f"data.min_doc_tokens must be a count of tokens >= 0 (0: keep all), got {min_doc_tokens!r}")
    return int(seq_len), min_doc_tokens


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/indexcache/data, by default ~/.cache/indexcache/data."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "indexcache", "data")


@dataclass(frozen=True)
class Batch:
    """One batch of packed rows and their documents.

    input_ids: int64 [B, T]. cu_seqlens: int32 [num_docs + 1], the documents' offsets over the flattened
    B*T tokens (flash-attention varlen convention: 0 first, B*T last; every row start is an offset, so a
    document cut at a row's end is two documents here), or None when attention may cross documents
    (data.document_mask=false). max_seqlen: the longest document's tokens (with cu_seqlens), else None.
    position_ids: int64 [B, T], each token's offset from its document's start (data.restart_positions),
    or None: positions run on 0..T-1 in every row.
    """

    input_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    position_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """The same batch with its tensors on `device`."""
        def moved(tensor):
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)
        return replace(self, input_ids=moved(self.input_ids), cu_seqlens=moved(self.cu_seqlens),
                       position_ids=moved(self.position_ids))


class BatchLoader:
    """Endless batches of one rank's share of each epoch: int64 tensors [batch_size, seq_len], or with
    `documents` (a data config: its document_mask, default true, and restart_positions, default false)
    `Batch`es with the rows' document boundaries.

    Epoch e visits the rows in the order of a permutation seeded by seed + e (or in order without
    shuffle); its global batches are consecutive runs of batch_size * world_size rows, of which rank r
    takes the r-th batch_size rows, so ranks never share a row within an epoch. A trailing part smaller
    than one global batch is skipped. `state_dict`/`load_state_dict` resume at the next batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, *, documents: Mapping | None = None):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"BatchLoader needs batch_size >= 1 and 0 <= rank < world_size, got "
                            f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.rows = _batch_rows(dataset, documents)
        self.documents = documents
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

    def __next__(self) -> torch.Tensor | Batch:
        if self.position == self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = (self.position * self.world_size + self.rank) * self.batch_size
        indices = self._epoch_order()[start:start + self.batch_size]
        self.position += 1
        return _batch(self.rows[indices], self.documents)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise DataError(f"BatchLoader state {dict(state)} does not fit {self.batches_per_epoch} batches per epoch")
        self.epoch, self.position = epoch, position


def eval_batches(dataset: Dataset, batch_size: int, max_batches: int | None = None, *,
                 documents: Mapping | None = None) -> list[torch.Tensor] | list[Batch]:
    """The first rows of `dataset` in order, in batches of <= batch_size rows (the last may be short):
    int64 tensors [rows, seq_len], or with `documents` (as for `BatchLoader`) `Batch`es."""
    rows = _batch_rows(dataset, documents)
    num_rows = len(rows) if max_batches is None else min(len(rows), max_batches * batch_size)
    return [_batch(rows[start:min(start + batch_size, num_rows)], documents)
            for start in range(0, num_rows, batch_size)]


def _document_options(documents: Mapping) -> tuple[bool, bool]:
    """(document_mask, restart_positions) of a data config, defaults true and false."""
    options = (documents.get("document_mask", True), documents.get("restart_positions", False))
    for name, value in zip(("document_mask", "restart_positions"), options):
        if not isinstance(value, bool):
            raise DataError(f"data.{name} must be true or false, got {value!r}")
    return options


def _batch_rows(dataset: Dataset, documents: Mapping | None) -> Dataset:
    """`dataset` as numpy rows of the columns that batches of these `documents` options read."""
    columns = ["input_ids"] + (["doc_starts"] if documents is not None and any(_document_options(documents)) else [])
    missing = [column for column in columns if column not in dataset.column_names]
    if missing:
        raise DataError(f"batches need the columns {columns}; the dataset has {dataset.column_names}"
                        + ("; pack it with train.data.packed_datasets, which records each row's document starts "
                           "(or set data.document_mask=false and data.restart_positions=false)"
                           if missing == ["doc_starts"] else ""))
    return dataset.with_format("numpy", columns=columns)


def _batch(rows: Mapping, documents: Mapping | None) -> torch.Tensor | Batch:
    """The batch of numpy rows ("input_ids" [B, T], "doc_starts" per row): a tensor without `documents`."""
    input_ids = torch.from_numpy(rows["input_ids"].astype(np.int64))
    if documents is None:
        return input_ids
    document_mask, restart_positions = _document_options(documents)
    if not (document_mask or restart_positions):
        return Batch(input_ids)
    num_rows, seq_len = input_ids.shape
    starts = np.concatenate([row * seq_len + np.asarray(row_starts, dtype=np.int64)
                             for row, row_starts in enumerate(rows["doc_starts"])])
    bounds = np.append(starts, num_rows * seq_len)
    lengths = np.diff(bounds)
    if np.any(lengths <= 0) or not np.all(np.isin(np.arange(num_rows) * seq_len, starts)):
        raise DataError(f"doc_starts of a batch must be sorted distinct positions in [0, {seq_len}) that start "
                        f"with 0 in every row; got {[list(s) for s in rows['doc_starts']]}")
    cu_seqlens, max_seqlen = (torch.from_numpy(bounds.astype(np.int32)), int(lengths.max())) if document_mask \
        else (None, None)
    position_ids = None
    if restart_positions:
        tokens = np.arange(num_rows * seq_len)
        positions = tokens - starts[np.searchsorted(starts, tokens, side="right") - 1]
        position_ids = torch.from_numpy(positions.reshape(num_rows, seq_len))
    return Batch(input_ids, cu_seqlens, max_seqlen, position_ids)


def _pack(documents: Dataset, tokenizer, seq_len: int, num_proc: int, min_doc_tokens: int, work_dir: str,
          fingerprint: str) -> Dataset:
    """Rows of seq_len tokens cut from the stream [bos] doc [eos] [bos] doc [eos] ... of `documents`, with
    their "doc_starts"; tokenized and packed into Arrow files under `work_dir` (memory-mapped)."""
    prefix = np.array([] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id], dtype=np.int32)
    suffix = np.array([tokenizer.eos_token_id], dtype=np.int32)

    def tokenize(batch):
        ids = [np.asarray(x, dtype=np.int32) for x in encode_batch(tokenizer, batch["text"])]
        return {"input_ids": [np.concatenate([prefix, x, suffix]) for x in ids if len(x) >= min_doc_tokens]}

    os.makedirs(work_dir)
    tokenized = documents.map(tokenize, batched=True, remove_columns=documents.column_names,
                              num_proc=num_proc if num_proc > 1 else None,
                              cache_file_name=os.path.join(work_dir, "tokenized.arrow"),
                              features=Features({"input_ids": List(Value("int32"))}),
                              new_fingerprint=fingerprint, desc="tokenize")
    path = os.path.join(work_dir, "packed.arrow")
    features = Features({"input_ids": List(Value("int32"), length=seq_len), "doc_starts": List(Value("int32"))})
    with ArrowWriter(features=features, path=path) as writer:
        for table in _packed_tables(tokenized, seq_len):
            writer.write_table(table)
        writer.finalize()
    return Dataset.from_file(path)


def _packed_tables(tokenized: Dataset, seq_len: int) -> Iterator[pa.Table]:
    """Tables of the full rows ("input_ids", "doc_starts") of the token stream of `tokenized`, in order.

    Reads DOCUMENTS_PER_PACKING_BATCH documents at a time and carries the tokens of an unfinished row
    (with the offsets of the documents that start in it) into the next batch.
    """
    carry = np.empty(0, dtype=np.int32)
    carry_starts = np.empty(0, dtype=np.int64)  # offsets in `carry` where a document starts
    for table in tokenized.with_format("arrow").iter(batch_size=DOCUMENTS_PER_PACKING_BATCH):
        column = table["input_ids"].combine_chunks()
        lengths = pc.list_value_length(column).to_numpy().astype(np.int64)
        stream = np.concatenate([carry, column.flatten().to_numpy()])
        starts = np.concatenate([carry_starts, len(carry) + np.cumsum(lengths) - lengths])
        cut = len(stream) // seq_len * seq_len
        if cut:
            boundaries = np.union1d(np.arange(0, cut, seq_len), starts[starts < cut])  # every row starts one
            offsets = np.searchsorted(boundaries // seq_len, np.arange(cut // seq_len + 1))
            yield pa.table({
                "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(stream[:cut]), seq_len),
                "doc_starts": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                                       pa.array((boundaries % seq_len).astype(np.int32)))})
        carry, carry_starts = stream[cut:], starts[starts >= cut] - cut


def _save_atomically(dataset: DatasetDict, path: str, manifest: Mapping | None = None) -> None:
    """`dataset.save_to_disk(path)` (and `manifest` as its manifest.json) through a temporary sibling directory,
    so `path` is complete or absent."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        dataset.save_to_disk(staging)
        if manifest is not None:
            with open(os.path.join(staging, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
        try:
            os.rename(staging, path)
        except OSError:
            if not os.path.isdir(path):
                raise
            shutil.rmtree(staging)  # another process wrote the same cache entry first
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _cache_root(data_cfg: Mapping, cache_dir: str | None) -> str:
    """`cache_dir`, else data.cache_dir, else `default_cache_dir()`, with ~ expanded."""
    return os.path.expanduser(cache_dir or data_cfg.get("cache_dir") or default_cache_dir())


def _document_features() -> Features:
    return Features({"text": Value("string"), "source": Value("string")})


def _documents_dataset(documents: list[tuple[str, str]]) -> Dataset:
    """Columns "text" and "source" of the non-empty documents."""
    documents = [(source, text) for source, text in documents if text]
    return Dataset.from_dict({"text": [text for _, text in documents], "source": [source for source, _ in documents]},
                             features=_document_features())


def _generated(generator, gen_kwargs: dict, fingerprint: str, documents_dir: str,
               features: Features | None = None) -> Dataset:
    """`Dataset.from_generator`: the rows of `generator(**gen_kwargs)` written once to a memory-mapped
    Arrow file under `documents_dir`, reused while `fingerprint` (which must name the content) is the same."""
    features = features or _document_features()
    rows = 0

    def counted(**kwargs):
        nonlocal rows
        for row in generator(**kwargs):
            rows += 1
            yield row

    # from_generator shards list arguments over separate generator runs; as tuples they reach one run whole
    gen_kwargs = {name: tuple(value) if isinstance(value, list) else value for name, value in gen_kwargs.items()}
    try:
        return Dataset.from_generator(counted, features=features, gen_kwargs=gen_kwargs, cache_dir=documents_dir,
                                      fingerprint=fingerprint)
    except DatasetGenerationError as error:
        if isinstance(error.__cause__, DataError):
            raise error.__cause__ from None
        raise
    except ValueError:
        if rows:
            raise
        return Dataset.from_dict({name: [] for name in features}, features=features)  # datasets refuses 0 rows


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


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
    """Train/validation by the hash of each document's "source"."""
    val_fraction = data_cfg.get("val_fraction")
    if val_fraction is None or not 0 < float(val_fraction) < 1:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    in_validation = np.fromiter((_in_validation(key, float(val_fraction))
                                 for batch in documents.select_columns(["source"]).iter(batch_size=10_000)
                                 for key in batch["source"]), dtype=bool, count=len(documents))
    return DatasetDict(train=documents.select(np.flatnonzero(~in_validation)),
                       validation=documents.select(np.flatnonzero(in_validation)))


def _joined(documents: Dataset, data_cfg: Mapping, documents_dir: str) -> Dataset:
    """`documents` with those of one group joined (see `build_corpus`), or unchanged when data.join_by is null.

    The group of a document is its "group" column (hf_disk) or, for join_by directory/file, the directory
    (a file at the top of the source stays alone) or the path of its "source".
    """
    join_by = data_cfg.get("join_by")
    if join_by is None:
        return documents
    if "group" not in documents.column_names and join_by not in JOIN_BY_PATH:
        raise DataError(f"data.join_by {join_by!r} is unknown for source {data_cfg.get('source')!r}; "
                        f"use one of {', '.join(JOIN_BY_PATH)} or null")
    key_column = "group" if "group" in documents.column_names else "source"
    group_of = np.empty(len(documents), dtype=np.int64)  # group number of each document, by first appearance
    keys: dict[str, int] = {}
    row = 0
    for batch in documents.select_columns([key_column]).iter(batch_size=10_000):
        for key in batch[key_column]:
            if key_column == "source":
                path = re.sub(r":\d+$", "", key)  # "path:number" of a paragraph, line or jsonl record
                key = path if join_by == "file" else os.path.dirname(path) or path
            group_of[row] = keys.setdefault(key, len(keys))
            row += 1
    order = np.argsort(group_of, kind="stable")  # documents group by group, each group's in order
    bounds = np.searchsorted(group_of[order], np.arange(len(keys) + 1))

    def joined(texts: Dataset, keys: tuple[str, ...], order: np.ndarray, bounds: np.ndarray):
        for group, key in enumerate(keys):
            yield {"text": JOIN_SEPARATOR.join(texts[order[bounds[group]:bounds[group + 1]]]["text"]), "source": key}

    return _generated(joined, {"texts": documents.select_columns(["text"]), "keys": list(keys), "order": order,
                               "bounds": bounds},
                      _digest("joined", documents._fingerprint, join_by, JOIN_SEPARATOR), documents_dir)


def _text_corpus(data_cfg: Mapping, documents_dir: str) -> DatasetDict:
    train = _joined(_text_documents(data_cfg, "files", documents_dir), data_cfg, documents_dir)
    if not data_cfg.get("validation_files"):
        return _split(train, data_cfg)
    validation = _text_documents(data_cfg, "validation_files", documents_dir)
    return DatasetDict(train=train, validation=_joined(validation, data_cfg, documents_dir))


def _text_documents(data_cfg: Mapping, key: str, documents_dir: str) -> Dataset:
    """The first max_documents non-empty documents of the .txt/.jsonl(.gz/.zst)/.parquet files of `data_cfg[key]`,
    memory-mapped: "source" is "path" (a .txt document) or "path:number" (a paragraph, a line, a jsonl record or a
    parquet row, counted from 1).

    Cached by the files' paths, sizes and modification times and the reading options.
    """
    sample_by = data_cfg.get("sample_by", "document")
    if sample_by not in TEXT_SAMPLE_BY:
        raise DataError(f"data.sample_by {sample_by!r} is unknown; use one of {', '.join(TEXT_SAMPLE_BY)}")
    text_field = data_cfg.get("text_field", "text")
    limit = _max_documents(data_cfg)
    paths = _expand_files(data_cfg.get(key), key)
    return _generated(_text_rows, {"paths": paths, "sample_by": sample_by, "text_field": text_field, "limit": limit},
                      _digest("text", _file_stats(paths), sample_by, text_field, limit), documents_dir)


def _text_rows(paths: tuple[str, ...], sample_by: str, text_field: str, limit: int | None) -> Iterator[dict]:
    """Rows {"text", "source"} of the non-empty documents of `paths`, at most `limit`; one file read at a time,
    jsonl line by line and parquet one record batch at a time."""
    def documents():
        for path in paths:
            if path.endswith(JSONL_SUFFIXES):
                yield from _jsonl_documents(path, text_field)
                continue
            if path.endswith(".parquet"):
                yield from _parquet_documents(path, text_field)
                continue
            text = _read_text(path)
            if sample_by == "document":
                yield path, text
            else:
                pieces = re.split(r"\n\s*\n", text) if sample_by == "paragraph" else text.splitlines()
                yield from ((f"{path}:{i}", piece) for i, piece in enumerate(pieces) if piece.strip())

    count = 0
    for source, text in documents():
        if limit is not None and count == limit:
            return
        if text:
            count += 1
            yield {"text": text, "source": source}


def _expand_files(patterns, key: str) -> list[str]:
    """The files of a path/glob or a list of them, each pattern's matches sorted, duplicates dropped."""
    if not patterns:
        raise DataError(f"data.{key} is empty: list .txt, .jsonl (.jsonl.gz, .jsonl.zst) or .parquet files or globs")
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
            if not path.endswith(TEXT_SUFFIXES):
                raise DataError(f"data.{key}: {path!r} is neither .txt nor .jsonl (nor .jsonl.gz, .jsonl.zst, "
                                f".parquet)")
            if path not in paths:
                paths.append(path)
    return paths


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path!r} is not UTF-8 text: {error}") from None


def _zstandard():
    """The `zstandard` module, or None when it is not installed."""
    try:
        import zstandard
    except ImportError:
        return None
    return zstandard


def _pyarrow_zstd() -> bool:
    """Whether pyarrow (a dependency of datasets) was built with its zstd codec (its wheels are)."""
    return pa.Codec.is_available("zstd")


def _open_binary(path: str):
    """A binary stream of the decompressed bytes of `path` (.gz: gzip; .zst: the zstandard package, else pyarrow's
    zstd codec; otherwise the file as it is)."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        zstandard = _zstandard()
        if zstandard is not None:
            return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
        if _pyarrow_zstd():
            return pa.CompressedInputStream(pa.OSFile(path), "zstd")
        raise DataError(f"{path!r} is zstd-compressed and neither the zstandard package nor pyarrow's zstd codec is "
                        f"there to read it: pip install zstandard")
    return open(path, "rb")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    zstandard = _zstandard()
    return (OSError, EOFError, pa.ArrowException, *((zstandard.ZstdError,) if zstandard is not None else ()))


def _jsonl_documents(path: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(source "path:line number", text) of the records of a .jsonl file (plain, .gz or .zst), read line by line."""
    with contextlib.closing(io.TextIOWrapper(_open_binary(path), encoding="utf-8")) as f:
        lines = enumerate(f, start=1)
        while True:
            try:
                number, line = next(lines)
            except StopIteration:
                return
            except UnicodeDecodeError as error:
                raise DataError(f"{path!r} is not UTF-8 text: {error}") from None
            except _decompression_errors() as error:
                raise DataError(f"{path!r} cannot be read (a damaged or mis-named compressed file?): {error}") \
                    from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number} is not valid JSON: {error}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise DataError(f"{path}:{number} has no string field {text_field!r} (data.text_field)")
            yield f"{path}:{number}", record[text_field]


def _parquet_documents(path: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(source "path:row number" from 1, text) of the rows of a parquet file, one record batch at a time."""
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise DataError(f"{path!r} is not a parquet file: {error}") from None
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(f"{path!r} has columns {schema.names}, not data.text_field {text_field!r}")
    field_type = schema.field(text_field).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise DataError(f"{path!r} column {text_field!r} (data.text_field) is {field_type}, not strings")
    number = 0
    for batch in parquet.iter_batches(batch_size=1000, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            number += 1
            if text is None:
                raise DataError(f"{path}:{number} has no string field {text_field!r} (data.text_field): it is null")
            yield f"{path}:{number}", text


def _hf_disk_corpus(data_cfg: Mapping, documents_dir: str) -> DatasetDict:
    """A dataset saved with `save_to_disk`: its train_split and validation_split (default "train",
    "validation"), or a hash split of train_split (or of a plain Dataset) by row number. data.join_by
    names a column whose value groups the rows to join."""
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
    join_by = data_cfg.get("join_by")
    limit = _max_documents(data_cfg)

    def documents(dataset: Dataset, split: str) -> Dataset:
        """The first `limit` non-empty texts of `dataset`, source "<split>/<row number>" (and "group")."""
        for field, what in ((text_field, "data.text_field"), (join_by, "data.join_by")):
            if field is not None and field not in dataset.column_names:
                raise DataError(f"data.path {path!r} split {split!r} has columns {dataset.column_names}, "
                                f"not {what} {field!r}")
        features = Features({**_document_features(), **({"group": Value("string")} if join_by else {})})
        columns = [text_field] + ([join_by] if join_by and join_by != text_field else [])
        return _generated(_hf_rows, {"dataset": dataset.select_columns(columns), "split": split,
                                     "text_field": text_field, "join_by": join_by, "limit": limit},
                          _digest("hf_disk", os.path.abspath(os.path.expanduser(path)), dataset._fingerprint, split,
                                  text_field, join_by, limit), documents_dir, features)

    train = _joined(documents(train, train_split), data_cfg, documents_dir)
    if validation is None:
        return _split(train, data_cfg)
    return DatasetDict(train=train, validation=_joined(documents(validation, validation_split), data_cfg,
                                                       documents_dir))


def _hf_rows(dataset: Dataset, split: str, text_field: str, join_by: str | None, limit: int | None) -> Iterator[dict]:
    """Rows {"text", "source"[, "group"]} of the non-empty texts of `dataset`, at most `limit`."""
    count, row = 0, 0
    for batch in dataset.iter(batch_size=1000):
        for i, text in enumerate(batch[text_field]):
            if limit is not None and count == limit:
                return
            if text:
                count += 1
                yield {"text": text, "source": f"{split}/{row + i}",
                       **({"group": str(batch[join_by][i])} if join_by else {})}
        row += len(batch[text_field])
