"""Loading the frozen DSA backbone: a local transformers directory, or a tiny random model from config."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch
from transformers import AutoConfig, PreTrainedModel

from distill.adapters import FAMILIES

# model_type -> (config class, causal LM class): every family distill.adapters knows
MODEL_TYPES = {model_type: (family.config_class, family.causal_lm) for model_type, family in FAMILIES.items()}


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


def build_model(cfg: Mapping, device: torch.device | str = "cpu", config=None,
                ds_config: Mapping | None = None) -> PreTrainedModel:
    """The causal LM of `cfg` (a `conf/model/*.yaml` mapping), in eval mode, on `device`.

    With `cfg.path`: loaded from that local directory (`cfg.config` entries override its config); with a
    ZeRO-3 `ds_config`, partitioned over the processes as it loads (no process ever holds the whole model),
    so a model larger than one GPU loads. Without: a random model of `cfg.type` built from `cfg.config`,
    seeded by `cfg.init_seed`, whole on every process (the same weights under every ZeRO stage).
    """
    device = torch.device(device)
    dtype = resolve_dtype(cfg.get("dtype"), device)
    config = config if config is not None else model_config(cfg)
    model_cls = MODEL_TYPES[config.model_type][1]
    if not cfg.get("path"):
        torch.manual_seed(int(cfg.get("init_seed", 0)))
        return _rope_in_fp32(model_cls(config).to(dtype)).to(device).eval()
    if ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
        keep = HfDeepSpeedConfig(dict(ds_config))  # noqa: F841  while set, transformers loads under zero.Init
        try:
            return _rope_in_fp32(model_cls.from_pretrained(cfg["path"], config=config, dtype=dtype)).eval()
        finally:
            unset_hf_deepspeed_config()
    return model_cls.from_pretrained(cfg["path"], config=config, dtype=dtype).to(device).eval()


def _rope_in_fp32(model: PreTrainedModel) -> PreTrainedModel:
    """RoPE's inverse frequencies in fp32, as `from_pretrained` leaves them: a model cast with .to(bf16) or
    built under zero.Init (bf16 default dtype) holds them in bf16, which shifts the phases at long context."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and inv_freq.dtype != torch.float32:
            fresh = type(module)(module.config)  # built in the default fp32
            module.inv_freq = fresh.inv_freq.to(inv_freq.device)
            module.original_inv_freq = fresh.original_inv_freq.to(inv_freq.device)
    return model


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
