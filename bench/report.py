"""Markdown tables and a plot from bench.json (bench.bench_kernels), with every ratio taken within the run.

    python -m bench.report results/bench.json      (writes results/bench.md and results/bench.png)
"""
from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _index(rows):
    return {(r["op"], r["T"], r["G"]): r for r in rows}


def _sec(row):
    if row is None:
        return "not run"
    return row["seconds"] if row["seconds"] == "OOM" else f"{row['seconds']:.3f}"


def _gib(row):
    return "" if row is None or row["peak_gib"] is None else f"{row['peak_gib']:.1f}"


def _ratio(a, b):
    ok = a is not None and b is not None and not isinstance(a["seconds"], str) and not isinstance(b["seconds"], str)
    return f"{a['seconds'] / b['seconds']:.2f}" if ok else "-"


def _per_layer(row, G):
    return None if row is None or isinstance(row["seconds"], str) else dict(row, seconds=row["seconds"] / G)


def _tflops(row):
    return "" if row is None or "tflops" not in row else f"{row['tflops']:.0f}"


def tables(result: dict) -> str:
    rows = _index(result["rows"])
    lens = sorted({r["T"] for r in result["rows"] if r["op"] != "topk_sweep"})
    groups = sorted({r["G"] for r in result["rows"] if r["G"] is not None and r["op"].startswith("fused_dense")})
    flops = result.get("flops_per_pair", {})
    out = [f"GPU: {result['gpu']}; torch {result['torch']}, triton {result['triton']}; shapes {result['shapes']}.",
           "", f"FLOPs per causal key pair (T(T+1)/2 pairs): {flops}; top-k scoring: "
           f"{result.get('topk_flops_per_pair', '')}.", "",
           "Yardstick: the default `scaled_dot_product_attention` forward (no backend forced), causal, q/k 192, v 128 "
           "(seconds; the backend read from the profiler):", "",
           "| T | SDPA fwd | backend | TFLOP/s |", "|---|---|---|---|"]
    for T in lens:
        sdpa = rows.get(("sdpa_default_fwd", T, None))
        if sdpa is not None:
            out.append(f"| {T} | {_sec(sdpa)} | {sdpa.get('backend', '')} | {_tflops(sdpa)} |")
    out += ["", "Dense centroid KL, forward+backward (seconds; 'per layer / SDPA' = time / G over the default SDPA "
            "forward at the same T; 'peak' = GiB allocated above the inputs):", "",
            "| T | G | fused | TFLOP/s | per layer / SDPA | fused, LSE given | TFLOP/s | per layer / SDPA | peak fused "
            "| reference | reference / fused | peak reference |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for T in lens:
        sdpa = rows.get(("sdpa_default_fwd", T, None))
        for G in groups:
            fused = rows.get(("fused_dense_fwd_bwd", T, G))
            given = rows.get(("fused_dense_fwd_bwd_given_lse", T, G))
            ref = rows.get(("reference_dense_fwd_bwd", T, G))
            if fused is None and given is None:
                continue
            out.append(f"| {T} | {G} | {_sec(fused)} | {_tflops(fused)} | {_ratio(_per_layer(fused, G), sdpa)} | "
                       f"{_sec(given)} | {_tflops(given)} | {_ratio(_per_layer(given, G), sdpa)} | {_gib(fused)} | "
                       f"{_sec(ref)} | {_ratio(ref, fused)} | {_gib(ref)} |")
    out += ["", "Indexer top-k (k=2048): fused kernel against materialised fp32 scores + torch.topk "
            "(seconds, TFLOP/s of the scoring, peak GiB):",
            "",
            "| T | fused | TFLOP/s | peak fused | materialised | TFLOP/s | peak materialised | materialised / fused |",
            "|---|---|---|---|---|---|---|---|"]
    for T in lens:
        fused, base = rows.get(("fused_topk", T, None)), rows.get(("materialised_topk", T, None))
        if fused is not None:
            out.append(f"| {T} | {_sec(fused)} | {_tflops(fused)} | {_gib(fused)} | {_sec(base)} | {_tflops(base)} | "
                       f"{_gib(base)} | {_ratio(base, fused)} |")
    sweep = [r for r in result["rows"] if r["op"] == "topk_sweep"]
    if sweep:
        out += ["", f"Top-k tile sweep at T = {sweep[0]['T']} (seconds; the rows above ran with "
                f"{result.get('topk_best_config')}):", "", "| tiles | seconds |", "|---|---|"]
        out += [f"| {r['config']} | {_sec(r) if not str(r['seconds']).startswith('error') else r['seconds']} |"
                for r in sweep]
    if result.get("topk_checks"):
        out += ["", "Top-k correctness on the GPU (bench.bench_topk.check):", ""]
        out += [f"- {c}" for c in result["topk_checks"]]
    sparse = [T for T in lens if ("fused_sparse_fwd_bwd", T, 1) in rows]
    if sparse:
        out += ["", "Sparse stage (G=1, the fused top-k's 2048 keys per row) against the dense stage (seconds):", "",
                "| T | fused sparse | fused dense | sparse / dense |", "|---|---|---|---|"]
        for T in sparse:
            sp, de = rows[("fused_sparse_fwd_bwd", T, 1)], rows.get(("fused_dense_fwd_bwd", T, 1))
            out.append(f"| {T} | {_sec(sp)} | {_sec(de)} | {_ratio(sp, de)} |")
    if result.get("skipped"):
        out += ["", f"Skipped for the time budget: {result['skipped']}"]
    return "\n".join(out) + "\n"


def plot(result: dict, path: str) -> None:
    rows = result["rows"]

    def series(op, G=None, per_layer=False):
        pts = sorted((r["T"], r["seconds"] / (G if per_layer else 1)) for r in rows
                     if r["op"] == op and r["G"] == G and not isinstance(r["seconds"], str))
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(*series("sdpa_default_fwd"), "k-o", label="default SDPA fwd, q/k 192, v 128 (yardstick)")
    for G, color in zip((1, 2, 4), ("C0", "C1", "C2")):
        left.plot(*series("fused_dense_fwd_bwd", G, True), "-o", color=color, label=f"fused fwd+bwd / G, G={G}")
        left.plot(*series("fused_dense_fwd_bwd_given_lse", G, True), "--", color=color,
                  label=f"fused, LSE given / G, G={G}")
        left.plot(*series("reference_dense_fwd_bwd", G, True), "x", color=color, markersize=9,
                  label=f"reference / G, G={G}")
    left.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="seconds per served layer",
             title="Dense centroid KL")
    left.legend(fontsize=7)
    right.plot(*series("fused_topk"), "-o", label="fused top-k")
    right.plot(*series("materialised_topk"), "-s", label="materialised scores + torch.topk")
    right.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="seconds", title="Indexer top-k, k=2048")
    right.legend(fontsize=8)
    for ax in (left, right):
        lens = sorted({r["T"] for r in rows if r["op"] != "topk_sweep"})
        ax.set_xticks(lens, [f"{t // 1024}K" for t in lens])
        ax.grid(alpha=0.3)
    fig.suptitle(result["gpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    path = sys.argv[1]
    with open(path) as f:
        result = json.load(f)
    stem = os.path.splitext(path)[0]
    with open(stem + ".md", "w") as f:
        f.write(tables(result))
    plot(result, stem + ".png")
    print(tables(result))


if __name__ == "__main__":
    main()
