"""The export of a distilled pattern (docs/DESIGN.md section 5), written atomically.

An export directory holds

- `indexers.safetensors`: the F-layer indexer weights, names exactly as in the backbone's state dict,
  always contiguous float32 (a lossless upcast of bf16 weights; consumers cast on load). The layout is
  the source model's own (DeepseekV32 keeps its half-split indexer RoPE rows).
- `manifest.json`: pattern, `indexer_types`, retention, the `index_topk_freq` forms of the consumers
  whose frequency rule gives exactly this pattern, source model, training config, metrics, the sha256 of
  every other file, format version.
- with `full_model=True`, `model/`: the backbone with the new indexers and a config.json that
  `AutoModelForCausalLM.from_pretrained` loads as the family's `export_as` class (GlmMoeDsa for GlmMoeDsa and
  DeepseekV32, HYV4 for HY-V4: the transformers classes that share top-k by `indexer_types`) with
  `indexer_types` (and `index_topk_pattern`) set; a family without such a class (A.X-K2) has no full-model
  export. From a model directory (`model.path`) it is made shard by shard from the
  source's safetensors files (never more than one shard in memory): shards without indexer tensors of the
  pattern's layers are hard-linked (copied across filesystems), the others rewritten with the new F-layer
  indexers in the shard's dtype and without the S-layer ones; every other tensor (an MTP layer's, for one)
  and every other file (tokenizer, generation config, ...; hidden ones such as .git and .cache left out) is
  kept as it is. A random model (no path) is rebuilt from its seed and saved whole (it is small). A
  DeepseekV32 source is converted: same architecture but for the indexer RoPE, which is half-split there
  and interleaved in GlmMoeDsa, so the rope rows of `wq_b` (per head), `wk` and `k_norm` of every indexer
  (an MTP layer's too, which would otherwise run with the wrong layout) are permuted; the scores are
  unchanged.

Everything is written into a temporary directory beside the target, then renamed into place, so a crash
mid-write leaves an earlier export at the same path intact. An earlier export is replaced only if every
file there is one its manifest lists (a file a user put there is refused, named), and not by an export
without `model/` while it has one. Files are created under the process umask.

An export from a checkpoint never builds the backbone: the checkpoint's indexers are checked against the
source's shard headers (or, for a random model, a weightless meta-device instance) and its config.

    python -m distill.export <checkpoint_or_run_dir> --out DIR [--full-model] [--keep-shared-indexers]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path

import safetensors
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer

from distill import files as checkpoint_files  # a training checkpoint's file names and their reading
from distill.adapters import FAMILIES, family_of
from distill.containers import plain
from distill.files import files_under, read_safetensors, sha256_file
from distill.fp8 import SCALE, BlockFp8, scale_name
from distill.model import SharedIndexer, apply_pattern, dsa_attentions
from distill.pattern import Pattern, PatternError
from distill.source import (
    MODEL_TYPES,
    WEIGHTS_INDEX,
    ModelConfigError,
    model_config,
    random_model,
    tensor_headers,
    weight_map,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEXERS = "indexers.safetensors"  # the export's indexer file (a checkpoint's: distill.files.INDEXERS)
MODEL_DIR = "model"
CONFIG = "config.json"
UNUSED_NOTE = ("original (untrained) indexers of S layers, kept in model/ only for consumers that fail to load "
               "without them; never run: S layers reuse their owner's top-k")
WRITABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8 = torch.float8_e4m3fn


class ExportError(ValueError):
    """An export or checkpoint that is missing, corrupt, or does not match the model or pattern."""


# ---- consumer forms ---------------------------------------------------------------------------------
def consumer_lines(pattern: Pattern | str) -> dict[str, str]:
    """The vLLM and SGLang command-line arguments that serve `pattern`."""
    letters = str(Pattern.parse(str(pattern)))
    vllm = json.dumps({"use_index_cache": True, "index_topk_pattern": letters})
    sglang = json.dumps({"index_topk_pattern": letters})
    return {"vllm": f"--hf-overrides '{vllm}'", "sglang": f"--json-model-override-args '{sglang}'"}


def freq_forms(pattern: Pattern) -> dict[str, dict[str, int]]:
    """{consumer: its config keys} for each consumer whose frequency rule reproduces `pattern` exactly."""
    forms = {}
    # transformers' rule makes layers 0 .. offset-1 full, so only the default offset 2 and the length of
    # the leading F run can match.
    leading_full = len(str(pattern)) - len(str(pattern).lstrip("F"))
    for offset in dict.fromkeys((2, leading_full)):
        freq = pattern.freq("transformers", offset)
        if freq is not None:
            forms["transformers"] = {"index_topk_freq": freq, "index_skip_topk_offset": offset}
            break
    freq = pattern.freq("sglang")
    if freq is not None:
        forms["sglang"] = {"index_topk_freq": freq}
    return forms


# ---- writing ----------------------------------------------------------------------------------------
def export(model: nn.Module, pattern: Pattern | str, out_dir: str | os.PathLike, *, model_cfg: Mapping,
           train_config: Mapping | None = None, metrics: Mapping | None = None, full_model: bool = False,
           keep_shared_indexers: bool = False, tokenizer=None, step: int | None = None) -> Path:
    """Write the export of `model` (a backbone after `apply_pattern(model, pattern)`) to `out_dir`.

    `model_cfg` is the conf/model mapping the backbone was built from (recorded). With `full_model`, a model
    with `model_cfg.path` gets `model/` from that directory's shards (only `model`'s F-layer indexers are
    taken from it); a random one is saved from `model`, with `keep_shared_indexers` plus the untrained S-layer
    indexers of a rebuild from `model_cfg`. `tokenizer` (a transformers tokenizer; one without
    `save_pretrained`, like the byte-level fallback, has no files) is saved in `model/`.
    Replaces an earlier export at `out_dir` only once the new one is complete. Returns `out_dir`.
    """
    pattern = Pattern.parse(str(pattern))
    return _write_export(_patterned_indexer_tensors(model, pattern), pattern, out_dir, config=model.config,
                         model_cfg=model_cfg, backbone=model, train_config=train_config, metrics=metrics,
                         full_model=full_model, keep_shared_indexers=keep_shared_indexers, tokenizer=tokenizer,
                         step=step)


def _write_export(indexer_tensors: Mapping[str, torch.Tensor], pattern: Pattern, out_dir: str | os.PathLike, *,
                  config, model_cfg: Mapping, backbone: nn.Module | None, train_config: Mapping | None,
                  metrics: Mapping | None, full_model: bool, keep_shared_indexers: bool, tokenizer,
                  step: int | None) -> Path:
    """The export of F-layer `indexer_tensors` (state-dict names) of the model of `config` / `model_cfg`.

    `backbone`: the live model under `pattern`, saved as `model/` for a random model; None rebuilds it.
    """
    model_cfg = plain(model_cfg)
    if keep_shared_indexers and not full_model:
        raise ExportError("keep_shared_indexers keeps S-layer indexers in the full model directory: "
                          "it needs full_model=True")
    if full_model:
        _export_target(config)
    out_dir = Path(out_dir)
    _check_replaceable(out_dir, full_model)
    family = family_of(config)
    dsa_layers = family.dsa_layer_ids(config)
    every_layer = dsa_layers == list(range(config.num_hidden_layers))
    manifest = {
        "format_version": FORMAT_VERSION,
        "pattern": str(pattern),
        "indexer_types": pattern.indexer_types(),
        "num_layers": pattern.num_layers,
        "retention": pattern.retention,
        "full_layers": pattern.full_layers,
        "groups": {str(f): layers for f, layers in pattern.groups().items()},
        # the decoder layer of each pattern letter; a family whose DSA layers are not all decoder layers
        # (DeepSeek-V4: the CSA layers) gets the explicit pattern only (the freq rules count decoder layers)
        "pattern_over": "decoder_layers" if every_layer else family.pattern_over,
        "dsa_layers": dsa_layers,
        "index_topk_freq": freq_forms(pattern) if every_layer else {},
        "consumer_lines": consumer_lines(pattern),
        "source_model": _source_model(config, model_cfg),
        "indexer_weights": {"file": INDEXERS, "dtype": "float32", "rope_layout": family.indexer_rope,
                            "tensors": sorted(indexer_tensors)},
        "model_dir": None,
        "unused_shared_indexers": None,
        "step": step,
        # less cache_dir: a path on the training machine that says nothing about the weights
        "training_config": plain({k: v for k, v in (train_config or {}).items() if k != "cache_dir"}),
        "metrics": plain(metrics),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # under the umask: an export is for other processes to read
    try:
        _save_safetensors({name: t.detach().to("cpu", torch.float32).contiguous()
                           for name, t in indexer_tensors.items()},
                          tmp / INDEXERS, metadata={"format": "pt", "pattern": str(pattern)})
        if full_model:
            model_dir = tmp / MODEL_DIR
            if model_cfg.get("path"):
                manifest["model_dir"] = _model_dir_from_shards(Path(model_cfg["path"]), model_dir, pattern,
                                                               indexer_tensors, model_config(model_cfg),
                                                               keep_shared_indexers)
            else:
                manifest["model_dir"] = _model_dir_from_random(backbone, model_dir, pattern, indexer_tensors,
                                                               model_cfg, keep_shared_indexers)
            if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(model_dir)
            if keep_shared_indexers:
                shared = [i for i, c in enumerate(str(pattern)) if c == "S"]
                manifest["unused_shared_indexers"] = {"layers": shared, "note": UNUSED_NOTE}
        manifest["files"] = {path: sha256_file(tmp / path, sync=True) for path in files_under(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_value) + "\n")
        sha256_file(tmp / MANIFEST, sync=True)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"export written to {out_dir}")
    for consumer, line in manifest["consumer_lines"].items():
        print(f"  {consumer}: {line}")
    return out_dir


def _patterned_indexer_tensors(model: nn.Module, pattern: Pattern) -> dict[str, torch.Tensor]:
    """The F-layer indexer tensors of a backbone on which `pattern` was applied, by state-dict name."""
    attentions = dsa_attentions(model)
    if len(attentions) != pattern.num_layers:
        raise ExportError(f"pattern {pattern} has {pattern.num_layers} letters but the model has "
                          f"{len(attentions)} DSA layers")
    indexers = {}
    family = family_of(model)
    for layer, (letter, attn) in enumerate(zip(str(pattern), attentions)):
        indexer = family.indexer(attn)
        shared = indexer is None or isinstance(indexer, SharedIndexer)
        if letter == "F" and shared:
            raise ExportError(f"layer {layer} is F in pattern {pattern} but the model has no indexer there")
        if letter == "S" and not shared:
            raise ExportError(f"layer {layer} is S in pattern {pattern} but still has its own indexer: "
                              "call distill.model.apply_pattern(model, pattern) before exporting")
        if letter == "F":
            indexers[layer] = indexer
    tensors = _indexer_state(model, indexers)
    for name, tensor in tensors.items():
        if tensor.numel() == 0 and hasattr(tensor, "ds_shape"):
            raise ExportError(f"{name} is partitioned by DeepSpeed ZeRO-3: gather the parameters "
                              "(deepspeed.zero.GatheredParameters) or export from a checkpoint")
    return tensors


def _indexer_state(model: nn.Module, indexers: Mapping[int, nn.Module]) -> dict[str, torch.Tensor]:
    """{state-dict name: tensor (the live parameter)} of the given indexer modules of `model`."""
    names = {id(module): name for name, module in model.named_modules()}
    return {f"{names[id(indexer)]}.{key}": tensor
            for indexer in indexers.values() for key, tensor in indexer.state_dict(keep_vars=True).items()}


def _pattern_position(name: str, dsa_layers: list[int]) -> int | None:
    """The pattern position of an indexer tensor of one of the pattern's DSA layers (`dsa_layers`: their decoder
    layers, in pattern order); None for any other tensor (an MTP / next-n layer's indexer beyond them included:
    it keeps its own weights, never Shared)."""
    layer = _layer_of(name) if ".indexer." in name else None
    return dsa_layers.index(layer) if layer in dsa_layers else None


def _model_dir_from_shards(source: Path, model_dir: Path, pattern: Pattern,
                           indexer_tensors: Mapping[str, torch.Tensor], config, keep_shared_indexers: bool) -> dict:
    """Write `model/` from the safetensors shards of `source`, one shard at a time; returns its manifest entry.

    A block-FP8 source's indexer weights are written back in its format: the trained weights quantised with the
    source's block size (and power-of-two scales where its scales are), each `weight_scale_inv` computed from them."""
    try:
        shards = weight_map(source)
    except ModelConfigError as e:
        raise ExportError(f"cannot write the full model directory: {e}") from None
    letters, half = str(pattern), _converts_rope(config)
    dsa_layers = family_of(config).dsa_layer_ids(config)
    indexer_layers = {name: layer for name in shards if (layer := _pattern_position(name, dsa_layers)) is not None}
    wanted = {name for name, layer in indexer_layers.items() if letters[layer] == "F" and not name.endswith(SCALE)}
    if wanted != set(indexer_tensors):
        raise ExportError(f"the F-layer indexers {_few(sorted(set(indexer_tensors) - wanted))} are not in {source}, "
                          f"which has {_few(sorted(wanted - set(indexer_tensors)))} instead: the model directory "
                          "is not the one the indexers were trained on")
    # a DeepseekV32 source's indexers all change layout, an MTP layer's too: it runs as a GlmMoeDsa indexer
    changed = {name for name in shards if ".indexer." in name} if half else set(indexer_layers)
    dropped = set() if keep_shared_indexers else {name for name in changed
                                                  if name in indexer_layers and letters[indexer_layers[name]] == "S"}
    new, dtypes = _rewritten_indexers(source, shards, changed - dropped, indexer_tensors, config, half)
    model_dir.mkdir()
    _copy_other_files(source, model_dir, skip={*shards.values(), WEIGHTS_INDEX, CONFIG})
    dropped_bytes = 0
    for shard in sorted(set(shards.values())):
        if not any(shards[name] == shard for name in changed):
            _link_or_copy(source / shard, model_dir / shard)
            continue
        with safe_open(source / shard, "pt") as f:
            tensors = {}
            for name in f.keys():  # noqa: SIM118  (safe_open has keys(), no iteration)
                if name in dropped:
                    dropped_bytes += _nbytes(f.get_slice(name))
                else:
                    tensors[name] = new[name] if name in new else f.get_tensor(name)
            if tensors:  # a shard of S-layer indexers only is left out (and out of the index)
                _save_safetensors(tensors, model_dir / shard, metadata=f.metadata())
    if (source / WEIGHTS_INDEX).is_file():
        index = json.loads((source / WEIGHTS_INDEX).read_text())
        index["weight_map"] = {name: shard for name, shard in index["weight_map"].items() if name not in dropped}
        if isinstance(index.get("metadata"), dict) and "total_size" in index["metadata"]:
            index["metadata"]["total_size"] -= dropped_bytes
        (model_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_config(config, pattern, model_dir)
    return _model_dir_entry(config, ",".join(sorted(dtypes)))


def _rewritten_indexers(source: Path, shards: Mapping[str, str], names: set[str],
                        trained: Mapping[str, torch.Tensor], config, half: bool) -> tuple[dict, set[str]]:
    """({name: tensor} of every indexer tensor in `names` as the export writes it, the dtypes of the trained weights
    there): the trained weights where `trained` has them, the source's elsewhere; with `half`, in GlmMoeDsa's
    interleaved RoPE layout; each in its source tensor's dtype, a block-FP8 weight quantised again in the source's
    format with its `weight_scale_inv` (a scale in `names` is its weight's). Reads the shards tensor by tensor."""
    fmt = BlockFp8.of(config)
    values, originals, dtypes = {}, {}, set()
    for name in sorted(n for n in names if not n.endswith(SCALE)):
        original = _read_tensor(source, shards, name)
        where = f"{source / shards[name]}: {name}"
        scale = scale_name(name)
        quantised = original.dtype == FP8 and scale in shards
        if quantised and fmt is None:
            raise ExportError(f"{where} is float8 but {source / CONFIG} has no block-FP8 quantization_config")
        if name in trained:
            if tuple(trained[name].shape) != tuple(original.shape):
                raise ExportError(f"{where} has shape {tuple(original.shape)} but the trained indexer has "
                                  f"{tuple(trained[name].shape)}: the model directory is not the one the indexers "
                                  "were trained on")
            if not quantised and original.dtype not in WRITABLE_DTYPES:
                raise ExportError(f"{where} is {original.dtype}: trained indexers are written into float16, "
                                  "bfloat16, float32 or block-FP8 (float8 with weight_scale_inv) tensors only")
            values[name] = trained[name].detach().to("cpu", torch.float32)
            dtypes.add(str(original.dtype).removeprefix("torch."))
        elif quantised:
            values[name] = fmt.dequantize(original, _read_tensor(source, shards, scale), torch.float32)
        else:
            values[name] = original
        originals[name] = (original.dtype, quantised)
    if half:
        values = _half_to_interleaved_rope(values, config)
    out = {}
    for name, value in values.items():
        dtype, quantised = originals[name]
        if quantised:
            out[name], out[scale_name(name)] = fmt.quantize(value)
        else:
            out[name] = value.to(dtype).contiguous()
    return out, dtypes


def _read_tensor(source: Path, shards: Mapping[str, str], name: str) -> torch.Tensor:
    with safe_open(source / shards[name], "pt") as f:
        return f.get_tensor(name)


def _nbytes(piece) -> int:
    """The bytes of a safetensors slice, from its header."""
    sizes = {"F8_E4M3": 1, "I8": 1, "U8": 1, "BOOL": 1, "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}
    return math.prod(piece.get_shape()) * sizes[piece.get_dtype()]


def _copy_other_files(source: Path, model_dir: Path, skip: set[str]) -> None:
    """Copy every file under `source` but those in `skip` and hidden ones (.git, .cache, ...) into `model_dir`."""
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and rel.as_posix() not in skip and not any(p.startswith(".") for p in rel.parts):
            (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, model_dir / rel)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link `source` (an unchanged shard: no second copy on disk); copy it where links fail (another
    filesystem, a file of another user under protected_hardlinks)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _model_dir_from_random(backbone: nn.Module | None, model_dir: Path, pattern: Pattern,
                           indexer_tensors: Mapping[str, torch.Tensor], model_cfg: dict,
                           keep_shared_indexers: bool) -> dict:
    """Save a random model (`backbone`, or rebuilt from `model_cfg` with the indexers loaded) as `model/`."""
    fresh = random_model(model_cfg) if backbone is None or keep_shared_indexers else None
    originals = {}
    if keep_shared_indexers:
        family = family_of(fresh)
        shared = {layer: family.indexer(attn) for layer, attn in enumerate(dsa_attentions(fresh))
                  if str(pattern)[layer] == "S"}
        originals = _indexer_state(fresh, shared)
    if backbone is None:
        backbone = fresh
        load_indexers_into(backbone, indexer_tensors, pattern)
    dtype = next(backbone.parameters()).dtype
    state = backbone.state_dict()
    state.update({name: t.detach().to(dtype) for name, t in originals.items()})
    if _converts_rope(backbone.config):
        state = _half_to_interleaved_rope(state, backbone.config)
    backbone.save_pretrained(model_dir, state_dict=state)
    mode = _new_file_mode(model_dir)
    for weights in model_dir.glob("*.safetensors"):  # safetensors writes private files
        os.chmod(weights, mode)
    _write_config(backbone.config, pattern, model_dir)
    return _model_dir_entry(backbone.config, str(dtype).removeprefix("torch."))


def _export_target(config):
    """The family whose transformers class `model/` loads as (it shares top-k by `indexer_types`)."""
    family = family_of(config)
    if family.export_as is None:
        raise ExportError(f"{config.model_type} has no transformers class that shares top-k across layers, so a full "
                          "model directory would not run the pattern: export without full_model (the indexer "
                          "weights, and the manifest's pattern for SGLang/vLLM)")
    return FAMILIES[family.export_as]


def _converts_rope(config) -> bool:
    """Whether the indexer RoPE rows change layout on export (a half-split source loading as interleaved)."""
    return (family_of(config).indexer_rope, _export_target(config).indexer_rope) == ("half", "interleave")


def _write_config(config, pattern: Pattern, model_dir: Path) -> None:
    """config.json of `model/`: the source's config as its export class's config, carrying `pattern`."""
    target = _export_target(config)
    values = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "index_topk_freq",
                "index_skip_topk_offset", "index_topk_pattern", "indexer_types", "indexer_rope_interleave"):
        values.pop(key, None)
    # indexer_rope_interleave: the indexer RoPE layout vLLM reads (default half-split whatever the model type)
    patched = target.config_class(**values, indexer_types=pattern.indexer_types(), index_topk_pattern=str(pattern),
                                  indexer_rope_interleave=target.indexer_rope == "interleave")
    patched.architectures = [target.causal_lm.__name__]
    patched.save_pretrained(model_dir)


def _model_dir_entry(config, dtype: str) -> dict:
    target = _export_target(config)
    return {"path": MODEL_DIR, "model_type": target.model_type, "architecture": target.causal_lm.__name__,
            "converted_from": config.model_type if config.model_type != target.model_type else None, "dtype": dtype}


def _half_to_interleaved_rope(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Reorder the indexer rope rows of a DeepseekV32 state dict for GlmMoeDsa's interleaved RoPE.

    Half-split RoPE rotates pairs (x_i, x_{i+r/2}); interleaved RoPE rotates (x_{2i}, x_{2i+1}) and writes
    its output in half-split order, so moving row i to 2i and row i+r/2 to 2i+1 gives the same q and k.
    """
    rope, head_dim, heads = config.qk_rope_head_dim, config.index_head_dim, config.index_n_heads
    order = torch.arange(head_dim)
    order[:rope] = torch.stack([torch.arange(rope // 2), torch.arange(rope // 2, rope)], dim=-1).flatten()
    out = dict(state)
    for name, tensor in state.items():
        if ".indexer.wq_b." in name:
            rows = tensor.reshape(heads, head_dim, -1)[:, order.to(tensor.device)]
            out[name] = rows.reshape(tensor.shape).contiguous()
        elif ".indexer.wk." in name or ".indexer.k_norm." in name:
            out[name] = tensor[order.to(tensor.device)].contiguous()
    return out


def _source_model(config, model_cfg: dict) -> dict:
    path = model_cfg.get("path")
    return {"type": config.model_type,
            "location": str(path) if path else f"random:{model_cfg.get('name')}",
            "init_seed": None if path else model_cfg.get("init_seed", 0),
            "revision": model_cfg.get("revision"),
            "model_cfg": model_cfg}


def _check_replaceable(out_dir: Path, full_model: bool) -> None:
    """Refuse to write over anything at `out_dir` but an earlier export's own files (its manifest lists them).

    An export without `model/` does not replace one that has it: that would delete a full model directory
    (or, kept, leave one that no longer matches the indexers).
    """
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"export target {out_dir} exists and is not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    manifest_file = out_dir / MANIFEST
    if not manifest_file.is_file():
        raise ExportError(f"export target {out_dir} is a non-empty directory that is not an export "
                          f"(no {MANIFEST}); refusing to replace it: choose another output directory")
    try:
        owned = {MANIFEST, *json.loads(manifest_file.read_text())["files"]}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{manifest_file} is not a readable export manifest ({e!r}), so which files under "
                          f"{out_dir} an earlier export wrote is unknown; refusing to replace them: remove "
                          f"{out_dir} yourself or choose another output directory") from None
    owned_dirs = {parent.as_posix() for rel in owned for parent in Path(rel).parents if parent != Path(".")}
    foreign = []
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir).as_posix()
        ours = not path.is_symlink() and ((path.is_file() and rel in owned) or (path.is_dir() and rel in owned_dirs))
        if not ours and not any(rel.startswith(f"{other}/") for other in foreign):
            foreign.append(rel)
    if foreign:
        raise ExportError(f"{_few([str(out_dir / rel) for rel in foreign])} in the export at {out_dir} are not "
                          f"part of it (its {MANIFEST} does not list them); refusing to replace the export and "
                          f"delete them: move them out of {out_dir}, or export to another directory")
    if not full_model and (out_dir / MODEL_DIR).exists():
        raise ExportError(f"the export at {out_dir} has a full model directory {out_dir / MODEL_DIR}, which an "
                          "export without it would delete: export with --full-model (full_model=True) to rewrite "
                          f"it, delete {out_dir / MODEL_DIR} yourself to drop it, or export to another directory")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the complete `tmp` to `out_dir`; an existing `out_dir` is moved aside first, then removed."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        shutil.rmtree(old)
    else:
        os.rename(tmp, out_dir)
    _fsync_dir(out_dir.parent)


def _save_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None) -> None:
    """`save_file`, then the mode any new file in that directory gets (safetensors writes private files)."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, _new_file_mode(path.parent))


def _new_file_mode(directory: Path) -> int:
    """The permission bits a file created in `directory` gets under the umask (read off a probe file:
    os.umask would change the umask of every thread for a moment)."""
    probe = directory / f".mode-probe-{uuid.uuid4().hex[:8]}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


def _few(names: list[str]) -> str:
    return f"{names[:4]}{'...' if len(names) > 4 else ''}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json_value(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    raise ExportError(f"cannot write {type(obj).__name__} value {obj!r} to {MANIFEST}: "
                      "training config and metrics must be JSON values")


# ---- reading ----------------------------------------------------------------------------------------
def load_export(out_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, F-layer indexer state dict) of an export, after checking every file's sha256."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ExportError(f"export {out_dir} does not exist or is not a directory")
    manifest_file = out_dir / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise ExportError(f"{manifest_file} is missing: {out_dir} is not a complete export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{manifest_file} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise ExportError(f"{manifest_file} has format_version {version!r}; this reader knows {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or INDEXERS not in files:
        raise ExportError(f"{manifest_file} lists no file hashes for {INDEXERS}")
    for rel, expected in files.items():
        path = out_dir / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ExportError(f"{manifest_file} lists {rel!r}, which is outside the export")
        if not path.is_file():
            raise ExportError(f"{path} is missing (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != expected:
            raise ExportError(f"{path}: sha256 {actual} does not match {expected} in {MANIFEST} "
                              "(the file was modified or corrupted)")
    state = read_safetensors(out_dir / INDEXERS, ExportError)
    try:
        pattern = Pattern.parse(manifest["pattern"])
    except (KeyError, PatternError) as e:
        raise ExportError(f"{manifest_file} has no valid pattern: {e}") from None
    dsa_layers = manifest.get("dsa_layers", list(range(pattern.num_layers)))
    layers = {_pattern_position(name, dsa_layers) for name in state}
    if layers != set(pattern.full_layers):
        raise ExportError(f"{out_dir / INDEXERS} holds indexers of layers {sorted(layers, key=str)} but pattern "
                          f"{pattern} has F layers {pattern.full_layers}")
    return manifest, state


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def load_indexers_into(model: nn.Module, export_dir_or_state: str | os.PathLike | Mapping[str, torch.Tensor],
                       pattern: Pattern | str | None = None) -> dict[int, nn.Module]:
    """Apply the export's pattern to a backbone and load its indexer weights; returns {F layer: indexer}.

    Given a state dict instead of an export directory, `pattern` is required.
    """
    if isinstance(export_dir_or_state, Mapping):
        state, source = dict(export_dir_or_state), "the given state dict"
        if pattern is None:
            raise ExportError("load_indexers_into got a bare state dict: pass the pattern it was trained for")
        pattern = Pattern.parse(str(pattern))
    else:
        manifest, state = load_export(export_dir_or_state)
        source = str(export_dir_or_state)
        exported = Pattern.parse(manifest["pattern"])
        if pattern is not None and Pattern.parse(str(pattern)) != exported:
            raise ExportError(f"export {source} was trained for pattern {exported}, not {pattern}")
        pattern = exported
        source_type = manifest.get("source_model", {}).get("type")
        if source_type != model.config.model_type:
            raise ExportError(f"export {source} holds {source_type} indexers; the model is "
                              f"{model.config.model_type} (their layouts differ)")
    num_layers = len(dsa_attentions(model))
    if num_layers != pattern.num_layers:
        raise ExportError(f"{source} is for a {pattern.num_layers}-layer pattern ({pattern}) but the model has "
                          f"{num_layers} DSA layers")
    indexers = apply_pattern(model, pattern)
    targets = _indexer_state(model, indexers)
    missing, unexpected = sorted(targets.keys() - state.keys()), sorted(state.keys() - targets.keys())
    if missing or unexpected:
        raise ExportError(f"{source} does not match the model under pattern {pattern}: missing {_few(missing)}, "
                          f"unexpected {_few(unexpected)}")
    wrong = [f"{name}: {tuple(state[name].shape)} vs model {tuple(t.shape)}"
             for name, t in targets.items() if state[name].shape != t.shape]
    if wrong:
        raise ExportError(f"{source} has indexer shapes that do not match the model: {wrong[:4]}")
    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(state[name])
    return indexers


# ---- from a training checkpoint ---------------------------------------------------------------------
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint step dir, given it, a run dir, or a run's checkpoints dir (these follow `latest`):
    `distill.files.resolve_checkpoint`, its errors as ExportError."""
    try:
        return checkpoint_files.resolve_checkpoint(path)
    except checkpoint_files.CheckpointFileError as e:
        raise ExportError(str(e)) from None


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, full_model: bool = False,
                      keep_shared_indexers: bool = False) -> Path:
    """Export a checkpoint's indexers.safetensors for the pattern and model of its meta.json (the checkpoint's
    files as `distill.files` defines and reads them).

    The backbone is not built: the indexers are checked against the model's config and its shard headers
    (a random model's: a weightless meta-device instance). With `full_model`, `model/` is made from the
    model directory's shards, or for a random model from a rebuild of its seed; a `model.tokenizer`
    directory's tokenizer is saved there too (a model directory's own tokenizer files are copied with it).
    """
    step_dir = resolve_checkpoint(checkpoint_dir)
    meta_file = step_dir / checkpoint_files.META
    try:
        meta = checkpoint_files.read_checkpoint_meta(step_dir)
        pattern, model_cfg = Pattern.parse(meta["pattern"]), meta["model"]
    except checkpoint_files.CheckpointFileError as e:
        raise ExportError(str(e)) from None
    except KeyError as e:
        raise ExportError(f"{meta_file} has no {e.args[0]!r} entry") from None
    except PatternError as e:
        raise ExportError(f"{meta_file}: {e}") from None
    try:
        config = model_config(model_cfg)
    except ModelConfigError as e:
        raise ExportError(f"{meta_file}: cannot read its model's config: {e}") from None
    try:
        state = checkpoint_files.read_checkpoint_indexers(step_dir)
    except checkpoint_files.CheckpointFileError as e:
        raise ExportError(str(e)) from None
    _check_checkpoint_indexers(state, pattern, model_cfg, config, step_dir)
    tokenizer_dir = model_cfg.get("tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if full_model and tokenizer_dir else None
    except (OSError, ValueError) as e:
        raise ExportError(f"{meta_file}: model.tokenizer {tokenizer_dir!r} does not load: {e}") from None
    return _write_export(state, pattern, out_dir, config=config, model_cfg=model_cfg, backbone=None,
                         train_config=meta.get("config"), metrics=meta.get("metrics"), full_model=full_model,
                         keep_shared_indexers=keep_shared_indexers, tokenizer=tokenizer, step=meta.get("step"))


def _check_checkpoint_indexers(state: Mapping[str, torch.Tensor], pattern: Pattern, model_cfg: Mapping, config,
                               step_dir: Path) -> None:
    """Refuse a checkpoint whose indexer tensors are not exactly the F-layer indexers of its model under
    `pattern` (names and shapes), without loading the model's weights."""
    family = family_of(config)
    if pattern.num_layers != family.num_dsa_layers(config):
        raise ExportError(f"checkpoint {step_dir} is for a {pattern.num_layers}-layer pattern ({pattern}) but its "
                          f"model has {family.num_dsa_layers(config)} DSA layers")
    full = set(pattern.full_layers)
    path = model_cfg.get("path")
    if path:
        try:
            dsa_layers = family.dsa_layer_ids(config)
            names = [name for name in weight_map(path)
                     if _pattern_position(name, dsa_layers) in full and not name.endswith(SCALE)]
            expected = {name: shape for name, (_, shape) in tensor_headers(path, names).items()}
        except ModelConfigError as e:
            raise ExportError(f"checkpoint {step_dir}: {e}") from None
    else:
        with torch.device("meta"):  # shapes without weights
            model = MODEL_TYPES[config.model_type][1](config)
        attentions = dsa_attentions(model)
        full_indexers = {layer: family.indexer(attentions[layer]) for layer in full}
        expected = {name: tuple(t.shape) for name, t in _indexer_state(model, full_indexers).items()}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{name}: {tuple(state[name].shape)} vs model {shape}"
             for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    if missing or unexpected or wrong:
        raise ExportError(f"checkpoint {step_dir} does not fit its own model config under pattern {pattern}: "
                          f"missing {_few(missing)}, unexpected {_few(unexpected)}, shapes {_few(wrong)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint step dir, or a run dir (its checkpoints/latest is used)")
    parser.add_argument("--out", required=True, help="the export directory to write (replaced atomically)")
    parser.add_argument("--full-model", action="store_true",
                        help="also write model/: a directory that transformers loads (as GlmMoeDsa, or the "
                             "family's own class)")
    parser.add_argument("--keep-shared-indexers", action="store_true",
                        help="keep the original S-layer indexers in model/ (marked unused) for consumers that "
                             "need them")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.out, args.full_model, args.keep_shared_indexers)
    except (ExportError, PatternError, ModelConfigError) as e:
        print(f"distill.export: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
