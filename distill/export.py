"""The export of a distilled pattern (DESIGN.md section 5), written atomically.

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
  `indexer_types` (and `index_topk_pattern`) set; saved in the model's dtype. A DeepseekV32 source is
  converted: same architecture but for the indexer RoPE, which is half-split there and interleaved in
  GlmMoeDsa, so the rope rows of `wq_b` (per head), `wk` and `k_norm` are permuted; the scores are unchanged.
  A family without such a class (A.X-K2) has no full-model export.

Everything is written into a temporary directory beside the target, then renamed into place, so a crash
mid-write leaves an earlier export at the same path intact.

    python -m distill.export <checkpoint_or_run_dir> --out DIR [--full-model] [--keep-shared-indexers]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

import safetensors
import torch
import transformers
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from distill.adapters import FAMILIES, family_of
from distill.model import SharedIndexer, apply_pattern, dsa_attentions, rope_style
from distill.pattern import Pattern, PatternError
from train.model import ModelConfigError, build_model
from train.tokenizer import ByteTokenizer, load_tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
INDEXERS = "indexers.safetensors"
MODEL_DIR = "model"
UNUSED_NOTE = ("original (untrained) indexers of S layers, kept in model/ only for consumers that fail to load "
               "without them; never run: S layers reuse their owner's top-k")


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

    `model_cfg` is the conf/model mapping the backbone was built from (recorded; with
    `keep_shared_indexers` it rebuilds the untrained S-layer indexers).
    `tokenizer` (a transformers tokenizer; the byte-level fallback has no files) is saved in `model/`.
    Replaces an earlier export at `out_dir` only once the new one is complete. Returns `out_dir`.
    """
    pattern = Pattern.parse(str(pattern))
    model_cfg = _plain(model_cfg)
    if keep_shared_indexers and not full_model:
        raise ExportError("keep_shared_indexers keeps S-layer indexers in the full model directory: "
                          "it needs full_model=True")
    if full_model and family_of(model).export_as is None:
        raise ExportError(f"{model.config.model_type} has no transformers class that shares top-k across layers, "
                          "so a full model directory would not run the pattern: export without full_model (the "
                          "indexer weights, and the manifest's pattern for SGLang/vLLM)")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    indexer_tensors = _patterned_indexer_tensors(model, pattern)
    manifest = {
        "format_version": FORMAT_VERSION,
        "pattern": str(pattern),
        "indexer_types": pattern.indexer_types(),
        "num_layers": pattern.num_layers,
        "retention": pattern.retention,
        "full_layers": pattern.full_layers,
        "groups": {str(f): layers for f, layers in pattern.groups().items()},
        "index_topk_freq": freq_forms(pattern),
        "consumer_lines": consumer_lines(pattern),
        "source_model": _source_model(model, model_cfg),
        "indexer_weights": {"file": INDEXERS, "dtype": "float32", "rope_layout": rope_style(model),
                            "tensors": sorted(indexer_tensors)},
        "model_dir": None,
        "unused_shared_indexers": None,
        "step": step,
        # less cache_dir: a path on the training machine that says nothing about the weights
        "training_config": _plain({k: v for k, v in (train_config or {}).items() if k != "cache_dir"}),
        "metrics": _plain(metrics),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an export is for other processes to read
        save_file({name: t.detach().to("cpu", torch.float32).contiguous() for name, t in indexer_tensors.items()},
                  tmp / INDEXERS, metadata={"format": "pt", "pattern": str(pattern)})
        if full_model:
            manifest["model_dir"] = _write_model_dir(model, pattern, tmp / MODEL_DIR, model_cfg,
                                                     keep_shared_indexers, tokenizer)
            if keep_shared_indexers:
                shared = [i for i, c in enumerate(str(pattern)) if c == "S"]
                manifest["unused_shared_indexers"] = {"layers": shared, "note": UNUSED_NOTE}
        manifest["files"] = {path: _sha256(tmp / path, sync=True) for path in _files_under(tmp)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_value) + "\n")
        _sha256(tmp / MANIFEST, sync=True)
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
    for layer, (letter, attn) in enumerate(zip(str(pattern), attentions)):
        shared = attn.indexer is None or isinstance(attn.indexer, SharedIndexer)
        if letter == "F" and shared:
            raise ExportError(f"layer {layer} is F in pattern {pattern} but the model has no indexer there")
        if letter == "S" and not shared:
            raise ExportError(f"layer {layer} is S in pattern {pattern} but still has its own indexer: "
                              "call distill.model.apply_pattern(model, pattern) before exporting")
        if letter == "F":
            indexers[layer] = attn.indexer
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


def _write_model_dir(model: nn.Module, pattern: Pattern, model_dir: Path, model_cfg: dict,
                     keep_shared_indexers: bool, tokenizer) -> dict:
    """Save the backbone as a directory of its family's `export_as` type carrying `pattern`; returns its
    manifest entry."""
    family = family_of(model)
    target = FAMILIES[family.export_as]
    state = model.state_dict()
    if keep_shared_indexers:
        with torch.random.fork_rng(devices=[]):  # build_model seeds the global RNG
            base = build_model(model_cfg, "cpu")
        shared = {layer: attn.indexer for layer, attn in enumerate(dsa_attentions(base)) if str(pattern)[layer] == "S"}
        originals = _indexer_state(base, shared)
        dtype = next(model.parameters()).dtype
        state.update({name: t.detach().to(dtype) for name, t in originals.items()})
    source_type = model.config.model_type
    if (family.indexer_rope, target.indexer_rope) == ("half", "interleave"):
        state = _half_to_interleaved_rope(state, model.config)
    model.save_pretrained(model_dir, state_dict=state)
    config = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "index_topk_freq",
                "index_skip_topk_offset", "index_topk_pattern", "indexer_types"):
        config.pop(key, None)
    config = target.config_class(**config, indexer_types=pattern.indexer_types(), index_topk_pattern=str(pattern))
    config.architectures = [target.causal_lm.__name__]
    config.save_pretrained(model_dir)
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):  # the byte fallback has no files
        tokenizer.save_pretrained(model_dir)
    return {"path": MODEL_DIR, "model_type": target.model_type, "architecture": target.causal_lm.__name__,
            "converted_from": source_type if source_type != target.model_type else None,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


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


def _source_model(model: nn.Module, model_cfg: dict) -> dict:
    path = model_cfg.get("path")
    return {"type": model.config.model_type,
            "location": str(path) if path else f"random:{model_cfg.get('name')}",
            "init_seed": None if path else model_cfg.get("init_seed", 0),
            "revision": model_cfg.get("revision"),
            "model_cfg": model_cfg}


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"export target {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise ExportError(f"export target {out_dir} is a non-empty directory that is not an export "
                          f"(no {MANIFEST}); refusing to replace it")


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _plain(obj):
    """OmegaConf containers as plain dicts/lists (build_model and json need them); other values as given."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {key: _plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(value) for value in obj]
    return obj


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
        actual = _sha256(path)
        if actual != expected:
            raise ExportError(f"{path}: sha256 {actual} does not match {expected} in {MANIFEST} "
                              "(the file was modified or corrupted)")
    state = _read_safetensors(out_dir / INDEXERS)
    try:
        pattern = Pattern.parse(manifest["pattern"])
    except (KeyError, PatternError) as e:
        raise ExportError(f"{manifest_file} has no valid pattern: {e}") from None
    layers = {_layer_of(name) for name in state}
    if layers != set(pattern.full_layers):
        raise ExportError(f"{out_dir / INDEXERS} holds indexers of layers {sorted(layers, key=str)} but pattern "
                          f"{pattern} has F layers {pattern.full_layers}")
    return manifest, state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ExportError(f"{path} is missing")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for bad headers and truncation
        raise ExportError(f"{path} is not a valid safetensors file: {e}") from None


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
        raise ExportError(f"{source} does not match the model under pattern {pattern}: missing {missing[:4]}"
                          f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                          f"{'...' if len(unexpected) > 4 else ''}")
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
    """A checkpoint step dir, given it, a run dir, or a run's checkpoints dir (these follow `latest`)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        latest = checkpoints / "latest"
        if latest.is_file():
            step_dir = checkpoints / latest.read_text().strip()
            if not (step_dir / "meta.json").is_file():
                raise ExportError(f"{latest} names {step_dir}, which has no meta.json")
            return step_dir
    raise ExportError(f"{path} is neither a checkpoint (no meta.json) nor a run dir (no checkpoints/latest)")


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, full_model: bool = False,
                      keep_shared_indexers: bool = False) -> Path:
    """Rebuild the checkpoint's model (meta.json), load its indexers.safetensors, and export it.

    With `full_model`, the model's tokenizer (`train.tokenizer.load_tokenizer`) goes into `model/` too.
    """
    step_dir = resolve_checkpoint(checkpoint_dir)
    meta_file = step_dir / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
        pattern, model_cfg = Pattern.parse(meta["pattern"]), meta["model"]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{meta_file} is not valid JSON: {e}") from None
    except KeyError as e:
        raise ExportError(f"{meta_file} has no {e.args[0]!r} entry") from None
    except PatternError as e:
        raise ExportError(f"{meta_file}: {e}") from None
    state = _read_safetensors(step_dir / INDEXERS)
    try:
        model = build_model(model_cfg, "cpu")
    except ModelConfigError as e:
        raise ExportError(f"{meta_file}: cannot rebuild its model: {e}") from None
    try:
        load_indexers_into(model, state, pattern)
    except ExportError as e:
        raise ExportError(f"checkpoint {step_dir} does not fit its own model config: {e}") from None
    try:
        tokenizer = load_tokenizer(model_cfg) if full_model else None
    except ValueError as e:
        raise ExportError(f"{meta_file}: {e}") from None
    return export(model, pattern, out_dir, model_cfg=model_cfg, train_config=meta.get("config"),
                  metrics=meta.get("metrics"), full_model=full_model, keep_shared_indexers=keep_shared_indexers,
                  tokenizer=tokenizer, step=meta.get("step"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint step dir, or a run dir (its checkpoints/latest is used)")
    parser.add_argument("--out", required=True, help="the export directory to write (replaced atomically)")
    parser.add_argument("--full-model", action="store_true",
                        help="also write model/: a GlmMoeDsa directory that transformers loads")
    parser.add_argument("--keep-shared-indexers", action="store_true",
                        help="keep the original S-layer indexers in model/ (marked unused) for consumers that need them")
    args = parser.parse_args(argv)
    try:
        export_checkpoint(args.checkpoint, args.out, args.full_model, args.keep_shared_indexers)
    except (ExportError, PatternError, ModelConfigError) as e:
        print(f"distill.export: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
