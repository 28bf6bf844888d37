"""Fused indexer top-k on the GPU at DeepSeek-V3.2 shapes: correctness, a tile sweep, timings against the baseline.

    python -m bench.bench_topk --out results/     (results/topk.json; bench.bench_kernels runs the same in its run)

Shapes: B = 1, HI = 64, D = 128, k = 2048, bf16 (bench.common.DSA). The baseline is
bench.common.materialised_topk (fp32 [T, T] scores from bf16 matmuls, causal mask, torch.topk), timed in
the same run; "ratio" = baseline seconds / fused seconds.

FLOPs of the scoring, per causal key pair (T (T + 1) / 2 pairs per batch row): 2 * HI * D for the HI head dots
plus 2 * HI for the weighted head sum (relu not counted) = 16,512. Achieved TFLOP/s = pairs * 16,512 / seconds,
for the baseline too (which scores all T * T pairs, so its FLOP/s on this count is an effective rate).

Correctness (`check`): on every row the fused lists hold min(k, visible keys) distinct visible keys; on sampled
rows their fp32 scores (products of the bf16 inputs, fp32 sums) equal the top-k fp32 scores, the sets hold
>= 99.9% of the exact fp32 top-k keys above the k-th score (keys tied with it are interchangeable), and their
score sums are no lower than those of the baseline's sets (whose bf16-rounded scores tie and swap near the
threshold, so set equality with the baseline is reported, not required). The run exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import triton

from bench.common import DSA, dsa_inputs, materialised_topk, measure
from kernels import reference
from kernels.indexer_topk import indexer_topk
from kernels.tiles import tiles, tiles_override

SCORE_FLOPS_PER_PAIR = 2 * DSA["HI"] * DSA["D"] + 2 * DSA["HI"]
# Tile choices tried by the sweep (kernels.tiles' defaults hold the first); sizes from sm_90 compiles: registers and
# shared memory allow two 4-warp programs per SM with two rows per block, one 8-warp program with more.
SWEEP = [dict(topk_block_t=2, topk_block_s=64, topk_select=1024, topk_warps=4, topk_programs=2),
         dict(topk_block_t=1, topk_block_s=64, topk_select=1024, topk_warps=4, topk_programs=2),
         dict(topk_block_t=2, topk_block_s=64, topk_select=2048, topk_warps=4, topk_programs=2),
         dict(topk_block_t=4, topk_block_s=64, topk_select=1024, topk_warps=8, topk_programs=1),
         dict(topk_block_t=2, topk_block_s=128, topk_select=1024, topk_warps=8, topk_programs=1),
         dict(topk_block_t=4, topk_block_s=128, topk_select=2048, topk_warps=8, topk_programs=1)]


def causal_pairs(T: int, B: int = 1) -> int:
    return B * T * (T + 1) // 2


def topk_tiles(cfg: dict | None):
    """A context manager: the GPU's tiles with the top-k entries of cfg for the duration of the block."""
    return tiles_override("cuda", **(cfg or {}))


def key_mask(idx: torch.Tensor, T: int) -> torch.Tensor:
    """Bool [..., T]: which keys the lists idx [..., k] hold (-1 = none)."""
    mask = torch.zeros(*idx.shape[:-1], T + 1, dtype=torch.bool, device=idx.device)
    return mask.scatter_(-1, torch.where(idx >= 0, idx, T).long(), True)[..., :T]


def _inputs(T: int, B: int = 1, seed: int = 0, device="cuda"):
    index, _, _ = dsa_inputs(T, 1, B=B, H=1, seed=seed, device=device)
    return [t.detach() for t in index]


def check(T: int, k: int = DSA["k"], *, B: int = 1, docs=None, sample: int = 256, fp32_w: bool = False,
          device="cuda", **shapes) -> dict:
    """Correctness of the fused top-k at T (see the module docstring); 'ok' in the returned dict."""
    index, _, _ = dsa_inputs(T, 1, B=B, H=1, seed=T + 1, device=device, **shapes)
    iq, ik, iw = [x.detach() for x in index]
    if fp32_w:  # the Distiller's head weights are fp32
        iw = iw.float()
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32, device=device)
    got = indexer_topk(iq, ik, iw, k, cu_seqlens=cu)
    start = reference.document_starts(cu, B, T, iq.device)  # [B, T]
    t = torch.arange(T, device=device)
    visible = (t + 1 - start).clamp(max=k)
    valid = got >= 0
    in_range = ((got >= start[..., None]) & (got <= t[None, :, None])) | ~valid
    srt = got.sort(-1).values
    distinct = ~((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)).any(-1)
    structure = bool(torch.equal(valid.sum(-1), visible) and in_range.all() and distinct.all())
    # exact fp32 scores of sampled rows (the last one included), and the fp32 top-k there
    rows = torch.unique(torch.linspace(0, T - 1, sample, device=device).long())
    logits = torch.einsum("brhd,bsd->brhs", iq[:, rows].float(), ik.float()).relu_()
    logits = torch.einsum("brhs,brh->brs", logits, iw[:, rows].float())
    keys = torch.arange(T, device=device)
    allowed = (keys[None, None, :] <= rows[None, :, None]) & (keys[None, None, :] >= start[:, rows, None])
    logits = logits.masked_fill(~allowed, float("-inf"))
    best, best_idx = logits.topk(min(k, T), dim=-1)
    mine = got[:, rows].long()
    picked = torch.where(mine >= 0, logits.gather(-1, mine.clamp(min=0)), float("-inf"))
    finite = best > float("-inf")
    scale = best.abs().masked_fill(~finite, 0).amax(-1, keepdim=True).clamp(min=1e-30)
    value_err = ((picked.sort(-1, descending=True).values[..., :best.shape[-1]] - best).abs()
                 .masked_fill(~finite, 0) / scale).max().item()
    chosen = key_mask(mine, T)
    # the exact top-k keys strictly above the k-th score (keys tied with it are interchangeable)
    kth = best.masked_fill(~finite, float("inf")).amin(-1, keepdim=True)
    exact = key_mask(torch.where(finite & (best > kth), best_idx, -1), T)
    overlap_exact = ((chosen & exact).sum().float() / exact.sum().clamp(min=1)).item()
    out = dict(T=T, k=k, B=B, docs=docs is not None, fp32_w=fp32_w, structure=structure, sampled_rows=len(rows),
               max_rel_value_err=value_err, overlap_exact=overlap_exact)
    ok = structure and value_err < 1e-3 and overlap_exact >= 0.999
    if docs is None and B == 1 and not fp32_w:
        base = materialised_topk(iq, ik, iw, k)
        base_chosen = key_mask(base[:, rows], T)
        fused_sum = logits.masked_fill(~chosen, 0).sum(-1)
        base_sum = logits.masked_fill(~base_chosen, 0).sum(-1)
        out["min_score_sum_margin"] = ((fused_sum - base_sum) / base_sum.abs().clamp(min=1e-30)).min().item()
        same = (got.sort(-1).values == base.sort(-1).values).all(-1)
        hits = (key_mask(got, T) & key_mask(base, T)).sum()
        out["rows_same_set_as_baseline"] = same.float().mean().item()
        out["overlap_with_baseline"] = (hits.float() / (base >= 0).sum()).item()
        ok = ok and out["min_score_sum_margin"] >= -1e-4
        del base
    out["ok"] = bool(ok)
    print("topk check", out, flush=True)
    return out


def sweep(T: int, configs=SWEEP, reps: int = 3, deadline: float = float("inf")) -> list[dict]:
    """Fused top-k seconds at T for each tile choice (a compile first) until the deadline; errors are recorded,
    not raised."""
    iq, ik, iw = _inputs(T)
    rows = []
    for cfg in configs:
        if time.time() > deadline:
            print(f"topk sweep: skipping {cfg} (time budget)", flush=True)
            continue
        try:
            with topk_tiles(cfg):
                seconds, _ = measure(lambda: indexer_topk(iq, ik, iw, DSA["k"]), reps=reps, warmup=1)
        except Exception as e:  # a tile choice that does not compile or fit: the others still run
            seconds = f"error: {type(e).__name__}: {str(e)[:200]}"
        rows.append(dict(op="topk_sweep", T=T, G=None, config=cfg, seconds=seconds))
        print(rows[-1], flush=True)
    return rows


def rows_at(T: int, reps: int, baseline_max: int) -> list[dict]:
    """Timings of the fused top-k (the tiles in effect) and, up to baseline_max, the baseline, at T."""
    torch.cuda.empty_cache()
    iq, ik, iw = _inputs(T)
    flops = causal_pairs(T) * SCORE_FLOPS_PER_PAIR
    cfg = {key: v for key, v in tiles("cuda").as_dict().items() if key.startswith("topk_")}
    out = []
    seconds, peak = measure(lambda: indexer_topk(iq, ik, iw, DSA["k"]), reps=reps, warmup=1)
    out.append(dict(op="fused_topk", T=T, G=None, seconds=seconds, peak_gib=peak, flops=flops, config=cfg))
    if T <= baseline_max:
        seconds, peak = measure(lambda: materialised_topk(iq, ik, iw, DSA["k"]), reps=reps, warmup=1)
        out.append(dict(op="materialised_topk", T=T, G=None, seconds=seconds, peak_gib=peak, flops=flops))
    for row in out:
        if not isinstance(row["seconds"], str):
            row["tflops"] = row["flops"] / row["seconds"] / 1e12
    if len(out) == 2 and not isinstance(out[0]["seconds"], str) and not isinstance(out[1]["seconds"], str):
        out[0]["ratio_vs_materialised"] = out[1]["seconds"] / out[0]["seconds"]
    for row in out:
        print(row, flush=True)
    return out


def run(result: dict, save, *, seq_lens, baseline_max: int, sweep_T: int | None, sweep_deadline: float,
        deadline: float) -> None:
    """The top-k part of a benchmark run into result (checks, sweep, rows), saving after each step."""
    result["topk_flops_per_pair"] = f"2*HI*D + 2*HI = {SCORE_FLOPS_PER_PAIR} (pairs = T(T+1)/2 per batch row)"
    result["topk_checks"] = [check(32768), check(8192, B=2, docs=[0, 3000, 8192, 9000, 16384], fp32_w=True),
                             check(3000, 100)]
    save()
    with contextlib.ExitStack() as best_tiles:
        if sweep_T:
            result["rows"] += sweep(sweep_T, deadline=sweep_deadline)
            timed = [r for r in result["rows"] if r["op"] == "topk_sweep" and not isinstance(r["seconds"], str)]
            if timed:
                best = min(timed, key=lambda r: r["seconds"])["config"]
                result["topk_best_config"] = best
                # the checks and rows below run with the best tiles (recorded in each row's config)
                best_tiles.enter_context(topk_tiles(best))
                if best != SWEEP[0]:
                    result["topk_checks"].append(check(32768))  # the chosen tiles at the real shape too
            save()
        for T in seq_lens:
            if time.time() > deadline:
                print(f"topk: skipping T={T} (time budget)", flush=True)
                continue
            result["rows"] += rows_at(T, 3 if T < 32768 else 2, baseline_max)
            save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for topk.json")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    parser.add_argument("--baseline-max", type=int, default=65536, help="largest T the baseline runs at")
    parser.add_argument("--sweep-seq-len", type=int, default=16384, help="T of the tile sweep (0: no sweep)")
    parser.add_argument("--budget-s", type=float, default=300, help="skip further rows past this many seconds")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "topk.json")
    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, shapes=DSA,
                  rows=[])

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1)

    now = time.time()
    run(result, save, seq_lens=args.seq_lens, baseline_max=args.baseline_max, sweep_T=args.sweep_seq_len,
        sweep_deadline=now + 0.5 * args.budget_s, deadline=now + args.budget_s)
    ok = all(c["ok"] for c in result["topk_checks"])
    print("topk checks", "ok" if ok else "FAILED", flush=True)
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
