"""A tiny checkpoint in the published block-FP8 layout (DeepSeek-V3.2, GLM-5-FP8), written by the tests: every
quantised linear weight float8_e4m3fn beside its `weight_scale_inv` (fp32, one per block), routed experts as
per-expert tensors, norms / embeddings / router / lm_head / indexer weights_proj unquantised, an MTP (next-n)
layer past the decoder's, several shards (each MoE layer's experts in one of their own) under a
`model.safetensors.index.json` -- and its dequantised twin, the same model with every quantised weight replaced by
what its FP8 form dequantises to."""
import json
import os
import re

import torch
from safetensors.torch import save_file
from torch import nn

from distill.fp8 import SCALE, BlockFp8, scale_name
from train.model import build_model

NOT_CONVERTED = ("lm_head", "indexer.weights_proj")


def quantised_linears(model: nn.Module) -> list[str]:
    """The module names of the linear layers a published checkpoint ships in FP8."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not name.endswith(NOT_CONVERTED)]


def published_tensors(model: nn.Module, fmt: BlockFp8) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(checkpoint tensors in the published layout, the dequantised twin's state dict) of a float model."""
    state = {name: t.detach().float() for name, t in model.state_dict().items()}
    tensors, twin = {}, dict(state)
    for name in list(state):
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if not m:
            continue
        weight = state.pop(name)
        if m.group(2) == "gate_up_proj":
            for e, rows in enumerate(weight):
                state[f"{m.group(1)}.{e}.gate_proj.weight"], state[f"{m.group(1)}.{e}.up_proj.weight"] = rows.chunk(2)
        else:
            for e, rows in enumerate(weight):
                state[f"{m.group(1)}.{e}.down_proj.weight"] = rows
    quantised = {f"{name}.weight" for name in quantised_linears(model)}
    quantised |= {n for n in state if re.search(r"\.experts\.\d+\.\w+_proj\.weight$", n)}
    for name, tensor in state.items():
        if name not in quantised:
            tensors[name] = tensor.to(torch.bfloat16) if tensor.dtype == torch.float32 and "bias" not in name \
                else tensor
            continue
        tensors[name], tensors[scale_name(name)] = fmt.quantize(tensor)
    for name, tensor in twin.items():  # the twin: each weight as its FP8 form dequantises
        m = re.match(r"(.*\.experts)\.(gate_up_proj|down_proj)$", name)
        if m:
            E = tensor.shape[0]
            projections = ("gate_proj", "up_proj") if m.group(2) == "gate_up_proj" else ("down_proj",)
            twin[name] = torch.stack([torch.cat([
                fmt.dequantize(tensors[f"{m.group(1)}.{e}.{p}.weight"], tensors[f"{m.group(1)}.{e}.{p}.{SCALE}"],
                               torch.float32) for p in projections]) for e in range(E)])
        elif name in tensors and name.endswith(".weight") and scale_name(name) in tensors:
            twin[name] = fmt.dequantize(tensors[name], tensors[scale_name(name)], torch.float32)
        elif name in tensors:
            twin[name] = tensors[name].float()
    return tensors, twin


def write_fp8_checkpoint(directory, model_cfg: dict, block=(128, 128), shards: int = 3, mtp: bool = True,
                         power_of_two: bool = False, by_layer: bool = False) -> tuple[str, nn.Module]:
    """Write the random model of `model_cfg` (a conf/model mapping) in the published block-FP8 layout to
    `directory`; returns (directory, its dequantised twin: the float model that the FP8 one should equal).
    by_layer: one shard per decoder layer in layer order (as the published checkpoints nearly are), the other
    tensors in a last one; else the shards below."""
    os.makedirs(directory, exist_ok=True)
    model = build_model(model_cfg)
    fmt = BlockFp8(tuple(block), power_of_two)
    tensors, twin_state = published_tensors(model, fmt)
    layers = model.config.num_hidden_layers
    if mtp:  # the next-n layer: an indexer and a projection of its own, past the decoder layers
        for name in [n for n in tensors if n.startswith("model.layers.0.self_attn.indexer.")]:
            tensors[name.replace("model.layers.0.", f"model.layers.{layers}.")] = tensors[name].clone()
        eh = torch.randn(model.config.hidden_size, 2 * model.config.hidden_size)
        tensors[f"model.layers.{layers}.eh_proj.weight"], tensors[f"model.layers.{layers}.eh_proj.{SCALE}"] = \
            fmt.quantize(eh)
    if by_layer:
        parts = [[n for n in tensors if n.startswith(f"model.layers.{i}.")] for i in range(layers + mtp)]
        parts.append([n for n in tensors if not n.startswith("model.layers.")])
    else:
        # each MoE layer's routed experts in a shard of their own (shards the export leaves alone), the rest dealt
        # round-robin over `shards` shards (a weight and its scale land in different ones)
        names = sorted(n for n in tensors if ".mlp.experts." not in n)
        parts = [names[s::shards] for s in range(shards)]
        for layer in sorted({n.split(".mlp.experts.")[0] for n in tensors if ".mlp.experts." in n}):
            parts.append([n for n in tensors if n.startswith(f"{layer}.mlp.experts.")])
    weight_map = {}
    for s, part_names in enumerate(parts):
        shard = f"model-{s + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part_names}, os.path.join(directory, shard),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part_names, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = model.config.to_dict()
    config.update(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                       "weight_block_size": list(block),
                                       **({"scale_fmt": "ue8m0"} if power_of_two else {})},
                  num_nextn_predict_layers=1 if mtp else 0, torch_dtype="bfloat16")
    config.pop("dtype", None)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model.load_state_dict(twin_state)
    return str(directory), model
