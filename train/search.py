"""The training-free greedy layer search, as a command: `python -m train.search target_retention=0.25`
(conf/search.yaml).

Runs `distill.search.search` on the calibration batches of cfg.batches and writes search.json (patterns per
retention, usable as `distill.pattern=...`) and search.png (loss against retention) into the Hydra run
directory, logged to wandb.
"""
from __future__ import annotations

import json
import os

import hydra
from hydra.core.hydra_config import HydraConfig

from distill.search import plot_search, search
from train.evaluate import load_model_and_batches, log_run


def run_search(cfg, run_dir: str) -> dict:
    """The `python -m train.search` job: search.json + search.png in run_dir, logged to wandb."""
    model, batches = load_model_and_batches(cfg)
    result = search(model, batches, cfg.target_retention, compare_naive=cfg.compare_naive)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "search.json"), "w") as f:
        json.dump(result, f, indent=2)
    figure = plot_search(result, os.path.join(run_dir, "search.png"))
    metrics = {f"{name}/loss@{s['retention']:.4f}": s["loss"]
               for name in ("greedy", "uniform", "similarity") for s in result[name]}
    metrics.update({f"cost/{mode}/{k}": v for mode, c in result["cost"].items() if isinstance(c, dict)
                    for k, v in c.items()})
    log_run(cfg, run_dir, metrics, {"search": figure})
    return result


@hydra.main(config_path="../conf", config_name="search", version_base="1.3")
def main(cfg) -> None:
    run_search(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
