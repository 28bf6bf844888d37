"""Loading the frozen DSA backbone: a local transformers directory, or a tiny random model from config."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers import PreTrainedModel

from distill.fp8 import BlockFp8
from distill.source import MODEL_TYPES, model_config, random_model, resolve_dtype, rope_in_fp32
from train.fp8_loader import load_block_fp8


def build_model(cfg: Mapping, device: torch.device | str = "cpu", config=None,
                ds_config: Mapping | None = None, shared_layers: tuple[int, ...] = ()) -> PreTrainedModel:
    """The causal LM of `cfg` (a `conf/model/*.yaml` mapping), in eval mode, on `device`.

    With `cfg.path`: loaded from that local directory (`cfg.config` entries override its config); with a
    ZeRO-3 `ds_config`, partitioned over the processes as it loads (no process ever holds the whole model),
    so a model larger than one GPU loads. Without: a random model of `cfg.type` built from `cfg.config`,
    seeded by `cfg.init_seed`, whole on every process (the same weights under every ZeRO stage):
    `distill.source.random_model`'s, moved to `device`.
    A block-FP8 directory (its config's `quantization_config`) loads through `train.fp8_loader`: frozen linear
    weights stay FP8 on `device`, indexer weights are dequantised to the dtype, and the indexers of
    `shared_layers` (pattern positions a pattern makes S) are not loaded; with a ZeRO-3 `ds_config`, each layer is
    partitioned (or, with offload_param, moved to the host) as soon as it is read.
    """
    device = torch.device(device)
    dtype = resolve_dtype(cfg.get("dtype"), device)
    config = config if config is not None else model_config(cfg)
    model_cls = MODEL_TYPES[config.model_type][1]
    if not cfg.get("path"):
        return random_model(cfg, config, dtype=dtype, keep_rng=False).to(device).eval()
    fp8 = BlockFp8.of(config)
    if fp8 is not None:
        partition = zero3_partition(ds_config) if zero_stage(ds_config) == 3 else None
        return load_block_fp8(cfg["path"], config, device, dtype, fp8, tuple(shared_layers), partition)
    if zero_stage(ds_config) == 3:
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
        keep = HfDeepSpeedConfig(dict(ds_config))  # noqa: F841  while set, transformers loads under zero.Init
        try:
            return rope_in_fp32(model_cls.from_pretrained(cfg["path"], config=config, dtype=dtype)).eval()
        finally:
            unset_hf_deepspeed_config()
    return model_cls.from_pretrained(cfg["path"], config=config, dtype=dtype).to(device).eval()


def zero_stage(ds_config: Mapping | None) -> int | None:
    """The ZeRO stage of a DeepSpeed config (None: no config)."""
    return None if ds_config is None else ds_config.get("zero_optimization", {}).get("stage")


def zero3_partition(ds_config: Mapping):
    """A function that hands a list of loaded parameters to DeepSpeed's ZeRO-3 (`deepspeed.zero.Init(module=...)`,
    the engine's own conversion): each process keeps its 1/world shard of every parameter (on the host with
    offload_param), frees the rest, and the engine gathers them layer by layer in the forward. The parameters are
    converted in place; every process must call it with the same parameters in the same order (rank 0's values are
    broadcast)."""
    import deepspeed

    def partition(params: list[nn.Parameter]) -> None:
        holder = nn.Module()
        holder.params = nn.ParameterList(params)  # the same Parameter objects: converted in place
        # DeepSpeed reads memory_efficient_linear from the config (conf/deepspeed/zero3.yaml turns it off)
        deepspeed.zero.Init(module=holder, config_dict_or_path=dict(ds_config))
    return partition
