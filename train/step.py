"""One optimizer step of the distillation job and what the loop measures around it: the streamed forward and the
backward over the grad-accum micro-batches (`train_step`), the count of skipped non-finite steps (`BadSteps`), the
step's metrics (`step_metrics`) and evaluation on the validation batches (`Evaluation`)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from distill.evaluate import evaluate as evaluate_lm
from distill.pattern import Pattern
from train.checkpoint import checkpoint_root, latest_checkpoint
from train.data import Batch, BatchLoader
from train.distributed import mean_over_ranks
from train.faults import Faults
from train.logger import Logger


def distill_forward(engine, batch: Batch, sparse: bool, device: torch.device, with_recall: bool = False):
    """The Distiller's streamed forward on one batch of packed rows (documents kept apart when it has them)."""
    batch = batch.to(device)
    return engine(batch.input_ids, sparse=sparse, with_recall=with_recall, cu_seqlens=batch.cu_seqlens,
                  position_ids=batch.position_ids)


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: its loss and each group's (`train/loss/layer_<f>`), means over the micro-batches and the
    ranks, and what was not finite on some rank ('loss' or 'gradient'; None: the step was applied)."""
    loss: float
    group_losses: dict[str, float]
    bad: str | None


def train_step(engine, loader: BatchLoader, sparse: bool, device: torch.device, grad_accum: int, step: int,
               rank: int, faults: Faults) -> StepResult:
    """Forward then backward per micro-batch (ZeRO-3 loses gradients otherwise), then DeepSpeed's optimizer step,
    which every rank skips when any rank's gradient is not finite."""
    micro_losses = []
    for _ in range(grad_accum):
        out = distill_forward(engine, next(loader), sparse, device)
        loss = faults.nonfinite_if(step, rank, out.loss)
        # a non-finite loss gets NaN gradients, so DeepSpeed's overflow check skips the step (no host sync)
        finite = torch.isfinite(loss.detach())
        loss.register_hook(lambda grad, finite=finite: torch.where(finite, grad, float("nan")))
        engine.backward(loss)
        engine.step()
        micro_losses.append(torch.stack([loss.detach(), *out.group_losses.values()]))
    loss, *groups = mean_over_ranks(torch.stack(micro_losses).mean(0)).tolist()  # non-finite if any rank's is
    bad = "loss" if not math.isfinite(loss) else None if engine.was_step_applied() else "gradient"
    return StepResult(loss, {f"train/loss/layer_{f}": v for f, v in zip(out.group_losses, groups)}, bad)


class BadSteps:
    """The steps in a row that were skipped for a non-finite loss or gradient, logged and said as they come; at
    `limit` of them the run stops (FloatingPointError naming the last good checkpoint of `run_dir`)."""

    def __init__(self, limit: int, run_dir: str):
        self.limit, self.run_dir, self.in_a_row = limit, run_dir, 0

    def count(self, result: StepResult, step: int, logger: Logger) -> None:
        if result.bad is None:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.log({"train/skipped_nonfinite": self.in_a_row}, step)
        tqdm.write(f"[distill] step {step}: non-finite {result.bad} on some rank, step skipped ({self.in_a_row} in a "
                   "row)")
        if self.in_a_row >= self.limit:
            raise FloatingPointError(
                f"{self.in_a_row} steps in a row with a non-finite loss or gradient (last at step {step}: "
                f"{result.bad}); stopping. The last good checkpoint is "
                f"{latest_checkpoint(checkpoint_root(self.run_dir))}; lower distill.lr or check the data, then resume")


def step_metrics(result: StepResult, engine, scheduler, sparse: bool, tokens: int, seconds: float,
                 device: torch.device) -> dict[str, float]:
    """The metrics of a step that trained on `tokens` tokens (all ranks) in `seconds`."""
    grad_norm = engine.get_global_grad_norm()
    return {"train/loss": result.loss, "train/lr": scheduler.get_lr()[0], "train/stage": int(sparse),
            "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/tokens_per_s": tokens / seconds, "train/peak_memory_gib": peak_memory_gib(device),
            **result.group_losses}


def peak_memory_gib(device: torch.device) -> float:
    """The peak memory of this process so far: allocated on the GPU, else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


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


@dataclass(frozen=True)
class Evaluation:
    """What the loop evaluates on each stage's validation `batches`: the per-group loss and recall every `every`
    steps and at the last step; at the last step with `lm`, also the held-out LM loss of `backbone` under `pattern`
    with real DSA sparse attention (said on rank 0)."""
    engine: object
    backbone: torch.nn.Module
    pattern: Pattern
    batches: dict[str, list[Batch]]
    every: int
    lm: bool
    device: torch.device
    rank: int

    def __call__(self, step: int, stage: str, last: bool) -> dict[str, float]:
        batches, metrics = self.batches[stage], {}
        if batches and (step % self.every == 0 or last):
            metrics.update(evaluate(self.engine, batches, stage == "sparse", self.device))
        if batches and last and self.lm:
            lm = evaluate_lm(self.backbone, self.pattern, batches)
            metrics.update({"eval/lm_loss": lm["loss"], "eval/lm_perplexity": lm["perplexity"],
                            "eval/lm_topk_recall": lm["mean_topk_recall"]})
            if self.rank == 0:
                tqdm.write(f"[distill] held-out LM loss under {self.pattern} with real DSA: {lm['loss']:.4f} "
                           f"(perplexity {lm['perplexity']:.3f}, top-k recall {lm['mean_topk_recall']:.4f})")
        return metrics
