"""The distillation job: `python -m train.distill` (one process) or `bash launch/distill.sh` (torchrun).

Freeze the backbone, put the pattern in place, train each F layer's indexer against the centroid of
the attention of the layers it serves (dense stage, then sparse stage), evaluate, checkpoint, export.
`run` is the loop; `prepare` checks the config before anything loads; `Stages` holds each stage's data, `Training`
the engine, `CheckpointWriter` and `resume` the checkpoints, `Progress` the logging; the step and evaluation are
in `train.step`, the processes in `train.distributed`, the config keys in `train.config_keys`.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from transformers import PretrainedConfig

from distill.adapters import family_of
from distill.export import export_checkpoint
from distill.fp8 import BlockFp8
from distill.objective import Distiller
from distill.pattern import Pattern, resolve_pattern
from distill.source import ModelConfigError, model_config, resolve_dtype
from train.checkpoint import (
    CheckpointError,
    DamagedCheckpoint,
    check_compatible,
    checkpoint_root,
    latest_checkpoint,
    load_checkpoint,
    newest_intact_checkpoint,
    previous_good_hint,
    read_meta,
    save_checkpoint,
    verify_checkpoint,
)
from train.config_keys import check_keys, resolve_document_mask
from train.data import Batch, BatchLoader, eval_batches, packed_datasets, stage_seq_lens
from train.distributed import StopOnSigterm, die_with_launcher, is_rank0, on_rank0_first, setup_distributed
from train.errors import ConfigError, exit_on_user_error
from train.faults import NO_FAULTS, Faults
from train.logger import Logger
from train.model import build_model
from train.plan import check_plan, layer_elements
from train.run_dir import hold_run_lock, record_config, run_tag, set_aside_outputs
from train.step import BadSteps, Evaluation, step_metrics, train_step
from train.tokenizer import load_tokenizer

# `${gpu:A,B}` in conf/: A when a GPU is visible, else B (the embedded defaults run on either).
OmegaConf.register_new_resolver("gpu", lambda on_gpu, on_cpu: on_gpu if torch.cuda.is_available() else on_cpu,
                                replace=True)
# `${run_tag:pattern,freq,retention,target}`: what defines a run, for its name (train.run_dir.run_tag).
OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)


def deepspeed_config(cfg: DictConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config of `conf/deepspeed/*` completed from `distill.*`; bf16 'auto' = on with a GPU."""
    d = cfg.distill
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    bf16 = ds.setdefault("bf16", {}).get("enabled", "auto")
    ds["bf16"]["enabled"] = device.type == "cuda" if bf16 == "auto" else bool(bf16)
    batch = d.micro_batch_size * d.grad_accum * world_size
    for key, ours in (("train_batch_size", batch), ("train_micro_batch_size_per_gpu", d.micro_batch_size),
                      ("gradient_accumulation_steps", d.grad_accum)):
        if key in ds and ds[key] != ours:
            raise ConfigError(f"deepspeed.{key}={ds[key]} conflicts with distill.micro_batch_size="
                              f"{d.micro_batch_size} x grad_accum={d.grad_accum} x world size {world_size} "
                              f"(= {batch}); set the distill.* keys instead")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") not in (1, 2, 3) or zero.get("compute_grad_norm") is False or \
            (ds["bf16"]["enabled"] and ds["bf16"].get("check_grad_overflow") is False):
        raise ConfigError(f"deepspeed.zero_optimization={zero}, bf16={ds['bf16']}: the job needs ZeRO stage 1, 2 or "
                          "3 with compute_grad_norm and bf16.check_grad_overflow left on, so that DeepSpeed skips a "
                          "step whose gradients are not finite")
    total = d.dense_steps + d.sparse_steps
    warmup = min(d.warmup_steps, max(total - 1, 0))
    ds.update({
        "train_micro_batch_size_per_gpu": d.micro_batch_size,
        "gradient_accumulation_steps": d.grad_accum,
        "train_batch_size": batch,
        "gradient_clipping": d.grad_clip,
        # torch_adam: torch's AdamW, not DeepSpeed's JIT-built FusedAdam (whose build fails on some GPU images)
        "optimizer": {"type": "AdamW", "params": {"lr": d.lr, "weight_decay": d.weight_decay,
                                                  "betas": list(d.betas), "torch_adam": True}},
        # DeepSpeed's linear warm-up gives step i (from 0) the ratio min + (1 - min) i / W: starting at 1 / W, the
        # first step already trains; W = 0 (no warm-up) is W = 1 from the full rate (DeepSpeed refuses 0)
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total, 1), "warmup_num_steps": max(warmup, 1),
            "warmup_min_ratio": 1.0 / max(warmup, 2) if warmup else 1.0,
            "warmup_type": "linear", "cos_min_ratio": d.min_lr_ratio}},
    })
    return ds


def fill_zero3_auto(ds_config: dict, config: PretrainedConfig) -> None:
    """ZeRO-3's `auto` sizes (conf/deepspeed/zero3.yaml) from the model: prefetch one decoder layer's parameters
    ahead, keep at most two layers whole (`train.plan` counts the same two)."""
    zero = ds_config.get("zero_optimization", {})
    keys = ("stage3_prefetch_bucket_size", "stage3_max_live_parameters")
    if not any(zero.get(k) == "auto" for k in keys):
        return
    layer = layer_elements(config)
    for key, value in zip(keys, (layer, 2 * layer)):
        if zero.get(key) == "auto":
            zero[key] = value


class Prepared(NamedTuple):
    """What `prepare` checked and resolved, before anything loads."""
    config: PretrainedConfig  # the model's transformers config
    pattern: Pattern
    resume_from: str | None  # the checkpoint to resume from (None: a fresh start)
    ds_config: dict  # DeepSpeed's config completed from distill.*, with checkpoint.load_universal


def prepare(cfg: DictConfig, run_dir: str, world_size: int, device: torch.device) -> Prepared:
    """Check every key the job reads, before the weights or the data load and any GPU work starts, and resolve
    data.document_mask in `cfg` (null: the model family's).

    A checkpoint of another world size loads through DeepSpeed's universal (re-shardable) form: ds_config's
    checkpoint.load_universal.
    """
    check_keys(cfg, device)
    d = cfg.distill
    config = model_config(cfg.model)
    if not hasattr(config, "index_topk"):
        raise ModelConfigError(f"model {config.model_type!r} has no DSA indexer (no index_topk)")
    resolve_dtype(cfg.model.get("dtype"), device)
    family = family_of(config)
    pattern = resolve_pattern(family.num_dsa_layers(config), d.pattern, d.retention, d.freq, key_prefix="distill.")
    if cfg.export.full_model and family.export_as is None:
        raise ConfigError(f"export.full_model=true: {config.model_type} has no transformers class that shares top-k "
                          "across layers, so its full model directory would not run the pattern; use "
                          "export.full_model=false (indexer weights and manifest)")
    resolve_document_mask(cfg.data, family, config.model_type)
    for stage, seq_len in stage_seq_lens(d).items():
        if seq_len > config.max_position_embeddings:
            raise ConfigError(f"{_seq_len_key(d, stage)}={seq_len} exceeds the model's max_position_embeddings="
                              f"{config.max_position_embeddings}")
    resume_from = _resume_path(cfg, run_dir, str(pattern), OmegaConf.to_container(cfg.model, resolve=True))
    ds_config = deepspeed_config(cfg, world_size, device)
    fill_zero3_auto(ds_config, config)
    BlockFp8.of(config)  # the quantization_config read (and refused) before anything loads
    saved_world = read_meta(resume_from).get("world_size", world_size) if resume_from else world_size
    # re-shard through DeepSpeed's universal form
    ds_config["checkpoint"] = {"load_universal": saved_world != world_size}
    _check_deepspeed(ds_config)
    # the memory plan (docs/PLAN.md): refused if it does not fit, before any weight loads (plan.check=false runs it)
    check_plan(cfg, config, pattern, ds_config, world_size, device)
    return Prepared(config, pattern, resume_from, ds_config)


def _check_deepspeed(ds_config: dict) -> None:
    """Let DeepSpeed parse the whole config now (it would at deepspeed.initialize, after the weights load).
    train_batch_size is left out: DeepSpeed checks it against the world size of torch.distributed, which may
    not be up yet; deepspeed_config has checked it against the job's world size."""
    from deepspeed.runtime.config import DeepSpeedConfig
    try:
        DeepSpeedConfig({k: v for k, v in ds_config.items() if k != "train_batch_size"})
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"DeepSpeed refuses the config of deepspeed.* (completed from distill.*): {e}") from e


def _resume_path(cfg: DictConfig, run_dir: str, pattern: str, model_cfg: dict) -> str | None:
    """The checkpoint to resume from, checked to be whole and of this pattern, target and model.

    resume=auto: the run's newest checkpoint that verifies (a damaged newer one is skipped, and said so);
    a checkpoint directory: that one, refused when damaged (naming the previous good one); never: None.
    """
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        root = checkpoint_root(run_dir)
        path, skipped = newest_intact_checkpoint(root)
        if path is None and skipped:
            raise DamagedCheckpoint(f"no checkpoint under {root} verifies ({'; '.join(skipped)}): start over with "
                                    f"resume=never (the earlier outputs are moved aside into {run_dir}/replaced/)")
        if skipped and is_rank0():
            print(f"[distill] {'; '.join(skipped)}. Resuming from {path}, the newest checkpoint that verifies",
                  flush=True)
    else:
        path = str(cfg.resume)
        if not os.path.isdir(path):
            raise CheckpointError(f"resume={path!r} is no checkpoint directory: use auto, never or a checkpoint "
                                  "directory (runs/<name>/checkpoints/step_N)")
        try:
            verify_checkpoint(path)
        except DamagedCheckpoint as e:
            raise DamagedCheckpoint(f"{e}; {previous_good_hint(path)}") from None
    if path is None:
        return None
    check_compatible(read_meta(path), pattern, cfg.distill.target, model_cfg, path)
    return path


def _claim_run_dir(cfg: DictConfig, run_dir: str) -> None:
    """Rank 0, once the config checks out: resume=never moves an earlier run's outputs aside (nothing is
    overwritten or mixed), then the launch's config is recorded in .hydra/."""
    if cfg.resume == "never":
        aside = set_aside_outputs(run_dir)
        if aside:
            print(f"[distill] resume=never: the earlier outputs of {run_dir} are moved to {aside}", flush=True)
    record_config(run_dir, cfg)


@dataclass(frozen=True)
class Stages:
    """The stages that run (dense: steps 1 to `dense_steps`, then sparse) and their data: each stage's row length and
    the key that sets it, one training loader per distinct length (stages of one length share it), and each stage's
    validation batches."""
    dense_steps: int
    lengths: dict[str, int]
    keys: dict[str, str]
    loaders: dict[int, BatchLoader]
    validation: dict[str, list[Batch]]

    @classmethod
    def load(cls, cfg: DictConfig, rank: int, world_size: int) -> Stages:
        """The packed data of cfg.data at each stage's length (packed by rank 0 first, or opened from
        data.prepared), served to this rank."""
        d = cfg.distill
        tokenizer = load_tokenizer(cfg.model)
        lengths = stage_seq_lens(d)

        def packed():
            return {n: packed_datasets(cfg.data, tokenizer, n, os.path.join(cfg.cache_dir, "data"))
                    for n in sorted(set(lengths.values()))}
        data = packed() if cfg.data.get("prepared") else on_rank0_first(rank, packed)  # prepared: opened, never packed
        loaders = {n: BatchLoader(rows["train"], d.micro_batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                                  documents=cfg.data) for n, rows in data.items()}
        validation = {stage: eval_batches(data[n]["validation"], d.micro_batch_size, d.eval_batches,
                                          documents=cfg.data) for stage, n in lengths.items()}
        return cls(d.dense_steps, lengths, {stage: _seq_len_key(d, stage) for stage in lengths}, loaders, validation)

    def of(self, step: int) -> str:
        """The stage of step `step` (from 1); past the last step, the last stage."""
        return "sparse" if step > self.dense_steps and "sparse" in self.lengths else "dense"

    def loader(self, stage: str) -> BatchLoader:
        """The training loader of `stage`."""
        return self.loaders[self.lengths[stage]]

    def state_dict(self, step: int) -> dict:
        """The data position after `step`: the state of the loader the next step reads, and whose it is."""
        stage = self.of(step + 1)
        return {**self.loader(stage).state_dict(), "stage": stage, "seq_len": self.lengths[stage]}

    def load_state_dict(self, meta: dict, rows_per_batch: int) -> None:
        """The data position of checkpoint `meta` (see `_loader_state`) into the loader of the step after its own,
        for global batches of `rows_per_batch` rows."""
        stage = self.of(meta["step"] + 1)
        state = _loader_state(meta, rows_per_batch, stage, self.lengths[stage], self.keys[stage])
        if state is not None:
            self.loader(stage).load_state_dict(state)


def _seq_len_key(d: DictConfig, stage: str) -> str:
    """The key that sets a stage's row length: distill.<stage>_seq_len, or distill.seq_len when that follows it."""
    raw = OmegaConf.to_container(d, resolve=False).get(f"{stage}_seq_len")
    return "distill.seq_len" if raw is None or raw == "${distill.seq_len}" else f"distill.{stage}_seq_len"


def _loader_state(meta: dict, rows_per_batch: int, stage: str, seq_len: int, key: str) -> dict | None:
    """The data position of a checkpoint in batches of `rows_per_batch` rows (world sizes may differ), for the loader
    of `stage` (the next step's) with rows of `seq_len` tokens set by `key`; None: that loader starts afresh.

    The checkpoint's loader state names its stage and row length (one without them, from before per-stage lengths,
    is of the run's distill.seq_len). A state of rows of another length is another stage's loader, no longer read
    (the sparse loader starts at the first sparse step), or, of this stage mid-way, refused."""
    state = dict(meta["loader"])
    saved_len = state.pop("seq_len", meta.get("config", {}).get("distill", {}).get("seq_len", seq_len))
    saved_stage = state.pop("stage", stage)
    if saved_len != seq_len:
        if saved_stage != stage or (state["epoch"], state["position"]) == (0, 0):
            return None
        raise CheckpointError(
            f"the checkpoint's {stage}-stage data position is in rows of {saved_len} tokens, this run's {key}="
            f"{seq_len}: resume with {key}={saved_len}, or start over with resume=never")
    rows = state["position"] * meta.get("micro_batch_size", 0) * meta.get("world_size", 1)
    if "micro_batch_size" in meta:
        if rows % rows_per_batch:
            raise CheckpointError(
                f"the checkpoint consumed {rows} rows of its epoch, not a whole number of this run's global batches "
                f"of {rows_per_batch} rows (micro_batch_size x world size): choose a micro_batch_size that divides it")
        state["position"] = rows // rows_per_batch
    return state


@dataclass(frozen=True)
class Training:
    """What trains: the DeepSpeed engine around the Distiller, the Distiller, its LR schedule, and whether the
    backbone loaded partitioned (ZeRO-3 from a model directory)."""
    engine: Any
    distiller: Distiller
    scheduler: Any
    loaded_partitioned: bool


def build_training(cfg: DictConfig, prepared: Prepared, device: torch.device) -> Training:
    """The backbone (S-layer indexers never load), the Distiller on it, and DeepSpeed's engine for its indexers."""
    import deepspeed
    d = cfg.distill
    shared = tuple(layer for layer, letter in enumerate(str(prepared.pattern)) if letter == "S")
    backbone = build_model(cfg.model, device, prepared.config, prepared.ds_config, shared_layers=shared)
    partitioned = any(hasattr(p, "ds_id") for p in backbone.parameters())  # ZeRO-3 loaded it in shards
    distiller = Distiller(backbone, prepared.pattern, kernel=d.kernel, target=d.target, reduction=d.loss_reduction,
                          offload_saved=d.offload_saved)
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=distiller, model_parameters=trainable,
                                                   config=prepared.ds_config)
    scheduler.step()  # from DeepSpeed's "not started" (rate 0) to the first step's rate; a resume loads its own
    return Training(engine, distiller, scheduler, partitioned)


class Start(NamedTuple):
    """Where the loop starts: the last step done (0: a fresh run) and the run's id (a resumed run keeps its
    checkpoint's)."""
    step: int
    run_id: str


def resume(training: Training, prepared: Prepared, stages: Stages, rows_per_batch: int) -> Start:
    """The state of checkpoint prepared.resume_from, when there is one, loaded: the engine's (weights, optimizer,
    schedule), the data position and the RNG."""
    run_id = uuid.uuid4().hex[:12]
    if prepared.resume_from is None:
        return Start(0, run_id)
    meta = load_checkpoint(training.engine, prepared.resume_from,
                           universal=prepared.ds_config["checkpoint"]["load_universal"])
    stages.load_state_dict(meta, rows_per_batch)
    torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    return Start(meta["step"], meta.get("run_id", run_id))


@dataclass(frozen=True)
class CheckpointWriter:
    """Writes a step's checkpoint (train.checkpoint): DeepSpeed's state and the indexers of `training`, and in
    meta.json `meta` (the run: pattern, model, config, world size, micro-batch size, run id), the step's metrics, the
    data position of the next step's loader and the RNG state; keeps the newest `keep`."""
    training: Training
    stages: Stages
    run_dir: str
    meta: dict
    keep: int
    faults: Faults

    def save(self, step: int, metrics: dict) -> None:
        meta = {**self.meta, "metrics": metrics, "loader": self.stages.state_dict(step),
                "rng": torch.get_rng_state().tolist()}
        save_checkpoint(self.training.engine, self.training.distiller, self.run_dir, step, meta, self.keep,
                        self.faults)


class Progress:
    """What the loop reports: a step's metrics to `logger` every `every` steps, at the last and with each
    evaluation; on rank 0 a progress bar and a line per evaluation."""

    def __init__(self, logger: Logger, total: int, step: int, every: int, rank: int):
        self.logger, self.every, self.rank = logger, every, rank
        self.bar = tqdm(total=total, initial=step, disable=rank != 0, desc="distill", dynamic_ncols=True)

    def step(self, step: int, stage: str, metrics: dict, last: bool) -> None:
        if step % self.every == 0 or last or "eval/loss" in metrics:
            self.logger.log(metrics, step)
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}")
        if self.rank == 0 and "eval/loss" in metrics:
            tqdm.write(f"[distill] step {step}: train loss {metrics['train/loss']:.4f}, eval loss "
                       f"{metrics['eval/loss']:.4f}, recall {metrics['eval/recall']:.4f}, stage {stage}")
        self.bar.update(1)

    def close(self, summary: dict | None) -> None:
        """The end of the run; `summary`: its final metrics (None: stopped before the end)."""
        self.bar.close()
        if summary is not None:
            self.logger.summary(summary)
        self.logger.finish()


def announce(cfg: DictConfig, prepared: Prepared, training: Training, world_size: int, device: torch.device,
             step: int) -> None:
    """The run's first line (rank 0): its pattern, groups, trainable parameters, world and where it starts."""
    pattern = prepared.pattern
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in training.distiller.parameters() if p.requires_grad)
    print(f"[distill] {cfg.name}: pattern {pattern} (retention {pattern.retention:.3f}), groups {pattern.groups()}, "
          f"{trainable} trainable parameters, world {world_size}, {device}"
          + (f", backbone loaded partitioned ({backbone_shard(training.distiller.backbone)})"
             if training.loaded_partitioned else "")
          + (f", resumed at step {step}" if step else ""), flush=True)


def backbone_shard(backbone: torch.nn.Module) -> str:
    """What this process holds of a ZeRO-3 backbone: '<held> of <whole> MiB of frozen parameters on <device>'."""
    frozen = [p for p in backbone.parameters() if hasattr(p, "ds_tensor") and not p.requires_grad]
    held = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in frozen)
    whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in frozen)
    where = sorted({p.ds_tensor.device.type for p in frozen})
    return f"{held / 2**20:.3f} of {whole / 2**20:.3f} MiB of frozen parameters on {'+'.join(where)}"


def export(cfg: DictConfig, run_dir: str) -> None:
    """The export of the run's newest checkpoint into <run_dir>/export (distill.export)."""
    export_checkpoint(latest_checkpoint(checkpoint_root(run_dir)), os.path.join(run_dir, "export"),
                      full_model=cfg.export.full_model, keep_shared_indexers=cfg.export.keep_shared_indexers)


def run(cfg: DictConfig, run_dir: str, faults: Faults = NO_FAULTS) -> dict:
    """Train and export; returns the final metrics. Every rank calls this."""
    device, rank, world_size = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    d = cfg.distill
    prepared = prepare(cfg, run_dir, world_size, device)
    if rank == 0:
        _claim_run_dir(cfg, run_dir)
    stages = Stages.load(cfg, rank, world_size)
    training = build_training(cfg, prepared, device)
    step, run_id = resume(training, prepared, stages, d.micro_batch_size * world_size)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = Logger(cfg.logger, run_dir, cfg.name, resolved, rank, run_id=run_id, resume_step=step)
    if rank == 0:
        announce(cfg, prepared, training, world_size, device, step)
    checkpoints = CheckpointWriter(training, stages, run_dir, keep=d.keep_checkpoints, faults=faults, meta={
        "pattern": str(prepared.pattern), "model": OmegaConf.to_container(cfg.model, resolve=True), "config": resolved,
        "world_size": world_size, "micro_batch_size": d.micro_batch_size, "run_id": run_id})
    evaluation = Evaluation(training.engine, training.distiller.backbone, prepared.pattern, stages.validation,
                            d.eval_every, d.lm_eval, device, rank)
    total = d.dense_steps + d.sparse_steps
    progress = Progress(logger, total, step, d.log_every, rank)
    bad_steps, stop, metrics = BadSteps(d.max_bad_steps, run_dir), StopOnSigterm(), {}
    while step < total:
        step += 1
        stage, last, t0 = stages.of(step), step == total, time.perf_counter()
        result = train_step(training.engine, stages.loader(stage), stage == "sparse", device, d.grad_accum, step,
                            rank, faults)
        bad_steps.count(result, step, logger)
        tokens = d.micro_batch_size * d.grad_accum * world_size * stages.lengths[stage]
        metrics = step_metrics(result, training.engine, training.scheduler, stage == "sparse", tokens,
                               time.perf_counter() - t0, device)
        metrics.update(evaluation(step, stage, last))
        progress.step(step, stage, metrics, last)
        saved = step % d.save_every == 0 or last
        if saved:
            checkpoints.save(step, metrics)
        if stop.requested(device) and not last:
            if not saved:
                checkpoints.save(step, metrics)
            tqdm.write(f"[distill] SIGTERM: checkpoint of step {step} saved; the same command resumes the run")
            progress.close(summary=None)
            return metrics
    progress.close(summary=metrics)
    if cfg.export.enabled and rank == 0:
        export(cfg, run_dir)
    if dist.is_initialized():
        dist.barrier()
    return metrics


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One run (or one job of a sweep); rank 0 holds the run directory's lock throughout. A user error ends the run
    with one line and exit status 2 (train.errors); INDEXCACHE_FAULTS injects the tests' faults (train.faults)."""
    run_dir = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    holds_lock = int(os.environ.get("RANK", "0")) == 0
    with exit_on_user_error(), hold_run_lock(run_dir) if holds_lock else contextlib.nullcontext():
        metrics = run(cfg, run_dir, Faults.from_env())
    return metrics.get("eval/loss", float("nan"))


if __name__ == "__main__":
    die_with_launcher()
    main()
