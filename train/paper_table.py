"""The paper's table on a model: held-out LM loss, top-k recall and retrieval as retention falls, per pattern and
method, and which distillation stage matters.

    python -m train.paper_table cells OUT --experiment E [--ratios R,R] [overrides]  # the runs, one per line
    python -m train.paper_table summarize OUT [--ratios R,R] [overrides]   # the table, plots, prefill timing, wandb

`launch/paper_table.sh` runs the whole experiment: greedy search (OUT/search/search.json), one distillation run
per line of `cells` (OUT/runs/<name>), then `summarize`. Methods per pattern: training-free sharing (the all-F
indexers, pattern applied), distillation against the layer's own attention (`own`), against the centroid of the
layers it serves (`centroid`). The stage ablation: the centroid run of one pattern repeated with the same number of
steps (the same tokens) all in the dense stage, then all in the sparse stage.
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
from torch import nn

from distill.evaluate import evaluate, pattern_applied, plot_overlap, topk_overlap
from distill.export import load_indexers_into
from distill.probe import retrieval
from distill.pattern import Pattern
from train.evaluate import load_model_and_batches, log_run, probe_samples

RATIOS = (0.5, 0.25, 0.125)
TARGETS = ("own", "centroid")
BOTH = "dense+sparse"  # the stages of a run: both, or one of them alone ("dense", "sparse")
CONF = str(Path(__file__).resolve().parent.parent / "conf")


def patterns(out: str, num_layers: int | None = None, ratios=RATIOS) -> dict[tuple[str, float], Pattern]:
    """(kind, ratio) -> pattern: 'uniform' (evenly spread F layers) and 'greedy' (from OUT/search/search.json) of
    num_layers layers (None: the searched model's)."""
    steps = json.loads((Path(out) / "search" / "search.json").read_text())["greedy"]
    num_layers = num_layers or len(steps[0]["pattern"])
    table = {}
    for ratio in ratios:
        table[("uniform", ratio)] = Pattern.from_retention(num_layers, ratio)
        n_full = len(table[("uniform", ratio)].full_layers)
        greedy = [Pattern.parse(s["pattern"]) for s in steps if len(Pattern.parse(s["pattern"]).full_layers) == n_full]
        if not greedy:
            raise ValueError(f"{out}/search/search.json has no greedy pattern with {n_full} F layers; "
                             f"search down to retention {ratio} or lower")
        table[("greedy", ratio)] = greedy[0]
    return table


def stages(distill_cfg) -> str:
    """BOTH, "dense" or "sparse": the stages a run with these distill.* settings trains."""
    if distill_cfg["dense_steps"] and distill_cfg["sparse_steps"]:
        return BOTH
    return "dense" if distill_cfg["dense_steps"] else "sparse"


def ablation_pattern(table: dict[tuple[str, float], Pattern]) -> Pattern:
    """The pattern of the stage ablation: uniform at retention 1/4 if the table has it, else its first uniform one."""
    return table.get(("uniform", 0.25)) or next(p for (kind, _), p in table.items() if kind == "uniform")


def cells(out: str, experiment: str, ratios=RATIOS, overrides=()) -> list[tuple[str, list[str]]]:
    """(run name, the distillation job's overrides) of every run of the table: all-F with the steps of `experiment`
    (conf/experiment; the anchor trained as long as the cells, so that a cell is not better only for its extra
    steps), each pattern of `patterns` x TARGETS with those steps, then the stage ablation: centroid on
    `ablation_pattern` with dense_steps + sparse_steps steps of the dense stage alone, then of the sparse stage
    alone."""
    import train.distill  # noqa: F401  (registers the config's resolvers: ${gpu:...}, ${run_tag:...})

    with initialize_config_dir(CONF, version_base="1.3"):
        distill = compose("config", overrides=[f"experiment={experiment}", *overrides]).distill
    table = patterns(out, ratios=ratios)
    all_f = Pattern.all_full(len(next(iter(table.values()))))
    runs = [(f"{all_f}-own", [f"distill.pattern={all_f}", "distill.target=own"])]  # own = centroid: one layer a group
    runs += [(f"{p}-{target}", [f"distill.pattern={p}", f"distill.target={target}"])
             for p in sorted({str(p) for p in table.values()}) for target in TARGETS]
    p, steps = ablation_pattern(table), distill.dense_steps + distill.sparse_steps
    for stage, (dense, sparse) in (("dense", (steps, 0)), ("sparse", (0, steps))):
        runs.append((f"{p}-centroid-{stage}-only", [f"distill.pattern={p}", "distill.target=centroid",
                                                    f"distill.dense_steps={dense}", f"distill.sparse_steps={sparse}"]))
    return runs


def distilled_runs(out: str) -> dict[tuple[str, str, str], Path]:
    """(pattern, target, stages) -> export dir of each finished run under OUT/runs."""
    runs = {}
    for manifest in sorted((Path(out) / "runs").glob("*/export/manifest.json")):
        m = json.loads(manifest.read_text())
        d = m["training_config"]["distill"]
        runs[(m["pattern"], d["target"], stages(d))] = manifest.parent
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


def summarize(out: str, overrides: list[str], prefill_len: int, ratios=RATIOS) -> list[dict]:
    """Evaluate every row of the table (conf/evaluate.yaml with `overrides`; cfg.probe.enabled adds the retrieval
    probe to each row), write OUT/table.{json,md} and the plots, log them; returns the rows."""
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    model, batches = load_model_and_batches(cfg)
    samples = probe_samples(cfg) if cfg.probe.enabled else None
    L = model.config.num_hidden_layers
    all_f = Pattern.all_full(L)
    table = patterns(out, L, ratios)
    runs = distilled_runs(out)
    rows = []

    def row(method: str, kind: str, pattern: Pattern | None, evaluated: nn.Module,
            stage: str | None = None) -> torch.Tensor | None:
        """Evaluate `evaluated` under `pattern` into a row of the table; returns its top-k overlap matrix (for the
        plots), None for dense attention."""
        m = evaluate(evaluated, pattern, batches)
        matrix = topk_overlap(evaluated, batches[:1], pattern=pattern) if pattern is not None else None
        r = {"method": method, "pattern_kind": kind, "pattern": str(pattern) if pattern else "-", "stages": stage,
             "retention": pattern.retention if pattern else 1.0, "loss": m["loss"], "perplexity": m["perplexity"],
             "topk_recall": m.get("mean_topk_recall"),
             "adjacent_overlap": adjacent_overlap(matrix) if matrix is not None else None}
        if samples is not None:
            probe = retrieval(evaluated, pattern, samples, batch_size=cfg.probe.batch_size)
            r.update(probe_token_accuracy=probe["token_accuracy"], probe_exact_match=probe["exact_match"],
                     probe_cells=probe["cells"], probe_control=probe.get("control"))
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("probe_c")}), flush=True)
        rows.append(r)
        return matrix

    def distilled(pattern: Pattern, target: str, stage: str) -> nn.Module | None:
        export = runs.get((str(pattern), target, stage))
        if export is None:
            print(f"no {stage} run for {pattern} target={target} under {out}/runs", flush=True)
            return None
        trained = copy.deepcopy(model)
        load_indexers_into(trained, export, pattern)
        return trained

    row("dense attention", "-", None, model)
    plot_overlap(row("all-F DSA", "-", all_f, model), os.path.join(out, "overlap_all_f.png"),
                 "top-k overlap, all-F (before)")
    if (trained := distilled(all_f, "own", BOTH)) is not None:
        row("all-F DSA, distilled as long as the cells", "-", all_f, trained, stage=BOTH)
        del trained
    for (kind, ratio), pattern in table.items():
        row("training-free", kind, pattern, model)
        for target in TARGETS:
            if (trained := distilled(pattern, target, BOTH)) is None:
                continue
            overlap = row(f"distilled ({target})", kind, pattern, trained, stage=BOTH)
            if (kind, target) == ("uniform", "centroid") and pattern == ablation_pattern(table):
                plot_overlap(overlap, os.path.join(out, "overlap_ablation_centroid.png"),
                             f"top-k used under {pattern}, centroid-distilled (after)")
            del trained
    pattern = ablation_pattern(table)
    for stage in ("dense", "sparse"):
        if (trained := distilled(pattern, "centroid", stage)) is not None:
            row(f"distilled (centroid), {stage} stage only", "uniform", pattern, trained, stage=stage)
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
    probe = "probe_token_accuracy" in rows[0]
    lines = [f"Held-out LM loss ({cfg.batches.max_batches} x {cfg.batches.batch_size} rows of {cfg.batches.seq_len} "
             f"tokens, validation split) on {device}; prefill of 1 x {prefill_len} tokens in transformers."
             + (f" Retrieval probe: {len(rows[0]['probe_cells'])} cells (lengths x depths) of "
                f"{cfg.probe.samples_per_cell} samples, token accuracy and exact match." if probe else ""), "",
             "| method | pattern kind | pattern | retention | loss | ppl | top-k recall | adjacent overlap | "
             + ("probe token acc | probe exact | " if probe else "")
             + "indexer GFLOPs | prefill s | prefill speed-up vs all-F |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if probe else "")]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern_kind']} | `{r['pattern']}` | {r['retention']:.3f} | "
                     f"{r['loss']:.4f} | {r['perplexity']:.3f} | {fmt(r['topk_recall'], '.4f')} | "
                     f"{fmt(r['adjacent_overlap'], '.3f')} | "
                     + (f"{r['probe_token_accuracy']:.3f} | {r['probe_exact_match']:.3f} | " if probe else "")
                     + f"{fmt(r.get('indexer_gflops'), '.3f')} | "
                     f"{fmt(r.get('prefill_s'), '.4f')} | {fmt(r.get('prefill_vs_all_f'), '.2f')} |")
    if probe:
        cells = [(c["length"], c["depth"]) for c in rows[0]["probe_cells"]]
        lines += ["", "Retrieval probe, token accuracy per (length, depth):", "",
                  "| method | pattern kind | retention | " + " | ".join(f"{n} @ {d:g}" for n, d in cells)
                  + " | control |",
                  "|---|---|---|" + "---|" * (len(cells) + 1)]
        for r in rows:
            control = r["probe_control"] or []
            lines.append(f"| {r['method']} | {r['pattern_kind']} | {r['retention']:.3f} | "
                         + " | ".join(f"{c['token_accuracy']:.3f}" for c in r["probe_cells"])
                         + f" | {', '.join(format(c['token_accuracy'], '.3f') for c in control) or '-'} |")
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
    metrics.update({f"{r['method']}/{r['pattern_kind']}/r{r['retention']:.3f}/probe_token_accuracy":
                    r["probe_token_accuracy"] for r in rows if "probe_token_accuracy" in r})
    images = {name: os.path.join(out, f"{name}.png") for name in ("loss_vs_retention", "overlap_all_f",
                                                                   "overlap_ablation_centroid")}
    log_run(cfg, out, metrics, {k: v for k, v in images.items() if os.path.exists(v)},
            {"table": [{k: v for k, v in r.items() if not k.startswith("probe_c")} for r in rows]})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.paper_table", description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["cells", "summarize"])
    ap.add_argument("out")
    ap.add_argument("--experiment", default="paper_table", help="cells: the distillation runs' conf/experiment")
    ap.add_argument("--ratios", type=lambda text: [float(r) for r in text.split(",")], default=list(RATIOS),
                    help="retention ratios of the table, comma-separated (default 0.5,0.25,0.125)")
    ap.add_argument("--prefill-len", type=int, default=8192)
    args, overrides = ap.parse_known_args(argv)  # Hydra overrides: of conf/config.yaml (cells), conf/evaluate.yaml
    if args.command == "cells":
        for name, run_overrides in cells(args.out, args.experiment, args.ratios, overrides):
            print(name, *run_overrides)
    else:
        summarize(args.out, overrides, args.prefill_len, args.ratios)


if __name__ == "__main__":
    main()
