"""The source model of a distillation, without its weights: its transformers config from a `conf/model/*.yaml`
mapping, a random model built from such a mapping, and the safetensors shards of a model directory.

train/model.py builds the backbone on top of these; the export reads them without building it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PreTrainedModel

from distill.adapters import FAMILIES
from distill.containers import plain

# model_type -> (config class, causal LM class) of every family distill.adapters knows
MODEL_TYPES = {model_type: (family.config_class, family.causal_lm) for model_type, family in FAMILIES.items()}
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"


class ModelConfigError(ValueError):
    """A model config or directory that the distillation job cannot use."""


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise ModelConfigError(f"model.dtype {name!r} is not one of auto, float32, bfloat16, float16") from None


def model_config(cfg: Mapping):
    """The transformers config of `cfg` (no weights loaded): checks early that the model is a DSA model."""
    overrides = plain(cfg.get("config") or {})  # transformers' strict configs reject DictConfig
    path = cfg.get("path")
    if path:
        config = load_config(path)
        for key, value in overrides.items():
            setattr(config, key, value)
        return config
    model_type = cfg.get("type")
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(f"model.type {model_type!r} is not a DSA model type; use one of {sorted(MODEL_TYPES)}")
    return MODEL_TYPES[model_type][0](**overrides)


def load_config(path: str):
    """The config of a local model directory, checked to be a DSA causal LM."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelConfigError(f"model.path {path!r} has no config.json: not a transformers model directory")
    with open(config_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelConfigError(
            f"model at {path!r} is {model_type!r}, which has no DSA indexers; distillation needs one of "
            f"{sorted(MODEL_TYPES)}")
    return AutoConfig.from_pretrained(path)


def random_model(cfg: Mapping, config=None, *, dtype: torch.dtype | None = None,
                 keep_rng: bool = True) -> PreTrainedModel:
    """The random model of a mapping without `path` (the one owner of its weights: train.model.build_model takes
    it from here), on the CPU, in eval mode: built from `config` (default: `model_config(cfg)`) seeded by
    `cfg.init_seed`, cast to `dtype` (default: `cfg.dtype` as resolved for the CPU), RoPE's inverse frequencies
    kept in fp32 (`rope_in_fp32`). keep_rng: leave the global RNG as it was (False: seeded by init_seed and
    advanced by the init, as a training job's build leaves it)."""
    config = config if config is not None else model_config(cfg)
    dtype = dtype if dtype is not None else resolve_dtype(cfg.get("dtype"), torch.device("cpu"))
    with torch.random.fork_rng(devices=[], enabled=keep_rng):
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        model = MODEL_TYPES[config.model_type][1](config)
    return rope_in_fp32(model.to(dtype)).eval()


def rope_in_fp32(model: PreTrainedModel) -> PreTrainedModel:
    """RoPE's inverse frequencies in fp32, as `from_pretrained` leaves them: a model cast with .to(bf16) or
    built under zero.Init (bf16 default dtype) holds them in bf16, which shifts the phases at long context."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.dtype != torch.float32:
            fresh = type(module)(module.config)  # built in the default fp32
            module.inv_freq = fresh.inv_freq.to(inv_freq.device)
            module.original_inv_freq = fresh.original_inv_freq.to(inv_freq.device)
    return model


# ---- a model directory's safetensors shards ---------------------------------------------------------
def weight_map(model_dir: str | os.PathLike) -> dict[str, str]:
    """{tensor name: shard file name} of a model directory: its index's weight_map, or the names in its single
    model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / WEIGHTS_INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ModelConfigError(f"{index} is not a safetensors index (no weight_map): {e!r}") from None
        if not isinstance(mapping, dict):
            raise ModelConfigError(f"{index}: weight_map is not a mapping of tensor names to shard files")
        return dict(mapping)
    single = model_dir / SINGLE_WEIGHTS
    if single.is_file():
        with safe_open(single, "pt") as f:
            return {name: SINGLE_WEIGHTS for name in f.keys()}  # noqa: SIM118  (safe_open: keys() only)
    raise ModelConfigError(f"{model_dir} has neither {WEIGHTS_INDEX} nor {SINGLE_WEIGHTS}: "
                           "not a safetensors model directory (convert its weights to safetensors)")


def tensor_headers(model_dir: str | os.PathLike, names: list[str],
                   shards: dict[str, str] | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} of tensors of a model directory (`weight_map` names), read from the
    shard headers only. shards: the directory's `weight_map`, when the caller has read it already."""
    model_dir, shards = Path(model_dir), shards if shards is not None else weight_map(model_dir)
    headers = {}
    for shard in sorted({shards[name] for name in names}):
        try:
            with safe_open(model_dir / shard, "pt") as f:
                for name in names:
                    if shards[name] == shard:
                        piece = f.get_slice(name)
                        headers[name] = (piece.get_dtype(), tuple(piece.get_shape()))
        except Exception as e:  # noqa: BLE001  (safetensors' own error types: missing files, bad headers, names)
            raise ModelConfigError(f"cannot read the tensor headers of {model_dir / shard}: {e}") from None
    return headers
