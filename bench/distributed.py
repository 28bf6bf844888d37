"""Multi-GPU scaling of the distillation job (issue 8): same global batch on 1, 2, 4 GPUs, ZeRO-2 and ZeRO-3.

Runs `launch/distill.sh` once per (ZeRO stage, GPU count), then resumes each stage's 2-GPU checkpoint on the
other GPU counts (universal checkpoint), then tries growing context lengths on all GPUs (ZeRO-3). Writes under --out:
results.json, results.md (tables), loss.png (the loss curves together), and each run's directory.

    python bench/distributed.py --out runs/distributed              # on a 4-GPU machine
    python bench/distributed.py --out runs/distributed-cpu --cpu --gpus 1,2 --model tiny_glm --seq-len 64 --steps 6
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(out: str, name: str, nproc: int, overrides: list[str], cpu: bool, timeout: int) -> dict:
    run_dir = os.path.join(out, name)
    env = {**os.environ, "NPROC": str(nproc), "PYTHONUNBUFFERED": "1"}
    if not cpu:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    t0 = time.time()
    proc = subprocess.run(["bash", "launch/distill.sh", f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    with open(os.path.join(out, f"{name}.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    result = {"name": name, "nproc": nproc, "ok": proc.returncode == 0, "wall_s": round(time.time() - t0, 1)}
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        train = [r for r in rows if "train/loss" in r]
        result["loss"] = [(r["step"], r["train/loss"]) for r in train]
        steady = [r["train/tokens_per_s"] for r in train[2:]] or [r["train/tokens_per_s"] for r in train]
        result["tokens_per_s"] = round(statistics.median(steady), 1) if steady else None
        result["peak_memory_gib"] = round(max((r["train/peak_memory_gib"] for r in train), default=0), 2)
    if not result["ok"]:
        result["error"] = (proc.stdout + proc.stderr)[-1500:]
    print(json.dumps({k: v for k, v in result.items() if k != "loss"}), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", default="1,2,4")
    ap.add_argument("--zero", default="zero2,zero3")
    ap.add_argument("--model", default="bench_glm")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step, all GPUs together")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--long", default="16384,32768,65536,131072", help="context lengths for the long-context run")
    ap.add_argument("--extra", default="", help="more Hydra overrides for every run, space-separated")
    ap.add_argument("--cpu", action="store_true", help="CPU processes (gloo) instead of GPUs: a smoke test")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--phases", default="scaling,resume,long",
                    help="which parts to run; the others' results are kept from --out/results.json")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gpus = [int(g) for g in args.gpus.split(",")]
    half = args.steps // 2
    extra = args.extra.split()
    common = [*extra, f"model={args.model}", f"distill.seq_len={args.seq_len}", "distill.retention=0.25",
              f"distill.dense_steps={args.steps - half // 2}", f"distill.sparse_steps={half // 2}",
              f"distill.save_every={half}", "distill.keep_checkpoints=4", "distill.eval_every=1000000",
              "distill.log_every=1", "logger=offline", "export.enabled=false", "distill.warmup_steps=2"]

    def batch(n: int) -> list[str]:
        micro = max(1, args.global_batch // (n * 4))
        return [f"distill.micro_batch_size={micro}", f"distill.grad_accum={args.global_batch // (micro * n)}"]

    phases = args.phases.split(",")
    results = {"scaling": [], "resume": [], "long_context": []}
    if os.path.exists(os.path.join(args.out, "results.json")):
        with open(os.path.join(args.out, "results.json")) as f:
            results.update(json.load(f))
    for phase, section in (("scaling", "scaling"), ("resume", "resume"), ("long", "long_context")):
        if phase in phases:
            results[section] = []

    def saved(section: str, result: dict) -> dict:  # results.json after every run: a cut-off run keeps the rest
        results[section].append(result)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        return result

    for zero in args.zero.split(",") if "scaling" in phases else []:
        for n in gpus:
            saved("scaling", {"zero": zero, **launch(args.out, f"{zero}-{n}gpu", n, [
                *common, f"deepspeed={zero}", *batch(n)], args.cpu, args.timeout)})

    # a 2-GPU checkpoint of the middle step, resumed on the other GPU counts
    for zero in args.zero.split(",") if "resume" in phases else []:
        source = os.path.join(args.out, f"{zero}-2gpu")
        if not os.path.isdir(os.path.join(source, "checkpoints", f"step_{half}")):
            continue
        for n in [g for g in gpus if g != 2]:
            name = f"resume-{zero}-2to{n}gpu"
            target = os.path.join(args.out, name)
            shutil.rmtree(target, ignore_errors=True)
            os.makedirs(os.path.join(target, "checkpoints"))
            shutil.copytree(os.path.join(source, "checkpoints", f"step_{half}"),
                            os.path.join(target, "checkpoints", f"step_{half}"))
            with open(os.path.join(target, "checkpoints", "latest"), "w") as f:
                f.write(f"step_{half}")
            saved("resume", {"zero": zero, **launch(args.out, name, n, [*common, f"deepspeed={zero}", *batch(n)],
                                                    args.cpu, args.timeout)})

    n = max(gpus)
    for seq_len in [int(s) for s in args.long.split(",") if s and "long" in phases]:
        r = launch(args.out, f"long-{seq_len}", n, [
            *extra, f"model={args.model}", f"distill.seq_len={seq_len}", "distill.retention=0.25",
            "distill.dense_steps=3",
            "distill.sparse_steps=0", "distill.micro_batch_size=1", "distill.grad_accum=1", "distill.eval_every=1000",
            "distill.save_every=1000", "distill.log_every=1", "logger=disabled", "export.enabled=false",
            "distill.eval_batches=0", "deepspeed=zero3"], args.cpu, args.timeout)
        saved("long_context", {"seq_len": seq_len, **r})
        if not r["ok"]:
            break
    write_report(results, args)


def write_report(results: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results["scaling"] + results["resume"]:
        if r.get("loss"):
            steps, losses = zip(*r["loss"])
            ax.plot(steps, losses, label=r["name"], lw=1, ls="--" if r["name"].startswith("resume") else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("distillation loss (sum over groups)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss.png"), dpi=120)

    fewest = min(int(g) for g in args.gpus.split(","))
    base = {r["zero"]: r.get("tokens_per_s") for r in results["scaling"] if r["nproc"] == fewest}
    first = results["scaling"][0] if results["scaling"] else {"name": "-"}  # the first stage on the fewest GPUs
    reference = dict(first.get("loss", []))

    def deviation(r: dict) -> str:  # the largest |loss - reference loss| over the steps both logged
        diffs = [abs(loss - reference[step]) for step, loss in r.get("loss", []) if step in reference]
        return f"{max(diffs):.4f}" if diffs else "-"

    lines = [f"model `{args.model}`, seq_len {args.seq_len}, global batch {args.global_batch} sequences; "
             f"max |Δloss| against {first['name']}", "",
             "| ZeRO | GPUs | tokens/s | speed-up | peak memory / GPU (GiB) | final loss | max abs Δloss | ok |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["scaling"]:
        tps, b = r.get("tokens_per_s"), base.get(r["zero"])
        ratio = f"{tps / b:.2f}x" if tps and b else "-"
        final = f"{r['loss'][-1][1]:.4f}" if r.get("loss") else "-"
        lines.append(f"| {r['zero']} | {r['nproc']} | {tps} | {ratio} | {r.get('peak_memory_gib')} | {final} | "
                     f"{deviation(r)} | {r['ok']} |")
    lines += ["", "| resume | ok | final loss | max abs Δloss |", "|---|---|---|---|"]
    for r in results["resume"]:
        lines.append(f"| {r['name']} | {r['ok']} | {r['loss'][-1][1] if r.get('loss') else '-'} | {deviation(r)} |")
    lines += ["", "| context | GPUs | ok | tokens/s | peak memory / GPU (GiB) |", "|---|---|---|---|---|"]
    for r in results["long_context"]:
        lines.append(f"| {r['seq_len']} | {r['nproc']} | {r['ok']} | {r.get('tokens_per_s')} "
                     f"| {r.get('peak_memory_gib')} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
