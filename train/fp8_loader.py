"""Loading a published block-FP8 checkpoint as FP8 (docs/FP8.md), shard by shard.

The model is built on the meta device (no memory), then:
1. Plan, from the shard headers only: every quantised linear (`<m>.weight` float8 beside `<m>.weight_scale_inv`)
   becomes a `distill.fp8.BlockFp8Linear`, every fused experts module whose per-expert tensors are float8 a
   `distill.fp8.BlockFp8Experts`; the indexers stay `nn.Linear`, their FP8 weights dequantised once to the training
   dtype; the indexers of `shared_layers` (S layers) are not loaded at all; tensors of layers past the decoder's (the
   MTP / next-n layer) are left in the checkpoint. Missing tensors, tensors no module takes, wrong shapes, scales of
   another block size and packed FP4 experts are refused here, naming the tensor and the fix.
2. Check every scale's values (finite, > 0): scales are 1/(bn * bk) of the weights, so they are read before any
   weight is.
3. Stream: one shard open at a time (memory-mapped), each tensor copied straight to its place on `device`; host
   memory holds one tensor at a time. Under ZeRO-3 (`partition`), each decoder layer (and each module outside the
   layers) is handed to DeepSpeed as soon as its last tensor is in place, which keeps only this process's shard: the
   device holds the layers being read, never the model.
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from distill.adapters import family_of
from distill.fp8 import SCALE, BlockFp8, BlockFp8Experts, BlockFp8Linear, Fp8FormatError, fp8_bits, scale_name
from distill.source import MODEL_TYPES, tensor_headers, weight_map

FP8_HEADER = "F8_E4M3"
PACKED_FP4_HEADERS = ("I8", "U8", "F4", "F8_E8M0")  # DeepSeek-V4's experts: e2m1 pairs packed in bytes
_FLOAT_HEADERS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def load_block_fp8(path: str, config, device: torch.device, dtype: torch.dtype, fmt: BlockFp8,
                   shared_layers: tuple[int, ...] = (),
                   partition: Callable[[list[nn.Parameter]], None] | None = None) -> nn.Module:
    """The causal LM of the block-FP8 directory `path` on `device`, in eval mode: frozen linear weights in FP8,
    everything else in `dtype` (buffers in their own dtype); see the module docstring. `shared_layers`: pattern
    positions whose indexers are not loaded (they stay on the meta device until `apply_pattern` replaces them).
    `partition`: called with the parameters of each decoder layer, and of each module outside the layers, once all
    of them are in place (ZeRO-3's partitioning, `train.model`); every process calls it in the same order."""
    with torch.device("meta"):
        model = MODEL_TYPES[config.model_type][1](config)
    shards = weight_map(path)
    headers = tensor_headers(path, list(shards), shards)
    skipped = _skipped_indexers(model, shared_layers)
    slots = _plan(model, headers, fmt, skipped, path)
    _check_scales(path, shards, [name for name in slots if name.endswith(SCALE)])
    units = _Units(model, slots)
    by_shard = defaultdict(list)
    for name in slots:
        by_shard[shards[name]].append(name)
    for shard in sorted(by_shard):
        with safe_open(Path(path) / shard, "pt") as f:
            for name in by_shard[shard]:
                slots[name].place(f.get_tensor(name), device, dtype)
                done = units.placed(name)
                if done is not None:
                    _finish(done, partition)
    rebuild_computed_buffers(model, device)
    _check_complete(model, skipped, path)
    return model.eval()


class _Units:
    """The modules that complete as a whole: each decoder layer, and each module outside the layers that a slot
    fills; `placed(name)` returns a unit once the last of its tensors is in place."""

    def __init__(self, model: nn.Module, slots: dict[str, _Slot]):
        owner = {id(m): layer for layer in family_of(model).decoder_layers(model) for m in layer.modules()}
        self.unit_of = {name: owner.get(id(slot.module), slot.module) for name, slot in slots.items()}
        self.left: dict[int, int] = defaultdict(int)
        for unit in self.unit_of.values():
            self.left[id(unit)] += 1

    def placed(self, name: str) -> nn.Module | None:
        unit = self.unit_of[name]
        self.left[id(unit)] -= 1
        return unit if self.left[id(unit)] == 0 else None


def _finish(unit: nn.Module, partition: Callable[[list[nn.Parameter]], None] | None) -> None:
    """A unit whose tensors are all in place: its FP8 modules' GEMM layouts made, then its parameters partitioned."""
    for module in unit.modules():
        if isinstance(module, (BlockFp8Linear, BlockFp8Experts)):
            module.loaded()
    if partition is not None:
        partition([p for p in unit.parameters() if not p.is_meta])  # an S layer's indexer is not loaded


class _Slot:
    """Where one checkpoint tensor goes: a module's parameter or buffer, whole or one expert's row. An FP8 weight that
    loads dequantised (an indexer's) and its scale share a `pending` dict, which holds them until both are read;
    `fmt` dequantises them. `fp32`: a parameter transformers keeps in fp32."""

    def __init__(self, module: nn.Module, attr: str, expert: int | None = None, *, fmt: BlockFp8 | None = None,
                 pending: dict | None = None, fp32: bool = False):
        self.module, self.attr, self.expert, self.fmt = module, attr, expert, fmt
        self.pending, self.fp32 = pending, fp32

    def place(self, tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> None:
        if self.pending is not None:  # an FP8 indexer weight or its scale: dequantised once both are read
            self.pending[self.attr] = tensor
            if len(self.pending) < 2:
                return
            tensor, self.attr = self.fmt.dequantize(self.pending["weight"], self.pending[SCALE], dtype), "weight"
        current = getattr(self.module, self.attr)
        is_param = self.attr in self.module._parameters
        if tensor.dtype == torch.float8_e4m3fn:  # a frozen FP8 weight, kept as its bits
            tensor = fp8_bits(tensor)
        if self.expert is not None:
            if current.is_meta:
                current = torch.empty(current.shape, dtype=current.dtype, device=device)
                self._set(current, is_param)
            current[self.expert].copy_(tensor)
            return
        if not tensor.is_floating_point():
            keep = tensor.dtype
        elif not is_param:
            keep = current.dtype  # buffers in the dtype their module gives them
        else:
            keep = torch.float32 if self.fp32 else dtype
        self._set(tensor.to(device=device, dtype=keep), is_param)

    def _set(self, tensor: torch.Tensor, is_param: bool) -> None:
        if is_param:
            self.module._parameters[self.attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            self.module._buffers[self.attr] = tensor


def _indexer_names(model: nn.Module, positions=None) -> list[str]:
    """The module names of the indexers of the DSA layers at pattern `positions` (None: every DSA layer)."""
    family = family_of(model)
    decoder = family.dsa_layer_ids(model.config)
    return [f"model.layers.{decoder[p]}.self_attn.{family.indexer_path}"
            for p in (range(len(decoder)) if positions is None else positions)]


def _skipped_indexers(model: nn.Module, shared_layers: tuple[int, ...]) -> set[str]:
    """The module names of the indexers that are not loaded (the S layers')."""
    return set(_indexer_names(model, shared_layers))


def indexer_prefixes(model: nn.Module) -> tuple[str, ...]:
    """'<indexer module name>.' of every DSA layer's indexer: what its tensors' names start with."""
    return tuple(f"{name}." for name in _indexer_names(model))


def _plan(model: nn.Module, headers: dict, fmt: BlockFp8, skipped: set[str], path: str) -> dict[str, _Slot]:
    """{checkpoint tensor name: its slot}, modules swapped for their FP8 forms; every mismatch refused."""
    indexers = indexer_prefixes(model)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ()) + tuple(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())  # transformers' own rule
    slots: dict[str, _Slot] = {}
    expected: dict[str, tuple[tuple[int, ...], str | None]] = {}  # name -> (shape, required header dtype)

    def expect(name, shape, header=None):
        expected[name] = (tuple(shape), header)

    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        if any(name == s or name.startswith(f"{s}.") for s in skipped):
            continue
        experts = fused_experts(module)
        if experts is not None and _is_fp8(headers.get(f"{prefix}0.gate_proj.weight")):
            E, inter, hidden = experts
            fp8 = fp8_form(module, fmt.block)
            replace_module(model, name, fp8)
            for e in range(E):
                for proj, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)),
                                    ("down_proj", (hidden, inter))):
                    w = f"{prefix}{e}.{proj}.weight"
                    expect(w, shape, FP8_HEADER)
                    expect(scale_name(w), fmt.scale_shape(shape))
                    slots[w] = _Slot(fp8, proj, e)
                    slots[scale_name(w)] = _Slot(fp8, f"{proj}_{SCALE}", e)
            continue
        if experts is not None:
            _refuse_packed_experts(headers, prefix, path)
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if pname not in module._parameters and pname in module._non_persistent_buffers_set:
                continue
            full = f"{prefix}{pname}"
            if isinstance(module, nn.Linear) and pname == "weight" and _is_fp8(headers.get(full)):
                expect(full, tensor.shape, FP8_HEADER)
                expect(scale_name(full), fmt.scale_shape(tuple(tensor.shape)))
                if full.startswith(indexers):  # trains (F) or may: dequantised once
                    pending: dict = {}
                    fp32 = any(k in full for k in keep_fp32)
                    slots[full] = _Slot(module, "weight", fmt=fmt, pending=pending, fp32=fp32)
                    slots[scale_name(full)] = _Slot(module, SCALE, fmt=fmt, pending=pending, fp32=fp32)
                    continue
                fp8 = fp8_form(module, fmt.block)
                replace_module(model, name, fp8)
                slots[full] = _Slot(fp8, "weight")
                slots[scale_name(full)] = _Slot(fp8, SCALE)
                if module.bias is not None:
                    expect(f"{prefix}bias", module.bias.shape)
                    slots[f"{prefix}bias"] = _Slot(fp8, "bias")
                break
            expect(full, tensor.shape)
            slots[full] = _Slot(module, pname, fp32=any(k in full for k in keep_fp32))
    _check_headers(model, headers, expected, skipped, path)
    return slots


def fp8_form(module: nn.Module, block: tuple[int, int]) -> nn.Module | None:
    """The frozen block-FP8 module that stands for `module`, built on the meta device: a BlockFp8Experts for a fused
    experts module, a BlockFp8Linear for an nn.Linear; None for any other module."""
    experts = fused_experts(module)
    with torch.device("meta"):
        if experts is not None:
            E, intermediate, hidden = experts
            return BlockFp8Experts(E, hidden, intermediate, block, module.act_fn)
        if isinstance(module, nn.Linear):
            return BlockFp8Linear(module.in_features, module.out_features, block, module.bias is not None)
    return None


def fused_experts(module: nn.Module) -> tuple[int, int, int] | None:
    """(experts, intermediate, hidden) of a transformers fused experts module (gate_up_proj [E, 2I, H], down_proj
    [E, H, I]); None for any other module."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor) or gate_up.dim() != 3:
        return None
    E, two_i, hidden = gate_up.shape
    return E, two_i // 2, hidden


def _is_fp8(header) -> bool:
    return header is not None and header[0] == FP8_HEADER


def _refuse_packed_experts(headers: dict, prefix: str, path: str) -> None:
    header = headers.get(f"{prefix}0.gate_proj.weight") or headers.get(f"{prefix}0.w1.weight")
    if header is not None and header[0] in PACKED_FP4_HEADERS:
        raise Fp8FormatError(
            f"{path}: the routed experts {prefix}* are packed FP4 ({header[0]} {header[1]}, DeepSeek-V4's e2m1 "
            "experts), which this framework does not run; convert the experts to block-FP8 or bf16 first (for "
            "example with the checkpoint's own conversion script to FP8), then load that directory")


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _check_headers(model: nn.Module, headers: dict, expected: dict, skipped: set[str], path: str) -> None:
    """Refuse a checkpoint whose tensors are not the model's: names, shapes, and block-FP8 scales."""
    decoder = len(family_of(model).decoder_layers(model))
    beyond = re.compile(r"model\.layers\.(\d+)\.")

    def ignored(name):  # an MTP / next-n layer, or an S layer's indexer
        m = beyond.match(name)
        return (m is not None and int(m.group(1)) >= decoder) or any(name.startswith(f"{s}.") for s in skipped)

    missing = sorted(n for n in expected if n not in headers)
    if missing:
        raise Fp8FormatError(f"{path} lacks {_few(missing)}, which the model of its config.json has: the weights "
                             "are incomplete or of another model")
    unknown = sorted(n for n in headers if n not in expected and not ignored(n))
    if unknown:
        raise Fp8FormatError(f"{path} has tensors {_few(unknown)} that no module of its config.json's model takes: "
                             "the checkpoint is of another model or another layout")
    for name, (shape, header) in expected.items():
        dtype, actual = headers[name]
        if name.endswith(SCALE):
            if actual != shape:
                raise Fp8FormatError(
                    f"{path}: {name} has shape {actual}, but a weight_block_size of the config's gives {shape}: the "
                    "scales are of another block size than config.json's quantization_config says; fix "
                    "weight_block_size there")
            if dtype != "F32":
                raise Fp8FormatError(f"{path}: {name} is {dtype}; block-FP8 scales are float32")
        elif actual != shape:
            raise Fp8FormatError(f"{path}: {name} has shape {actual} but the model has {shape}")
        elif header is not None and dtype != header:
            raise Fp8FormatError(f"{path}: {name} is {dtype} but its siblings are {header}")
        elif header is None and dtype not in _FLOAT_HEADERS and dtype not in ("I64", "I32", "BOOL"):
            raise Fp8FormatError(f"{path}: {name} is {dtype}, which loads only as a block-FP8 weight with a "
                                 f"{SCALE} beside it")


def _check_scales(path: str, shards: dict[str, str], names: list[str]) -> None:
    """Every scale finite and positive, read before any weight (they are a small part of the checkpoint)."""
    by_shard = defaultdict(list)
    for name in names:
        by_shard[shards[name]].append(name)
    for shard, shard_names in sorted(by_shard.items()):
        with safe_open(Path(path) / shard, "pt") as f:
            for name in shard_names:
                scale = f.get_tensor(name)
                if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
                    bad = scale[~(torch.isfinite(scale) & (scale > 0))][:4].tolist()
                    raise Fp8FormatError(f"{path}/{shard}: {name} holds scales {bad}, which are not finite positive "
                                         "numbers: the shard is corrupt; download it again")


def rebuild_computed_buffers(model: nn.Module, device: torch.device) -> None:
    """Modules whose buffers are computed at construction, not loaded (RoPE's inverse frequencies), built again on
    `device` in fp32 (they were built on the meta device)."""
    for name, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module._buffers.values()) and hasattr(module, "inv_freq"):
            with torch.device(device):
                replace_module(model, name, type(module)(module.config))


def _check_complete(model: nn.Module, skipped: set[str], path: str) -> None:
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t is not None and t.is_meta and not any(n.startswith(f"{s}.") for s in skipped)]
    if left:
        raise Fp8FormatError(f"{path}: nothing in the checkpoint loads {_few(left)}")


def _few(names: list[str]) -> str:
    return f"{names[:4]}{'...' if len(names) > 4 else ''} ({len(names)})"
