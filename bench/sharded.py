"""The frozen backbone replicated, partitioned by ZeRO-3, or offloaded to the host, on one GPU: what each costs a
distillation step (issue: the whole model on a cluster, item 1).

One process per mode, each a fresh `deepspeed.initialize` of the job's own DeepSpeed config (conf/deepspeed/<mode>
completed by `train.distill.deepspeed_config` and `fill_zero3_auto`, world size 1):
- replicated: `zero2`, the job's default kind: the backbone whole on the GPU, the indexers' optimizer sharded;
- zero3: `zero3`: every parameter partitioned (one process: its shard is the whole tensor, so what shows is
  DeepSpeed's gather / release of each module's parameters in the forward, and their prefetch);
- offload: `zero3_offload`: each parameter's shard in pinned host memory, copied to the GPU as the forward reaches
  its module, the next layer's copy prefetched (conf/deepspeed/zero3.yaml's `auto` sizes: one layer ahead, two
  whole at most).
The model is bench.real_width's slice of DeepSeek-V3.2 at its real width (hidden 7168, 256 experts of 2048, 128 MLA
heads; `--layers` decoder layers, the first dense), random block-FP8 weights (or bf16 with `--weights bf16`), the
pattern F S...S (one group: every layer served by layer 0's indexer). Per mode, T and stage (batch 1), one optimizer
step of the job (`train.step.train_step`'s body: forward, backward into the indexer, DeepSpeed's step) is timed by
`bench.real_width.timed` (CUDA events, median of --reps after --warmup), its peak GPU memory measured, and the
host's resident set recorded. A row's ratio is its seconds over the replicated row's of the same T and stage,
measured in the same run.

    python -m bench.sharded --layers 4 --seq-lens 2048 32768 --out results/sharded.json
    python -m bench.sharded --smoke --out /tmp/sharded.json      (tiny width on the CPU, gloo: the test's run)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys

import torch

MODES = {"replicated": "zero2", "zero3": "zero3", "offload": "zero3_offload"}
PLANNED = {"replicated": (2, False), "zero3": (3, False), "offload": (3, True)}  # train.plan's zero, offload_param
STAGES = ("dense", "sparse")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def job_ds_config(mode: str, config, device: torch.device) -> dict:
    """The job's DeepSpeed config of `mode` for one process, micro-batch 1, no accumulation."""
    from hydra import compose, initialize_config_dir

    from train.distill import deepspeed_config, fill_zero3_auto
    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"deepspeed={MODES[mode]}", "distill.micro_batch_size=1",
                                           "distill.grad_accum=1", "distill.dense_steps=100", "distill.warmup_steps=0"])
    ds = deepspeed_config(cfg, 1, device)
    fill_zero3_auto(ds, config)
    return ds


def run_mode(mode: str, args) -> dict:
    """The rows of one mode (in this process)."""
    import deepspeed

    from bench import plan_check
    from bench.real_width import REAL, TINY, bench_config, random_model, timed
    from distill.objective import Distiller
    from distill.pattern import Pattern
    from distill.source import resolve_dtype
    device = torch.device("cpu" if args.smoke else "cuda")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port)
    deepspeed.init_distributed(dist_backend="gloo" if args.smoke else "nccl")
    config = bench_config(TINY if args.smoke else REAL, args.layers)
    pattern = Pattern("F" + "S" * (args.layers - 1))
    ds = job_ds_config(mode, config, device)
    model = random_model(config, args.weights, device, resolve_dtype("auto", device))
    distiller = Distiller(model, pattern, kernel="auto")
    engine, *_ = deepspeed.initialize(model=distiller, config=ds,
                                      model_parameters=[p for p in distiller.parameters() if p.requires_grad])
    del model
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    resident = torch.cuda.memory_allocated() / 2**30 if cuda else None
    zero = ds["zero_optimization"]
    out = {"mode": mode, "deepspeed": MODES[mode], "zero_optimization": zero, "resident_gib": resident, "rows": []}
    for T in args.seq_lens:
        ids = torch.randint(3, config.vocab_size, (1, T), device=device,
                            generator=torch.Generator(device).manual_seed(0))
        for stage in STAGES:
            losses = []

            def step():
                loss = engine(ids, sparse=stage == "sparse").loss
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
            seconds, _ = timed(step, device, reps=args.reps, warmup=args.warmup)
            if isinstance(seconds, str):  # 'OOM': this mode does not fit
                raise torch.OutOfMemoryError(f"{mode}: T={T} {stage} step out of memory")
            row = {"mode": mode, "seq_len": T, "stage": stage, "seconds": seconds, "tokens_per_s": T / seconds,
                   # timed resets the peak after the warm-up: the peak of the timed steps, weights included
                   "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                   "host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                   "loss": losses[-1].item()}
            if args.profile:  # one more step under torch.profiler: where a mode's time goes
                row["profile"] = profiled(step, cuda)
            if not args.smoke:  # the plan's peak allocated for the row (bench.plan_check.sharded)
                row["plan_gib"] = plan_check.sharded(args.layers, T, args.weights, stage, *PLANNED[mode])[1][
                    "peak_total_gib"]
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
    return out


def profiled(step, cuda: bool, top: int = 12) -> list[list]:
    """[name, self CPU ms, self device ms, calls] of the `top` operations by self CPU time of one `step()`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [[e.key[:80], e.self_cpu_time_total / 1e3, getattr(e, "self_device_time_total", 0) / 1e3, e.count]
            for e in events]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def table(result: dict) -> str:
    """The rows with each one's ratio to the replicated row of its T and stage."""
    base = {(r["seq_len"], r["stage"]): r["seconds"] for r in result["rows"] if r["mode"] == "replicated"}
    lines = [f"{'mode':<11} {'T':>6} {'stage':<7} {'seconds':>8} {'tokens/s':>9} {'x replicated':>12} "
             f"{'peak GiB':>8} {'plan GiB':>8} {'host RSS GiB':>12}"]
    for r in result["rows"]:
        key = (r["seq_len"], r["stage"])
        ratio = "-" if key not in base else f"{r['seconds'] / base[key]:.2f}x"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        planned = f"{r['plan_gib']:.2f}" if "plan_gib" in r else "-"
        lines.append(f"{r['mode']:<11} {r['seq_len']:>6} {r['stage']:<7} {r['seconds']:>8.3f} "
                     f"{r['tokens_per_s']:>9.0f} {ratio:>12} {peak:>8} {planned:>8} {r['host_rss_gib']:>12.1f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers: one dense, the others MoE")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=None, help="T (batch 1); default 2048 32768")
    parser.add_argument("--weights", choices=("fp8", "bf16"), default="fp8")
    parser.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default="results/sharded.json")
    parser.add_argument("--smoke", action="store_true", help="tiny width on the CPU (fp32, gloo), for the test")
    parser.add_argument("--profile", action="store_true", help="profile one more step per row (top operations)")
    parser.add_argument("--mode", choices=tuple(MODES), help=argparse.SUPPRESS)  # one mode, in a child process
    parser.add_argument("--port", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.seq_lens = args.seq_lens or ([64] if args.smoke else [2048, 32768])
    if args.mode:
        with open(args.out, "w") as f:
            json.dump(run_mode(args.mode, args), f, indent=1)
        return
    result = {"device": "cpu" if args.smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
              "layers": args.layers, "weights": args.weights, "reps": args.reps, "warmup": args.warmup,
              "seq_lens": args.seq_lens, "modes": {}, "rows": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for mode in args.modes:  # a fresh process each: DeepSpeed converts the model in place, CUDA memory starts empty
        part = f"{args.out}.{mode}"
        cmd = [sys.executable, "-m", "bench.sharded", "--mode", mode, "--port", free_port(), "--out", part,
               "--layers", str(args.layers), "--weights", args.weights, "--reps", str(args.reps),
               "--warmup", str(args.warmup), "--seq-lens", *map(str, args.seq_lens),
               *(["--smoke"] if args.smoke else []), *(["--profile"] if args.profile else [])]
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode != 0:
            result["modes"][mode] = {"error": f"exit status {done.returncode}"}
            continue
        with open(part) as f:
            got = json.load(f)
        os.remove(part)
        result["rows"] += got.pop("rows")
        result["modes"][mode] = got
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(table(result), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
