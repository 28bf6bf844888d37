"""What a pattern costs in quality, as a command: `python -m train.evaluate pattern=FSSSFSSS` (conf/evaluate.yaml).

Loads cfg.model and the batches of cfg.batches, measures the pattern and the anchors with `distill.evaluate` (and,
with cfg.probe.enabled, the retrieval probe of `distill.probe` on held-out documents), writes metrics.json and
topk_overlap.png into the Hydra run directory and logs them to wandb.
`load_model_and_batches` and `log_run` serve the other apps too (`train.search`, `train.paper_table`).
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from torch import nn

from distill.adapters import family_of
from distill.evaluate import CalibrationError, evaluate, plot_overlap, topk_overlap
from distill.model import dsa_attentions
from distill.pattern import Pattern, resolve_pattern
from distill.probe import ProbeSample, make_samples, retrieval
from train.config_keys import resolve_document_mask
from train.data import build_corpus, eval_batches, packed_datasets
from train.logger import Logger
from train.model import build_model
from train.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def load_model_and_batches(cfg) -> tuple[nn.Module, list]:
    """The model of cfg.model on cfg.device and the batches of cfg.batches (split, batch_size, max_batches, seq_len)."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(cfg.model, device)
    resolve_document_mask(cfg.data, family_of(model), model.config.model_type)
    data = packed_datasets(cfg.data, load_tokenizer(cfg.model), cfg.batches.seq_len,
                           os.path.join(cfg.cache_dir, "data"))
    split = cfg.batches.split
    if split not in data:
        raise CalibrationError(f"batches.split {split!r} is not one of the data splits {sorted(data)}")
    return model, eval_batches(data[split], cfg.batches.batch_size, cfg.batches.max_batches, documents=cfg.data)


def log_run(cfg, run_dir: str, metrics: Mapping, images: Mapping[str, str],
            tables: Mapping[str, list[dict]] | None = None) -> None:
    """Log metrics (wandb and run_dir/metrics.jsonl, via train.logger), PNG images and tables (rows as dicts,
    wandb) for cfg.logger."""
    logger = Logger(cfg.logger, run_dir, cfg.logger.get("name") or os.path.basename(run_dir),
                    OmegaConf.to_container(cfg, resolve=True), rank=0, run_id=uuid.uuid4().hex)
    logger.log(dict(metrics), step=0)
    logger.summary(dict(metrics))
    if logger.run is not None:
        import wandb

        logger.run.log({name: wandb.Image(path) for name, path in images.items()}, step=0)
        for name, rows in (tables or {}).items():
            columns = sorted({k for r in rows for k in r})
            logger.run.log({name: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])},
                           step=0)
    logger.finish()


def _flat(prefix: str, metrics: Mapping) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, list):
            out.update({f"{prefix}/{key}/{i}": v for i, v in enumerate(value)})
        else:
            out[f"{prefix}/{key}"] = value
    return out


def probe_samples(cfg) -> list[ProbeSample]:
    """The samples of cfg.probe (`distill.probe.make_samples`), planted in the first cfg.probe.max_documents
    documents of cfg.data's validation split."""
    probe = cfg.probe
    validation = build_corpus(cfg.data, os.path.join(cfg.cache_dir, "data"))["validation"]
    documents = validation.select(range(min(len(validation), probe.max_documents)))["text"]
    return make_samples(load_tokenizer(cfg.model), documents, lengths=list(probe.lengths),
                        depths=list(probe.depths), needles=probe.needles, digits=probe.digits,
                        samples_per_cell=probe.samples_per_cell, seed=probe.seed, query=probe.query)


def probe_metrics(cfg, model: nn.Module, pattern: Pattern) -> dict:
    """{"pattern", and the anchors of cfg.anchors ("dense", "full"): `distill.probe.retrieval`} on `probe_samples`."""
    probe = cfg.probe
    samples = probe_samples(cfg)
    runs = {"pattern": (pattern, cfg.topk)}
    if "dense" in cfg.anchors:
        runs["dense"] = (None, None)
    if "full" in cfg.anchors:
        runs["full"] = (Pattern.all_full(len(pattern)), cfg.topk)
    return {name: retrieval(model, measured, samples, topk=topk, batch_size=probe.batch_size)
            for name, (measured, topk) in runs.items()}


def _probe_rows(probe: Mapping) -> list[dict]:
    """One row per (run, length, depth) of the probe's cells and controls (depth None), for a wandb table."""
    return [{"run": name, "depth": None, **row} for name, m in probe.items()
            for row in [*m["cells"], *m.get("control", [])]]


def run_evaluation(cfg, run_dir: str) -> dict:
    """The `python -m train.evaluate` job: metrics of cfg's pattern and anchors, overlap heatmap, the retrieval probe
    (cfg.probe.enabled), wandb."""
    unknown = [a for a in cfg.anchors if a not in ("dense", "full")]
    if unknown:
        raise ValueError(f"unknown anchors {unknown}: use 'dense' (all causal keys) and/or 'full' (all-F DSA)")
    model, batches = load_model_and_batches(cfg)
    num_layers = len(dsa_attentions(model))
    pattern = resolve_pattern(num_layers, cfg.pattern, cfg.retention, cfg.freq)
    results = {"pattern": evaluate(model, pattern, batches, topk=cfg.topk)}
    if "dense" in cfg.anchors:
        results["dense"] = evaluate(model, None, batches)
    if "full" in cfg.anchors:
        results["full"] = evaluate(model, Pattern.all_full(num_layers), batches, topk=cfg.topk)
    overlap = topk_overlap(model, batches[: cfg.overlap_batches], topk=cfg.topk)
    results["topk_overlap"] = overlap.tolist()
    losses = [name for name in results if name != "topk_overlap"]
    if cfg.probe.enabled:
        results["probe"] = probe_metrics(cfg, model, pattern)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    heatmap = plot_overlap(overlap, os.path.join(run_dir, "topk_overlap.png"))
    flat = {k: v for name in losses for k, v in _flat(name, results[name]).items()}
    probe = results.get("probe", {})
    flat.update({f"probe/{name}/{key}": m[key] for name, m in probe.items()
                 for key in ("exact_match", "token_accuracy")})
    log_run(cfg, run_dir, flat, {"topk_overlap": heatmap}, {"probe": _probe_rows(probe)} if probe else None)
    for name in losses:
        m = results[name]
        log.info("%s: loss %.4f ppl %.3f%s", name, m["loss"], m["perplexity"],
                 f" recall {m['mean_topk_recall']:.4f} ({m['pattern']})" if "pattern" in m else "")
    for name, m in probe.items():
        log.info("probe %s: exact match %.4f, token accuracy %.4f", name, m["exact_match"], m["token_accuracy"])
    return results


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg) -> None:
    run_evaluation(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
