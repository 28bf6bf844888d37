"""Tokenizers: the model directory's own, a byte-level fallback for tiny random models, and a BPE trainer."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping

import numpy as np

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
BPE_SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then bos 256, eos 257, pad 258, unk 259 (vocab_size 260)."""

    name_or_path = "byte"
    vocab_size = 260
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    unk_token_id = 259

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`, no special tokens."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of each text as an int32 array (the fast path for corpus tokenization)."""
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of byte ids; special ids are skipped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def has_tokenizer_files(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(model_cfg: Mapping):
    """The tokenizer of a `conf/model/*.yaml` mapping.

    A directory with tokenizer files, `model_cfg.tokenizer` if set, else `model_cfg.path`:
    `AutoTokenizer.from_pretrained(directory)`. Otherwise the `ByteTokenizer`; then the model's
    vocab_size (`model_cfg.config`, else the directory's config.json) must be its 260, since a
    model with another vocabulary was trained with another tokenizer.
    """
    tokenizer_dir = model_cfg.get("tokenizer")
    if tokenizer_dir:
        if not has_tokenizer_files(tokenizer_dir):
            raise ValueError(f"model.tokenizer {tokenizer_dir!r} is not a directory with tokenizer files "
                             f"({', '.join(TOKENIZER_FILES)})")
        return _auto_tokenizer(tokenizer_dir)
    path = model_cfg.get("path")
    if path and has_tokenizer_files(path):
        return _auto_tokenizer(path)
    vocab_size = (model_cfg.get("config") or {}).get("vocab_size")
    if vocab_size is None and path:
        config_file = os.path.join(path, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                vocab_size = json.load(f).get("vocab_size")
    if vocab_size is not None and vocab_size != ByteTokenizer.vocab_size:
        where = (f"model.path {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)})" if path
                 else "the model has no tokenizer (model.path and model.tokenizer are unset)")
        raise ValueError(
            f"{where}, and its vocab_size {vocab_size} is not the byte-level fallback's "
            f"{ByteTokenizer.vocab_size}: set model.tokenizer to a tokenizer directory or vocab_size to "
            f"{ByteTokenizer.vocab_size}")
    return ByteTokenizer()


def _auto_tokenizer(directory: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(directory)


def encode_batch(tokenizer, texts: list[str]) -> list:
    """Token ids of each text without special tokens, for a `ByteTokenizer` or a transformers tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_batch(texts)
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hex digest of what the tokenizer maps text to (for cache keys)."""
    if isinstance(tokenizer, ByteTokenizer):
        description = f"ByteTokenizer:{tokenizer.vocab_size}"
    else:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
        description = json.dumps([type(tokenizer).__name__, vocabulary, tokenizer.bos_token_id,
                                  tokenizer.eos_token_id, tokenizer.pad_token_id])
    return hashlib.sha256(description.encode("utf-8")).hexdigest()


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str):
    """Train a byte-level BPE tokenizer on `texts` and save it to `out_dir` for `AutoTokenizer`.

    Special tokens <|bos|> (id 0), <|eos|> (1), <|pad|> (2); all 256 bytes are in the vocabulary, so
    no text is unknown. Encoding with special tokens prepends <|bos|>. Same texts in, same tokenizer out.
    Returns the tokenizer loaded back from `out_dir`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(BPE_SPECIAL_TOKENS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(f"BPE vocab_size {vocab_size} is below the {len(specials) + len(alphabet)} ids of the "
                         f"special tokens and the 256 bytes")
    num_texts = 0

    def nonempty_texts():
        nonlocal num_texts
        for text in texts:
            if text:
                num_texts += 1
                yield text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tokenizer.train_from_iterator(nonempty_texts(), trainer=trainer)
    if num_texts == 0:
        raise ValueError("BPE training got no non-empty text: the corpus is empty")
    bos = BPE_SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **BPE_SPECIAL_TOKENS).save_pretrained(out_dir)
    return _auto_tokenizer(out_dir)
