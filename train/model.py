"""Loading the frozen DSA backbone: a local transformers directory, or a tiny random model from config."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from transformers import (AutoConfig, DeepseekV32Config, DeepseekV32ForCausalLM, GlmMoeDsaConfig,
                          GlmMoeDsaForCausalLM, PreTrainedModel)

MODEL_TYPES = {
    "glm_moe_dsa": (GlmMoeDsaConfig, GlmMoeDsaForCausalLM),
    "deepseek_v32": (DeepseekV32Config, DeepseekV32ForCausalLM),
}


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
    overrides = _plain(cfg.get("config") or {})
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


def build_model(cfg: Mapping, device: torch.device | str = "cpu", config=None) -> PreTrainedModel:
    """The causal LM of `cfg` (a `conf/model/*.yaml` mapping), in eval mode, on `device`.

    With `cfg.path`: loaded from that local directory (`cfg.config` entries override its config).
    Without: a random model of `cfg.type` built from `cfg.config`, seeded by `cfg.init_seed`.
    """
    device = torch.device(device)
    dtype = resolve_dtype(cfg.get("dtype"), device)
    config = config if config is not None else model_config(cfg)
    model_cls = MODEL_TYPES[config.model_type][1]
    if cfg.get("path"):
        model = model_cls.from_pretrained(cfg["path"], config=config, dtype=dtype)
    else:
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        model = model_cls(config).to(dtype)
    return model.to(device).eval()


def _plain(mapping) -> dict:
    """A plain dict (OmegaConf containers resolved): transformers' strict configs reject DictConfig."""
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(mapping):
            return OmegaConf.to_container(mapping, resolve=True)
    except ImportError:
        pass
    return dict(mapping)


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
