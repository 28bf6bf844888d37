import pytest
from hypothesis import given
from hypothesis import strategies as st

from distill.pattern import Pattern, PatternError, resolve_pattern

patterns = st.integers(1, 40).flatmap(
    lambda n: st.text(alphabet="FS", min_size=n - 1, max_size=n - 1).map(lambda rest: "F" + rest))


@given(patterns)
def test_groups_partition_layers_and_owners(text):
    p = Pattern.parse(text)
    groups = p.groups()
    assert sorted(l for members in groups.values() for l in members) == list(range(len(text)))
    assert list(groups) == p.full_layers
    for f, members in groups.items():
        assert members == sorted(members) and members[0] == f
        assert all(text[l] == "S" for l in members[1:])
        assert all(p.owner(l) == f for l in members)


@given(patterns)
def test_round_trips(text):
    p = Pattern.parse(text)
    assert str(p) == text
    assert Pattern.parse(str(p)) == p
    assert Pattern.from_indexer_types(p.indexer_types()) == p
    assert p.retention == text.count("F") / len(text)


@given(st.integers(1, 64), st.floats(0.001, 1.0))
def test_from_retention(num_layers, ratio):
    n_full = round(ratio * num_layers)
    if n_full == 0:
        with pytest.raises(PatternError, match="rounds to 0"):
            Pattern.from_retention(num_layers, ratio)
        return
    p = Pattern.from_retention(num_layers, ratio)
    assert len(p) == num_layers and len(p.full_layers) == n_full and str(p)[0] == "F"


@given(st.text(max_size=12))
def test_parse_fuzz_never_crashes_unexpectedly(text):
    try:
        p = Pattern.parse(text)
    except PatternError as e:
        # names the pattern and what a valid one is: F/S letters, F first
        assert "pattern" in str(e) and "F" in str(e), str(e)
    else:
        assert set(str(p)) <= {"F", "S"} and str(p)[0] == "F"


def test_examples():
    assert str(Pattern.uniform(8, 4)) == "FSSSFSSS"
    assert str(Pattern.from_retention(8, 0.25)) == "FSSSFSSS"
    assert Pattern.parse("FSSF").groups() == {0: [0, 1, 2], 3: [3]}
    assert Pattern.parse("fs sf").letters == "FSSF"
    assert Pattern.parse("FSFS").indexer_types() == ["full", "shared", "full", "shared"]


def test_consumer_frequency_rules():
    glm = Pattern.from_freq(78, 4, "transformers", offset=3)
    assert glm.full_layers[:4] == [0, 1, 2, 6] and len(glm.full_layers) == 21
    assert str(Pattern.from_freq(8, 4, "sglang")) == "FFSSSFSS"
    assert Pattern.parse("FFSSSFSS").freq("sglang") == 4
    assert Pattern.parse("FSSSFSSS").freq("sglang") is None
    assert Pattern.parse("FSSSFSSS").freq("transformers", offset=1) == 4
    with pytest.raises(PatternError, match="unknown consumer"):
        Pattern.from_freq(8, 4, "vllm2")


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("SFFF", "starts with S"), ("FXSF", r"\['X'\]"), ("F1", r"\['1'\]")])
def test_bad_patterns(text, message):
    with pytest.raises(PatternError, match=message):
        Pattern.parse(text)


def test_wrong_length_and_bad_numbers():
    with pytest.raises(PatternError, match="has 3 letters but the model has 4"):
        Pattern.parse("FSF", num_layers=4)
    with pytest.raises(PatternError, match="retention ratio"):
        Pattern.from_retention(8, 1.5)
    with pytest.raises(PatternError, match="freq"):
        Pattern.uniform(8, 0)
    with pytest.raises(PatternError, match="smallest reachable"):
        resolve_pattern(8, retention=0.01)
    assert str(resolve_pattern(4, pattern="FSFS", retention=0.25)) == "FSFS"
    assert str(resolve_pattern(4)) == "FFFF"


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": ""}, r"distill\.pattern='': pattern is empty"),
    ({"freq": 0}, r"distill\.freq=0: freq must be a positive integer"),
    ({"retention": "abc"}, r"distill\.retention='abc': retention ratio must be in \(0, 1\]"),
    ({"retention": True}, r"distill\.retention=True"),
])
def test_a_value_that_is_set_is_never_skipped(kwargs, message):
    """Falsy values (0, '') are refused with the key named, not replaced by the next key's value."""
    with pytest.raises(PatternError, match=message):
        resolve_pattern(8, **{"retention": 0.25, **kwargs}, key_prefix="distill.")
