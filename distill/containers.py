"""Config objects as plain Python containers: transformers' strict configs, JSON and cache keys need them."""
from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain(obj):
    """OmegaConf containers (resolved) and mappings as plain dicts, lists and tuples as lists, at every depth;
    other values as given."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(value) for value in obj]
    return obj
