"""The distillation job's plain config keys, declared once: one dataclass per section (`distill.*`, `export.*`,
`data.*`, `logger.*` and the top level) whose fields are the keys, typed, with their range, choices or what to use in
the field's metadata. `check_keys` checks a config against them, then the combinations of keys that cannot work;
each refusal is a ConfigError naming the key. Keys that others check are not declared here: the pattern keys
(distill.pattern, freq, retention: `distill.pattern.resolve_pattern`), distill.kernel (`kernels.centroid_kl_fn`,
called by `check_keys`), model.* (`distill.source`), deepspeed.* (DeepSpeed) and plan.* (`train.plan`).
"""
from __future__ import annotations

import math
import types
from dataclasses import MISSING, dataclass, field, fields
from typing import get_args, get_origin, get_type_hints

import torch
from omegaconf import DictConfig, OmegaConf

from distill.objective import REDUCTIONS, TARGETS
from kernels import centroid_kl_fn
from train.distributed import is_rank0
from train.errors import ConfigError
from train.logger import MODES as LOGGER_MODES

DEVICES = ("auto", "cpu", "cuda")


def at_least(minimum: int):
    """An integer key's smallest value."""
    return field(metadata={"minimum": minimum})


def where(rule: str, ok):
    """A number key's range (of each number, for a list of numbers): `ok(value)` holds; `rule` says it."""
    return field(metadata={"rule": rule, "ok": ok})


def one_of(choices: tuple):
    """A key whose value is one of `choices`."""
    return field(metadata={"choices": choices})


def text(says: str):
    """A non-empty string key; `says` is what to use instead of a value refused."""
    return field(metadata={"says": says})


@dataclass(frozen=True)
class DistillKeys:
    """distill.*: what to distil and how (conf/distill/default.yaml)."""
    seq_len: int = at_least(1)
    dense_seq_len: int = at_least(1)
    sparse_seq_len: int = at_least(1)
    micro_batch_size: int = at_least(1)
    grad_accum: int = at_least(1)
    eval_every: int = at_least(1)
    save_every: int = at_least(1)
    log_every: int = at_least(1)
    max_bad_steps: int = at_least(1)
    dense_steps: int = at_least(0)
    sparse_steps: int = at_least(0)
    warmup_steps: int = at_least(0)
    eval_batches: int = at_least(0)
    keep_checkpoints: int = at_least(0)
    lr: float = where("> 0", lambda v: v > 0)
    weight_decay: float = where(">= 0", lambda v: v >= 0)
    grad_clip: float = where(">= 0 (0: no clipping)", lambda v: v >= 0)
    min_lr_ratio: float = where("in [0, 1]", lambda v: 0 <= v <= 1)
    betas: tuple[float, float] = where("in [0, 1)", lambda v: 0 <= v < 1)
    target: str = one_of(TARGETS)
    loss_reduction: str = one_of(REDUCTIONS)
    offload_saved: str | bool = one_of(("auto", True, False))
    lm_eval: bool


@dataclass(frozen=True)
class ExportKeys:
    """export.*: what the end of training writes."""
    enabled: bool
    full_model: bool
    keep_shared_indexers: bool


@dataclass(frozen=True)
class DataKeys:
    """data.* that the job reads itself (the rest: `train.data`)."""
    document_mask: bool | None = None  # null: as the model family's forward can (train.distill.prepare)
    restart_positions: bool = False


@dataclass(frozen=True)
class LoggerKeys:
    """logger.*: where metrics go."""
    mode: str = one_of(LOGGER_MODES)


@dataclass(frozen=True)
class JobKeys:
    """The top-level keys (conf/config.yaml)."""
    seed: int
    device: str = one_of(DEVICES)
    resume: str = text("use auto, never or a checkpoint directory")
    name: str = text("the run's name must be a non-empty string")


SECTIONS = {"distill": DistillKeys, "export": ExportKeys, "data": DataKeys, "logger": LoggerKeys, "": JobKeys}


def check_keys(cfg: DictConfig, device: torch.device) -> None:
    """Every key of SECTIONS as declared, then the combinations that cannot work; a ConfigError otherwise."""
    for prefix, keys in SECTIONS.items():
        section = cfg[prefix] if prefix else cfg
        hints = get_type_hints(keys)
        for key in fields(keys):
            value = section[key.name] if key.default is MISSING else section.get(key.name, key.default)
            _check(f"{prefix}.{key.name}" if prefix else key.name, value, hints[key.name], key.metadata)
    d = cfg.distill
    if d.dense_steps + d.sparse_steps < 1:
        raise ConfigError(f"distill.dense_steps={d.dense_steps} and sparse_steps={d.sparse_steps}: "
                          "both must be >= 0 and at least one step in all")
    try:
        centroid_kl_fn(d.kernel, device)  # refuses an unknown kernel, or 'triton' without CUDA or TRITON_INTERPRET=1
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if d.lm_eval and d.eval_batches == 0:
        raise ConfigError("distill.lm_eval=true evaluates on the validation batches, but distill.eval_batches=0: "
                          "set eval_batches >= 1 or lm_eval=false")
    if cfg.export.keep_shared_indexers and not cfg.export.full_model:
        raise ConfigError("export.keep_shared_indexers=true keeps the S-layer indexers in the full model directory: "
                          "it needs export.full_model=true")
    if cfg.device == "cuda" and device.type != "cuda":
        raise ConfigError("device=cuda, but no CUDA device is visible: use device=auto or device=cpu")


def _check(key: str, value, kind, rules) -> None:
    """`value` of `key` is of type `kind` (int, float: any finite number, bool, str, tuple[float, ...], or one of
    them | None: null allowed) and within `rules` (the field's metadata)."""
    nullable = isinstance(kind, types.UnionType) and type(None) in get_args(kind)
    if nullable:
        if value is None:
            return
        kind = next(k for k in get_args(kind) if k is not type(None))
    if "choices" in rules:
        if value not in rules["choices"]:
            raise ConfigError(f"{key}={value!r} is not one of {rules['choices']}")
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be {'true, false or null' if nullable else 'true or false'}, got {value!r}")
    elif kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        if value < rules.get("minimum", value):
            raise ConfigError(f"{key} must be at least {rules['minimum']}, got {value}")
    elif kind is float:
        if not _is_number(value) or not rules["ok"](value):
            raise ConfigError(f"{key} must be a number {rules['rule']}, got {value!r}")
    elif get_origin(kind) is tuple:
        if not OmegaConf.is_list(value) or len(value) != len(get_args(kind)):
            raise ConfigError(f"{key} must be a list of {len(get_args(kind))} numbers {rules['rule']}, got {value!r}")
        for i, item in enumerate(value):
            _check(f"{key}[{i}]", item, float, rules)
    elif kind is str and (not isinstance(value, str) or not value):
        raise ConfigError(f"{key}={value!r}: {rules['says']}")


def _is_number(value) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_document_mask(data: DictConfig, family, model_type: str) -> None:
    """data.document_mask set in `data` (`family`: the model's distill.adapters family): null (the default of the job,
    the evaluation and the search) becomes whether the family's forward keeps packed documents apart, said in one
    line where it cannot; true where it cannot is refused."""
    if data.document_mask is None:
        data.document_mask = family.documents
        if not family.documents and is_rank0():
            print(f"data.document_mask=false: the {model_type} forward cannot keep packed documents apart, "
                  "so packed rows attend across documents (data.document_mask=null picks it by model family)",
                  flush=True)
    elif data.document_mask and not family.documents:
        raise ConfigError(f"data.document_mask=true: the {model_type} forward cannot keep packed documents apart; "
                          "set data.document_mask=false, or leave it null (picked by model family)")
