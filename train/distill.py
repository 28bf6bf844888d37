"""The distillation job: `python -m train.distill` (one process) or `bash launch/distill.sh` (torchrun).

Freeze the backbone, put the pattern in place, train each F layer's indexer against the centroid of
the attention of the layers it serves (dense stage, then sparse stage), evaluate, checkpoint, export.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
import socket
import sys
import time
import uuid

import datasets
import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from distill.adapters import family_of
from distill.evaluate import evaluate as evaluate_lm
from distill.objective import REDUCTIONS, TARGETS, Distiller
from distill.pattern import resolve_pattern
from kernels import centroid_kl_fn
from train.checkpoint import (CheckpointError, DamagedCheckpoint, check_compatible, checkpoint_root,
                              latest_checkpoint, load_checkpoint, newest_intact_checkpoint, previous_good_hint,
                              read_meta, save_checkpoint, verify_checkpoint)
from train import faults
from train.data import Batch, BatchLoader, eval_batches, packed_datasets, stage_seq_lens
from train.logger import MODES as LOGGER_MODES, Logger
from distill.fp8 import BlockFp8
from train.model import ModelConfigError, build_model, check_fp8_stage, model_config, resolve_dtype
from train.plan import check_plan
from train.run_dir import hold_run_lock, record_config, run_tag, set_aside_outputs
from train.tokenizer import load_tokenizer


# `${gpu:A,B}` in conf/: A when a GPU is visible, else B (the embedded defaults run on either).
OmegaConf.register_new_resolver("gpu", lambda on_gpu, on_cpu: on_gpu if torch.cuda.is_available() else on_cpu,
                                replace=True)
# `${run_tag:pattern,freq,retention,target}`: what defines a run, for its name (train.run_dir.run_tag).
OmegaConf.register_new_resolver("run_tag", run_tag, replace=True)

DEVICES = ("auto", "cpu", "cuda")
LAUNCHER_PID = "INDEXCACHE_LAUNCHER_PID"  # exported by launch/distill.sh: the pid of torch.distributed.run
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def setup_distributed(device_cfg: str) -> tuple[torch.device, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns device, rank, world."""
    import deepspeed
    use_cuda = torch.cuda.is_available() and device_cfg != "cpu"
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # one process without torchrun: any free port (runs may be side by side)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    local_rank = int(os.environ["LOCAL_RANK"])  # this node's process index: its GPU (RANK counts every node's)
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK {local_rank} on {socket.gethostname()}, which sees "
                           f"{torch.cuda.device_count()} GPUs: NPROC is the processes per node, at most its GPUs")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


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
            raise ValueError(f"deepspeed.{key}={ds[key]} conflicts with distill.micro_batch_size="
                             f"{d.micro_batch_size} x grad_accum={d.grad_accum} x world size {world_size} "
                             f"(= {batch}); set the distill.* keys instead")
    zero = ds.get("zero_optimization", {})
    if zero.get("stage") not in (1, 2, 3) or zero.get("compute_grad_norm") is False or \
            (ds["bf16"]["enabled"] and ds["bf16"].get("check_grad_overflow") is False):
        raise ValueError(f"deepspeed.zero_optimization={zero}, bf16={ds['bf16']}: the job needs ZeRO stage 1, 2 or 3 "
                         "with compute_grad_norm and bf16.check_grad_overflow left on, so that DeepSpeed skips a step "
                         "whose gradients are not finite")
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


def distill_forward(engine, batch: Batch, sparse: bool, device: torch.device, with_recall: bool = False):
    """The Distiller's streamed forward on one batch of packed rows (documents kept apart when it has them)."""
    batch = batch.to(device)
    return engine(batch.input_ids, sparse=sparse, with_recall=with_recall, cu_seqlens=batch.cu_seqlens,
                  position_ids=batch.position_ids)


@torch.no_grad()
def evaluate(engine, batches: list[Batch], sparse: bool, device: torch.device) -> dict[str, float]:
    """Per-group distillation loss and top-k recall on the validation batches (every rank, same batches)."""
    sums: dict[str, float] = {}
    for batch in batches:
        out = distill_forward(engine, batch, sparse, device, with_recall=True)
        for f, value in out.group_losses.items():
            sums[f"eval/loss/layer_{f}"] = sums.get(f"eval/loss/layer_{f}", 0.0) + value.item()
        for f, value in out.recall.items():
            sums[f"eval/recall/layer_{f}"] = sums.get(f"eval/recall/layer_{f}", 0.0) + value
        sums["eval/loss"] = sums.get("eval/loss", 0.0) + out.loss.item()
    metrics = {k: v / len(batches) for k, v in sums.items()}
    recalls = [v for k, v in metrics.items() if k.startswith("eval/recall/")]
    metrics["eval/recall"] = sum(recalls) / len(recalls)
    return metrics


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def prepare(cfg: DictConfig, run_dir: str, world_size: int, device: torch.device):
    """Check every key the job reads, before the weights or the data load and any GPU work starts.

    Returns (transformers config, pattern, checkpoint to resume from or None, DeepSpeed config); a checkpoint
    of another world size is loaded through DeepSpeed's universal (re-shardable) form.
    """
    _check_keys(cfg, device)
    d = cfg.distill
    config = model_config(cfg.model)
    if not hasattr(config, "index_topk"):
        raise ModelConfigError(f"model {config.model_type!r} has no DSA indexer (no index_topk)")
    resolve_dtype(cfg.model.get("dtype"), device)
    family = family_of(config)
    pattern = resolve_pattern(family.num_dsa_layers(config), d.pattern, d.retention, d.freq, key_prefix="distill.")
    if cfg.export.full_model and family.export_as is None:
        raise ValueError(f"export.full_model=true: {config.model_type} has no transformers class that shares top-k "
                         "across layers, so its full model directory would not run the pattern; use "
                         "export.full_model=false (indexer weights and manifest)")
    if cfg.data.document_mask and not family.documents:
        raise ValueError(f"data.document_mask=true: the {config.model_type} forward cannot keep packed documents "
                         "apart; set data.document_mask=false")
    for stage, seq_len in stage_seq_lens(d).items():
        if seq_len > config.max_position_embeddings:
            raise ValueError(f"{_seq_len_key(d, stage)}={seq_len} exceeds the model's max_position_embeddings="
                             f"{config.max_position_embeddings}")
    resume_from = _resume_path(cfg, run_dir, str(pattern), OmegaConf.to_container(cfg.model, resolve=True))
    ds_config = deepspeed_config(cfg, world_size, device)
    if BlockFp8.of(config) is not None:  # the quantization_config read (and refused) before anything loads
        check_fp8_stage(ds_config)
    saved_world = read_meta(resume_from).get("world_size", world_size) if resume_from else world_size
    ds_config["checkpoint"] = {"load_universal": saved_world != world_size}  # re-shard through DeepSpeed's universal form
    _check_deepspeed(ds_config)
    # the memory plan (docs/PLAN.md): refused if it does not fit, before any weight loads (plan.check=false runs it)
    check_plan(cfg, config, pattern, ds_config, world_size, device)
    return config, pattern, resume_from, ds_config


def _check_keys(cfg: DictConfig, device: torch.device) -> None:
    """The job's plain config keys: types, ranges, choices and the combinations that cannot work."""
    d = cfg.distill
    for key in ("seq_len", "dense_seq_len", "sparse_seq_len", "micro_batch_size", "grad_accum", "eval_every",
                "save_every", "log_every", "max_bad_steps"):
        _check_integer(f"distill.{key}", d[key], minimum=1)
    for key in ("dense_steps", "sparse_steps", "warmup_steps", "eval_batches", "keep_checkpoints"):
        _check_integer(f"distill.{key}", d[key], minimum=0)
    _check_integer("seed", cfg.seed)
    if d.dense_steps + d.sparse_steps < 1:
        raise ValueError(f"distill.dense_steps={d.dense_steps} and sparse_steps={d.sparse_steps}: "
                         "both must be >= 0 and at least one step in all")
    _check_number("distill.lr", d.lr, lambda v: v > 0, "> 0")
    _check_number("distill.weight_decay", d.weight_decay, lambda v: v >= 0, ">= 0")
    _check_number("distill.grad_clip", d.grad_clip, lambda v: v >= 0, ">= 0 (0: no clipping)")
    _check_number("distill.min_lr_ratio", d.min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]")
    if not OmegaConf.is_list(d.betas) or len(d.betas) != 2:
        raise ValueError(f"distill.betas must be a list of two numbers in [0, 1), got {d.betas!r}")
    for i, beta in enumerate(d.betas):
        _check_number(f"distill.betas[{i}]", beta, lambda v: 0 <= v < 1, "in [0, 1)")
    for key, choices in (("target", TARGETS), ("loss_reduction", REDUCTIONS)):
        if d[key] not in choices:
            raise ValueError(f"distill.{key}={d[key]!r} is not one of {choices}")
    centroid_kl_fn(d.kernel, device)  # refuses an unknown kernel, or 'triton' without CUDA or TRITON_INTERPRET=1
    for key, value in (("distill.lm_eval", d.lm_eval), *((f"export.{k}", v) for k, v in cfg.export.items())):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
    if d.lm_eval and d.eval_batches == 0:
        raise ValueError("distill.lm_eval=true evaluates on the validation batches, but distill.eval_batches=0: "
                         "set eval_batches >= 1 or lm_eval=false")
    if d.offload_saved not in ("auto", True, False):
        raise ValueError(f"distill.offload_saved={d.offload_saved!r}: use auto (on with a GPU), true or false")
    for key in ("document_mask", "restart_positions"):
        if not isinstance(cfg.data.get(key, False), bool):
            raise ValueError(f"data.{key} must be true or false, got {cfg.data.get(key)!r}")
    if cfg.export.keep_shared_indexers and not cfg.export.full_model:
        raise ValueError("export.keep_shared_indexers=true keeps the S-layer indexers in the full model directory: "
                         "it needs export.full_model=true")
    if cfg.device not in DEVICES:
        raise ValueError(f"device={cfg.device!r} is not one of {DEVICES}")
    if cfg.device == "cuda" and device.type != "cuda":
        raise ValueError("device=cuda, but no CUDA device is visible: use device=auto or device=cpu")
    if cfg.logger.mode not in LOGGER_MODES:
        raise ValueError(f"logger.mode={cfg.logger.mode!r} is not one of {LOGGER_MODES}")
    if not isinstance(cfg.resume, str) or not cfg.resume:
        raise ValueError(f"resume={cfg.resume!r}: use auto, never or a checkpoint directory")
    if not isinstance(cfg.name, str) or not cfg.name:
        raise ValueError(f"name={cfg.name!r}: the run's name must be a non-empty string")


def _check_integer(key: str, value, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value}")


def _check_number(key: str, value, ok, rule: str) -> None:
    """`value` is a finite number with ok(value) true; else a ValueError naming `key` and `rule`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{key} must be a number {rule}, got {value!r}")


def _check_deepspeed(ds_config: dict) -> None:
    """Let DeepSpeed parse the whole config now (it would at deepspeed.initialize, after the weights load).
    train_batch_size is left out: DeepSpeed checks it against the world size of torch.distributed, which may
    not be up yet; deepspeed_config has checked it against the job's world size."""
    from deepspeed.runtime.config import DeepSpeedConfig
    try:
        DeepSpeedConfig({k: v for k, v in ds_config.items() if k != "train_batch_size"})
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"DeepSpeed refuses the config of deepspeed.* (completed from distill.*): {e}") from e


def run(cfg: DictConfig, run_dir: str) -> dict:
    """Train and export; returns the final metrics. Every rank calls this."""
    import deepspeed
    device, rank, world_size = setup_distributed(cfg.device)
    torch.manual_seed(cfg.seed)
    d = cfg.distill
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    config, pattern, resume_from, ds_config = prepare(cfg, run_dir, world_size, device)
    if rank == 0:
        _claim_run_dir(cfg, run_dir)

    tokenizer = load_tokenizer(cfg.model)
    lengths = stage_seq_lens(d)  # each stage's row length; one packed dataset and loader per distinct length

    def packed():
        return {n: packed_datasets(cfg.data, tokenizer, n, os.path.join(cfg.cache_dir, "data"))
                for n in sorted(set(lengths.values()))}
    data = packed() if cfg.data.get("prepared") else _on_rank0_first(rank, packed)  # prepared: opened, never packed
    loaders = {n: BatchLoader(rows["train"], d.micro_batch_size, seed=cfg.seed, rank=rank, world_size=world_size,
                              documents=cfg.data) for n, rows in data.items()}
    val = {stage: eval_batches(data[n]["validation"], d.micro_batch_size, d.eval_batches, documents=cfg.data)
           for stage, n in lengths.items()}

    def stage_after(step: int) -> str:  # the stage of step + 1 (at the end: the last stage)
        return "sparse" if step >= d.dense_steps and "sparse" in lengths else "dense"

    shared = tuple(layer for layer, letter in enumerate(str(pattern)) if letter == "S")  # their indexers never load
    backbone = build_model(cfg.model, device, config, ds_config, shared_layers=shared)
    partitioned = any(hasattr(p, "ds_id") for p in backbone.parameters())  # ZeRO-3 loaded it in shards
    distiller = Distiller(backbone, pattern, kernel=d.kernel, target=d.target, reduction=d.loss_reduction,
                          offload_saved=d.offload_saved)
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=distiller, model_parameters=trainable, config=ds_config)
    scheduler.step()  # from DeepSpeed's "not started" (rate 0) to the first step's rate; a resume loads its own

    step = 0
    run_id = uuid.uuid4().hex[:12]  # a fresh run's id; a resumed run keeps its checkpoint's
    if resume_from:
        meta = load_checkpoint(engine, resume_from, universal=ds_config["checkpoint"]["load_universal"])
        step = meta["step"]
        run_id = meta.get("run_id", run_id)
        stage = stage_after(step)
        state = _loader_state(meta, d.micro_batch_size * world_size, stage, lengths[stage], _seq_len_key(d, stage))
        if state is not None:
            loaders[lengths[stage]].load_state_dict(state)
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))

    resolved = OmegaConf.to_container(cfg, resolve=True)
    logger = Logger(cfg.logger, run_dir, cfg.name, resolved, rank, run_id=run_id, resume_step=step)
    if rank == 0:
        print(f"[distill] {cfg.name}: pattern {pattern} (retention {pattern.retention:.3f}), groups "
              f"{pattern.groups()}, {sum(getattr(p, 'ds_numel', p.numel()) for p in trainable)} trainable parameters, world {world_size}, "
              f"{device}" + (", backbone loaded partitioned" if partitioned else "")
              + (f", resumed at step {step}" if step else ""), flush=True)

    total = d.dense_steps + d.sparse_steps
    metrics: dict[str, float] = {}
    bad_steps = 0
    stop = _StopOnSigterm()
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="distill", dynamic_ncols=True)
    meta = {"pattern": str(pattern), "model": model_cfg, "config": resolved, "world_size": world_size,
            "micro_batch_size": d.micro_batch_size, "run_id": run_id}

    def save(step: int) -> None:
        stage = stage_after(step)  # the data position of the loader the next step reads, and whose it is
        loader_state = {**loaders[lengths[stage]].state_dict(), "stage": stage, "seq_len": lengths[stage]}
        save_checkpoint(engine, distiller, run_dir, step, {**meta, "metrics": metrics, "loader": loader_state,
                                                           "rng": torch.get_rng_state().tolist()},
                        d.keep_checkpoints)

    while step < total:
        sparse = step >= d.dense_steps
        stage = "sparse" if sparse else "dense"
        loader = loaders[lengths[stage]]
        t0 = time.perf_counter()
        step += 1
        micro_losses = []
        for _ in range(d.grad_accum):  # forward then backward per micro-batch (ZeRO-3 loses grads otherwise)
            out = distill_forward(engine, next(loader), sparse, device)
            loss = faults.nonfinite_if(step, rank, out.loss)
            # a non-finite loss gets NaN gradients, so DeepSpeed's overflow check skips the step (no host sync)
            finite = torch.isfinite(loss.detach())
            loss.register_hook(lambda grad, finite=finite: torch.where(finite, grad, float("nan")))
            engine.backward(loss)
            engine.step()
            micro_losses.append(torch.stack([loss.detach(), *out.group_losses.values()]))
        loss, *groups = _mean_over_ranks(torch.stack(micro_losses).mean(0)).tolist()  # non-finite if any rank's is
        group_losses = {f"train/loss/layer_{f}": v for f, v in zip(out.group_losses, groups)}
        del out, micro_losses
        # DeepSpeed's ZeRO optimizer skips the update (every rank) when any rank's gradient is not finite
        bad = "loss" if not math.isfinite(loss) else None if engine.was_step_applied() else "gradient"
        if bad is None:
            bad_steps = 0
        else:
            bad_steps += 1
            logger.log({"train/skipped_nonfinite": bad_steps}, step)
            tqdm.write(f"[distill] step {step}: non-finite {bad} on some rank, step skipped ({bad_steps} in a row)")
            if bad_steps >= d.max_bad_steps:
                raise FloatingPointError(
                    f"{bad_steps} steps in a row with a non-finite loss or gradient (last at step {step}: {bad}); "
                    f"stopping. The last good checkpoint is {latest_checkpoint(checkpoint_root(run_dir))}; lower "
                    f"distill.lr or check the data, then resume")
        grad_norm = engine.get_global_grad_norm()
        metrics = {"train/loss": loss, "train/lr": scheduler.get_lr()[0], "train/stage": int(sparse),
                   "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                   "train/tokens_per_s": d.micro_batch_size * d.grad_accum * world_size * lengths[stage]
                   / (time.perf_counter() - t0),
                   "train/peak_memory_gib": peak_memory_gib(device), **group_losses}
        if val[stage] and (step % d.eval_every == 0 or step == total):
            metrics.update(evaluate(engine, val[stage], sparse, device))
        if val[stage] and step == total and d.lm_eval:
            lm = evaluate_lm(distiller.backbone, pattern, val[stage])
            metrics.update({"eval/lm_loss": lm["loss"], "eval/lm_perplexity": lm["perplexity"],
                            "eval/lm_topk_recall": lm["mean_topk_recall"]})
            if rank == 0:
                tqdm.write(f"[distill] held-out LM loss under {pattern} with real DSA: {lm['loss']:.4f} "
                           f"(perplexity {lm['perplexity']:.3f}, top-k recall {lm['mean_topk_recall']:.4f})")
        if step % d.log_every == 0 or step == total or "eval/loss" in metrics:
            logger.log(metrics, step)
            bar.set_postfix(loss=f"{loss:.4f}")
        if rank == 0 and "eval/loss" in metrics:
            tqdm.write(f"[distill] step {step}: train loss {loss:.4f}, eval loss {metrics['eval/loss']:.4f}, "
                       f"recall {metrics['eval/recall']:.4f}, stage {'sparse' if sparse else 'dense'}")
        if step % d.save_every == 0 or step == total:
            save(step)
        bar.update(1)
        if stop.requested(device) and step < total:
            if step % d.save_every:
                save(step)
            tqdm.write(f"[distill] SIGTERM: checkpoint of step {step} saved; the same command resumes the run")
            logger.finish()
            return metrics
    bar.close()
    logger.summary(metrics)
    logger.finish()
    if cfg.export.enabled and rank == 0:
        from distill.export import export_checkpoint
        export_checkpoint(latest_checkpoint(checkpoint_root(run_dir)), os.path.join(run_dir, "export"),
                          full_model=cfg.export.full_model, keep_shared_indexers=cfg.export.keep_shared_indexers)
    if dist.is_initialized():
        dist.barrier()
    return metrics


def _on_rank0_first(rank: int, fn):
    """Run `fn` on rank 0, then on the others (they find rank 0's cache)."""
    if rank != 0:
        datasets.disable_progress_bars()
        dist.barrier()
    result = fn()
    if rank == 0:
        dist.barrier()
    return result


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


def _mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    values = values.float().clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()


class _StopOnSigterm:
    """SIGTERM (as schedulers send it) asks for a checkpoint and a clean exit at the end of the step."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.flag = True

    def requested(self, device: torch.device) -> bool:
        """True on every rank once any rank got SIGTERM."""
        flag = torch.tensor(float(self.flag), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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
        if skipped and (not dist.is_initialized() or dist.get_rank() == 0):
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


def die_with_launcher() -> None:
    """Under launch/distill.sh: the kernel SIGKILLs this worker when its parent, the launcher's
    torch.distributed.run (pid in $INDEXCACHE_LAUNCHER_PID), dies, kill -9 included. torch.distributed.run starts
    its workers in sessions of their own, so a kill of the launcher's process group does not reach them."""
    launcher = os.environ.get(LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed: the worker would outlive its launcher")
    if os.getppid() != int(launcher):
        sys.exit(f"[distill] the launcher (pid {launcher}) is gone before this worker started; exiting")


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    """One run (or one job of a sweep); rank 0 holds the run directory's lock throughout."""
    run_dir = hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    holds_lock = int(os.environ.get("RANK", "0")) == 0
    with hold_run_lock(run_dir) if holds_lock else contextlib.nullcontext():
        metrics = run(cfg, run_dir)
    return metrics.get("eval/loss", float("nan"))


if __name__ == "__main__":
    die_with_launcher()
    main()
