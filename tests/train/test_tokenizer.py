import os

import pytest
from omegaconf import OmegaConf
from transformers import AutoTokenizer

from tests.conftest import ROOT
from train.data import stdlib_sources
from train.tokenizer import ByteTokenizer, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer

CONF_DIR = os.path.join(ROOT, "conf")
SAMPLE = "def f(x):\n\treturn x  # naïve 漢字 🙂\n\n"


@pytest.fixture(scope="module")
def corpus():
    return [text for _, text in stdlib_sources()[:40]]


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bpe"))
    train_bpe_tokenizer(corpus, 600, directory)
    return directory


def test_byte_tokenizer_round_trip_and_specials():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < 256
    assert tokenizer.decode([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, tokenizer.pad_token_id]) == SAMPLE
    assert tokenizer.decode([0xE6, 0x97]) == "\ufffd"  # a cut multi-byte character
    assert [a.tolist() for a in tokenizer.encode_batch(["", SAMPLE])] == [[], ids]
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert tokenizer.vocab_size == 260 and specials == (256, 257, 258)
    assert tokenizer.name_or_path == "byte"


def test_tiny_models_get_the_byte_tokenizer():
    for name in ("tiny_glm", "tiny_glm_dense", "tiny_dsv32"):
        cfg = OmegaConf.load(os.path.join(CONF_DIR, "model", f"{name}.yaml"))
        tokenizer = load_tokenizer(cfg)
        assert isinstance(tokenizer, ByteTokenizer)
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
            cfg.config.bos_token_id, cfg.config.eos_token_id, cfg.config.pad_token_id)


def test_load_tokenizer_from_a_model_directory(bpe_dir, tmp_path):
    loaded = load_tokenizer({"path": bpe_dir, "config": {}})
    assert loaded.decode(loaded.encode(SAMPLE, add_special_tokens=False)) == SAMPLE
    by_tokenizer_key = load_tokenizer({"path": None, "tokenizer": bpe_dir, "config": {"vocab_size": 600}})
    assert tokenizer_fingerprint(by_tokenizer_key) == tokenizer_fingerprint(loaded)
    (tmp_path / "config.json").write_text('{"model_type": "glm_moe_dsa", "vocab_size": 151552}')
    with pytest.raises(ValueError, match="has no tokenizer files.*vocab_size 151552"):
        load_tokenizer({"path": str(tmp_path), "config": {}})
    with pytest.raises(ValueError, match="vocab_size 1000 is not the byte-level fallback's 260"):
        load_tokenizer({"path": None, "config": {"vocab_size": 1000}})
    with pytest.raises(ValueError, match="model.tokenizer .* is not a directory with tokenizer files"):
        load_tokenizer({"path": None, "tokenizer": str(tmp_path), "config": {}})


def test_bpe_tokenizer_round_trips_through_auto_tokenizer(bpe_dir):
    tokenizer = AutoTokenizer.from_pretrained(bpe_dir)
    assert len(tokenizer) == 600
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [0, 1, 2]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    plain = tokenizer.encode(SAMPLE, add_special_tokens=False)
    assert tokenizer.decode(plain) == SAMPLE
    assert tokenizer.encode(SAMPLE) == [tokenizer.bos_token_id, *plain]
    assert tokenizer.decode(tokenizer.encode(SAMPLE), skip_special_tokens=True) == SAMPLE
    assert len(tokenizer.encode("    return self", add_special_tokens=False)) < len("    return self")  # merges learned


def test_bpe_training_is_deterministic(corpus, bpe_dir, tmp_path):
    again = train_bpe_tokenizer(iter(corpus), 600, str(tmp_path))
    with open(os.path.join(bpe_dir, "tokenizer.json"), "rb") as a, open(tmp_path / "tokenizer.json", "rb") as b:
        assert a.read() == b.read()
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(bpe_dir))
    smaller = train_bpe_tokenizer(corpus, 500, str(tmp_path / "smaller"))
    assert tokenizer_fingerprint(smaller) != tokenizer_fingerprint(again) != tokenizer_fingerprint(ByteTokenizer())


def test_bpe_training_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 100 is below the 259 ids"):
        train_bpe_tokenizer(["text"], 100, str(tmp_path))
    with pytest.raises(ValueError, match="corpus is empty"):
        train_bpe_tokenizer(["", ""], 300, str(tmp_path))
