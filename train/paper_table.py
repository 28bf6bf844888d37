"""The paper's table on a model (issue 7): held-out LM loss as retention falls, per pattern and method.

    python -m train.paper_table patterns OUT            # the uniform and greedy patterns, comma-separated
    python -m train.paper_table summarize OUT [overrides]   # the table, plots, prefill timing, wandb

`launch/paper_table.sh` runs the whole experiment: greedy search (OUT/search/search.json), one distillation
run per (pattern, target) cell (Hydra multirun, experiment=paper_table, OUT/runs/*), then `summarize`.
Methods per pattern: training-free sharing (the all-F indexers, pattern applied), distillation against the
layer's own attention (`own`), against the centroid of the layers it serves (`centroid`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from distill.evaluate import evaluate, pattern_applied, plot_overlap, topk_overlap
from distill.export import load_indexers_into
from distill.pattern import Pattern
from train.evaluate import load_model_and_batches, log_run

RATIOS = (0.5, 0.25, 0.125)
CONF = str(Path(__file__).resolve().parent.parent / "conf")


def patterns(out: str, num_layers: int) -> dict[tuple[str, float], Pattern]:
    """(kind, ratio) -> pattern: 'uniform' (evenly spread F layers) and 'greedy' (from OUT/search/search.json)."""
    steps = json.loads((Path(out) / "search" / "search.json").read_text())["greedy"]
    table = {}
    for ratio in RATIOS:
        table[("uniform", ratio)] = Pattern.from_retention(num_layers, ratio)
        n_full = len(table[("uniform", ratio)].full_layers)
        greedy = [Pattern.parse(s["pattern"]) for s in steps if len(Pattern.parse(s["pattern"]).full_layers) == n_full]
        if not greedy:
            raise ValueError(f"{out}/search/search.json has no greedy pattern with {n_full} F layers; "
                             f"search down to retention {ratio} or lower")
        table[("greedy", ratio)] = greedy[0]
    return table


def distilled_runs(out: str) -> dict[tuple[str, str], Path]:
    """(pattern, target) -> export dir of each finished run under OUT/runs."""
    runs = {}
    for manifest in sorted((Path(out) / "runs").glob("*/export/manifest.json")):
        m = json.loads(manifest.read_text())
        runs[(m["pattern"], m["training_config"]["distill"]["target"])] = manifest.parent
    return runs


def adjacent_overlap(matrix: torch.Tensor) -> float:
    """Mean |A ∩ B| / k of the top-k sets of adjacent layers."""
    return matrix.diagonal(1).mean().item()


@torch.no_grad()
def prefill_seconds(model, pattern: Pattern, seq_len: int, repeats: int = 3) -> float:
    """Median wall time of one transformers forward of [1, seq_len] tokens under `pattern` (GlmMoeDsa sharing)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    times = []
    with pattern_applied(model, pattern):
        for _ in range(repeats + 1):  # the first is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def indexer_gflops(config, pattern: Pattern, seq_len: int) -> float:
    """Indexer FLOPs of one causal prefill: per F layer, q.k for T(T+1)/2 pairs x HI heads x D, and the weights."""
    pairs = seq_len * (seq_len + 1) / 2
    per_layer = pairs * config.index_n_heads * (2 * config.index_head_dim + 2)
    return len(pattern.full_layers) * per_layer / 1e9


def summarize(out: str, overrides: list[str], prefill_len: int) -> list[dict]:
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    model, batches = load_model_and_batches(cfg)
    L = model.config.num_hidden_layers
    all_f = Pattern.all_full(L)
    table = patterns(out, L)
    runs = distilled_runs(out)
    rows = []

    def row(method: str, kind: str, pattern: Pattern | None, m: dict, overlap: torch.Tensor | None) -> dict:
        r = {"method": method, "pattern_kind": kind, "pattern": str(pattern) if pattern else "-",
             "retention": pattern.retention if pattern else 1.0, "loss": m["loss"], "perplexity": m["perplexity"],
             "topk_recall": m.get("mean_topk_recall"), "adjacent_overlap": adjacent_overlap(overlap)
             if overlap is not None else None}
        print(json.dumps(r), flush=True)
        rows.append(r)
        return r

    row("dense attention", "-", None, evaluate(model, None, batches), None)
    before = topk_overlap(model, batches[:1])
    row("all-F DSA", "-", all_f, evaluate(model, all_f, batches), before)
    plot_overlap(before, os.path.join(out, "overlap_all_f.png"), "top-k overlap, all-F (before)")
    for (kind, ratio), pattern in table.items():
        row("training-free", kind, pattern, evaluate(model, pattern, batches),
            topk_overlap(model, batches[:1], pattern=pattern))
        for target in ("own", "centroid"):
            export = runs.get((str(pattern), target))
            if export is None:
                print(f"no run for {pattern} target={target} under {out}/runs", flush=True)
                continue
            trained = copy.deepcopy(model)
            load_indexers_into(trained, export, pattern)
            overlap = topk_overlap(trained, batches[:1], pattern=pattern)
            row(f"distilled ({target})", kind, pattern, evaluate(trained, pattern, batches), overlap)
            if (kind, ratio, target) == ("uniform", 0.25, "centroid"):
                plot_overlap(overlap, os.path.join(out, "overlap_uniform_r0.25_centroid.png"),
                             f"top-k used under {pattern}, centroid-distilled (after)")
            del trained

    timing = {str(p): prefill_seconds(model, p, prefill_len) for p in [all_f, *table.values()]}
    for r in rows:
        if r["pattern"] in timing:
            r["prefill_s"] = timing[r["pattern"]]
            r["prefill_vs_all_f"] = timing[str(all_f)] / timing[r["pattern"]]
            r["indexer_gflops"] = indexer_gflops(model.config, Pattern.parse(r["pattern"]), prefill_len)
    write(out, rows, prefill_len, cfg)
    return rows


def write(out: str, rows: list[dict], prefill_len: int, cfg) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(out, "table.json").write_text(json.dumps(rows, indent=1))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = [f"Held-out LM loss ({cfg.batches.max_batches} x {cfg.batches.batch_size} rows of {cfg.batches.seq_len} "
             f"tokens, validation split) on {device}; prefill of 1 x {prefill_len} tokens in transformers.", "",
             "| method | pattern kind | pattern | retention | loss | ppl | top-k recall | adjacent overlap | "
             "indexer GFLOPs | prefill s | prefill speed-up vs all-F |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern_kind']} | `{r['pattern']}` | {r['retention']:.3f} | "
                     f"{r['loss']:.4f} | {r['perplexity']:.3f} | {fmt(r['topk_recall'], '.4f')} | "
                     f"{fmt(r['adjacent_overlap'], '.3f')} | {fmt(r.get('indexer_gflops'), '.3f')} | "
                     f"{fmt(r.get('prefill_s'), '.4f')} | {fmt(r.get('prefill_vs_all_f'), '.2f')} |")
    Path(out, "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in ("training-free", "distilled (own)", "distilled (centroid)"):
        for kind, style in (("uniform", "--"), ("greedy", "-")):
            pts = sorted((r["retention"], r["loss"]) for r in rows
                         if r["method"] == method and r["pattern_kind"] == kind)
            if pts:
                ax.plot(*zip(*pts), style, marker="o", label=f"{method}, {kind}")
    for r in rows[:2]:
        ax.axhline(r["loss"], color="grey", lw=0.8, ls=":" if r["method"].startswith("dense") else "-.")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("retention (F layers / layers)")
    ax.set_ylabel("held-out LM loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss_vs_retention.png"), dpi=120)
    plt.close(fig)
    metrics = {f"{r['method']}/{r['pattern_kind']}/r{r['retention']:.3f}/loss": r["loss"] for r in rows}
    images = {name: os.path.join(out, f"{name}.png") for name in ("loss_vs_retention", "overlap_all_f",
                                                                   "overlap_uniform_r0.25_centroid")}
    log_run(cfg, out, metrics, {k: v for k, v in images.items() if os.path.exists(v)}, {"table": rows})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.paper_table", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["patterns", "summarize"])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="patterns: the model's layer count (default: from "
                    "OUT/search/search.json)")
    ap.add_argument("--prefill-len", type=int, default=8192)
    args, overrides = ap.parse_known_args(argv)  # summarize: the rest are Hydra overrides of conf/evaluate.yaml
    if args.command == "patterns":
        steps = json.loads((Path(args.out) / "search" / "search.json").read_text())["greedy"]
        layers = args.layers or len(steps[0]["pattern"])
        print(",".join(sorted({str(p) for p in patterns(args.out, layers).values()})))
    else:
        summarize(args.out, overrides, args.prefill_len)


if __name__ == "__main__":
    main()
