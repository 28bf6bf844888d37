"""F/S indexer patterns (docs/DESIGN.md section 1) and their consumer forms (section 5).

A `Pattern` holds one letter per DSA layer: `F` runs its own indexer, `S` reuses the top-k
of the nearest preceding `F` layer (its *owner*). Layer 0 is always `F`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


class PatternError(ValueError):
    """A pattern string, frequency or retention that no valid pattern satisfies."""


@dataclass(frozen=True)
class Pattern:
    letters: str

    def __post_init__(self):
        if not isinstance(self.letters, str) or not self.letters:
            raise PatternError("pattern is empty: give one letter (F or S) per DSA layer")
        bad = sorted({c for c in self.letters if c not in "FS"})
        if bad:
            raise PatternError(f"pattern {self.letters!r} has letters {bad}; only 'F' (full) and 'S' (shared) "
                               "are allowed")
        if self.letters[0] != "F":
            raise PatternError(f"pattern {self.letters!r} starts with S: layer 0 has no earlier layer to share from, "
                               "it must be F")

    # ---- constructors -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, num_layers: int | None = None) -> "Pattern":
        """Parse an F/S string (case-insensitive, spaces and commas ignored); check its length if given."""
        if not isinstance(text, str):
            raise PatternError(f"pattern must be a string of F/S letters, got {type(text).__name__}")
        pattern = cls(text.replace(" ", "").replace(",", "").upper())
        if num_layers is not None:
            pattern.check_layers(num_layers)
        return pattern

    @classmethod
    def all_full(cls, num_layers: int) -> "Pattern":
        return cls.uniform(num_layers, 1)

    @classmethod
    def uniform(cls, num_layers: int, freq: int) -> "Pattern":
        """Every `freq`-th layer is F, starting at layer 0."""
        _check_positive("num_layers", num_layers)
        _check_positive("freq", freq)
        return cls("".join("F" if i % freq == 0 else "S" for i in range(num_layers)))

    @classmethod
    def from_retention(cls, num_layers: int, ratio: float) -> "Pattern":
        """The evenly spread pattern with round(ratio * num_layers) F layers (layer 0 among them)."""
        _check_positive("num_layers", num_layers)
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
            raise PatternError(f"retention ratio must be in (0, 1], got {ratio!r}")
        n_full = round(ratio * num_layers)
        if n_full < 1:
            raise PatternError(
                f"retention {ratio} of {num_layers} layers rounds to 0 F layers; the smallest reachable "
                f"retention is 1/{num_layers} = {1 / num_layers:.4g}")
        full = {math.floor(i * num_layers / n_full) for i in range(n_full)}
        return cls("".join("F" if i in full else "S" for i in range(num_layers)))

    @classmethod
    def from_indexer_types(cls, types: list[str]) -> "Pattern":
        letters = {"full": "F", "shared": "S"}
        bad = sorted({t for t in types if t not in letters})
        if bad:
            raise PatternError(f"indexer_types may hold only 'full' and 'shared', got {bad}")
        return cls("".join(letters[t] for t in types))

    @classmethod
    def from_freq(cls, num_layers: int, freq: int, consumer: str, offset: int = 2) -> "Pattern":
        """The pattern a consumer's frequency rule gives (docs/DESIGN.md section 5).

        consumer 'transformers': layer i is F when max(i - offset + 1, 0) % freq == 0.
        consumer 'sglang': layer i is F when max(i - 1, 0) % freq == 0 (offset unused).
        """
        _check_positive("num_layers", num_layers)
        _check_positive("freq", freq)
        if consumer == "transformers":
            rule = lambda i: max(i - offset + 1, 0) % freq == 0  # noqa: E731
        elif consumer == "sglang":
            rule = lambda i: max(i - 1, 0) % freq == 0  # noqa: E731
        else:
            raise PatternError(f"unknown consumer {consumer!r} for a frequency rule: use 'transformers' or 'sglang'")
        return cls("".join("F" if rule(i) else "S" for i in range(num_layers)))

    # ---- views --------------------------------------------------------------------------
    def __str__(self) -> str:
        return self.letters

    def __len__(self) -> int:
        return len(self.letters)

    @property
    def num_layers(self) -> int:
        return len(self.letters)

    @property
    def full_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.letters) if c == "F"]

    @property
    def retention(self) -> float:
        return len(self.full_layers) / len(self.letters)

    def owner(self, layer: int) -> int:
        """The F layer whose top-k `layer` uses (itself when it is F)."""
        if not 0 <= layer < len(self.letters):
            raise IndexError(f"layer {layer} outside a {len(self.letters)}-layer pattern")
        return self.letters.rindex("F", 0, layer + 1)

    def groups(self) -> dict[int, list[int]]:
        """F layer -> sorted list of the layers it serves, itself included."""
        out: dict[int, list[int]] = {}
        for layer in range(len(self.letters)):
            out.setdefault(self.owner(layer), []).append(layer)
        return out

    def indexer_types(self) -> list[str]:
        """transformers' per-layer form: 'full' / 'shared'."""
        return ["full" if c == "F" else "shared" for c in self.letters]

    def freq(self, consumer: str, offset: int = 2) -> int | None:
        """The consumer's `index_topk_freq` that reproduces this pattern exactly, or None."""
        for freq in range(1, len(self.letters) + 1):
            if Pattern.from_freq(len(self.letters), freq, consumer, offset) == self:
                return freq
        return None

    def check_layers(self, num_layers: int) -> "Pattern":
        if len(self.letters) != num_layers:
            raise PatternError(
                f"pattern {self.letters!r} has {len(self.letters)} letters but the model has {num_layers} DSA layers")
        return self


def _check_positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PatternError(f"{name} must be a positive integer, got {value!r}")


def pattern_source(pattern=None, freq=None, retention=None) -> tuple[str, object]:
    """Which of the config's pattern keys defines the pattern, and its value: ("pattern" | "freq" | "retention",
    value), or ("all_full", None) when all three are None. An explicit string wins, then a uniform freq, then
    a retention; a value that is set (not None) is used even when it is falsy (0, ''), so that it gets refused."""
    for key, value in (("pattern", pattern), ("freq", freq), ("retention", retention)):
        if value is not None:
            return key, value
    return "all_full", None


def resolve_pattern(num_layers: int, pattern: str | None = None, retention: float | None = None,
                    freq: int | None = None, key_prefix: str = "") -> Pattern:
    """The job's pattern from config (precedence of `pattern_source`); an error names the key, `key_prefix`
    first (e.g. 'distill.')."""
    key, value = pattern_source(pattern, freq, retention)
    build = {"pattern": lambda: Pattern.parse(value, num_layers), "freq": lambda: Pattern.uniform(num_layers, value),
             "retention": lambda: Pattern.from_retention(num_layers, value),
             "all_full": lambda: Pattern.all_full(num_layers)}[key]
    try:
        return build()
    except PatternError as e:
        raise PatternError(f"{key_prefix}{key}={value!r}: {e}") from None
