"""Times the fused kernels under a few tile configurations (kernels.tiles.tiles_override('cuda', ...)) at one
DeepSeek-V3.2 shape, each against the current defaults measured in the same run.

    python -m bench.tune_tiles --seq-len 16384 --groups 1 4
    python -m bench.tune_tiles --ops sparse sparse_kl --sparse-seq-lens 32768 131072

The centroid KL is timed forward + backward with the per-head LSE given (as the job runs it). The sparse attention
(MLA's absorbed form: 128 heads, 576-wide latent key, v 512, top-2048) also prints its achieved TFLOP/s: per valid
(row, head, entry) 2 * 576 + 2 * 512 FLOPs, with or without the probabilities (they come from the same dots), and
checks that every configuration gives the defaults' output. The sparse centroid KL (one F layer's loss and gradients
over the same top-k lists) prints its time and gradient agreement likewise.
"""
from __future__ import annotations

import argparse

import torch

from bench.bench_topk import SWEEP
from bench.check_kernels import relative_error
from bench.common import DSA, dsa_inputs, flash_lse, fwd_bwd, job_keys, measure
from kernels.centroid_kl import centroid_kl
from kernels.indexer_topk import indexer_topk
from kernels.sparse_attention import sparse_mqa_attention
from kernels.sparse_centroid_kl import sparse_centroid_kl
from kernels.tiles import tiles_override

CANDIDATES = [dict(), dict(index_lse_split=2048, index_lse_splits=16), dict(index_lse_split=256, index_lse_splits=128),
              dict(centroid_block_n=64, centroid_stages=3), dict(stages=2), dict(block_n=128), dict(group=16)]
TOPK_CANDIDATES = [dict()] + SWEEP[1:]  # the defaults, then bench.bench_topk's other tile choices
SPARSE_CANDIDATES = [dict(), dict(sparse_split_scores=0), dict(sparse_programs=1), dict(sparse_stages=1),
                     dict(sparse_prob_block=256)]
SPARSE_KL_CANDIDATES = [dict(), dict(sparse_kl_block_k=16), dict(sparse_kl_warps=8),
                        dict(sparse_kl_block_k=64, sparse_kl_warps=8), dict(sparse_kl_block_k=16, sparse_kl_warps=8)]


def time_candidates(label: str, candidates: list[dict], run, flops: float | None = None, check=None) -> None:
    """Times run() under each tile override (`tiles_override('cuda', **override)`), against the first (the
    defaults) in the same run; check(first result, this result) -> a string saying how far this configuration's
    output is from the first."""
    base = first = None
    for override in candidates:
        with tiles_override("cuda", **override):
            try:
                seconds, _ = measure(run, reps=3, warmup=1)
            except Exception as error:  # noqa: BLE001 (a configuration that does not compile or fit is reported)
                print(f"{label} {override}: failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            base = base or seconds
            rate = "" if flops is None else f", {flops / seconds / 1e12:.0f} TFLOP/s"
            agreement = ""
            if check is not None:
                result = run()
                first = first if first is not None else result
                agreement = ", " + check(first, result)
        print(f"{label} {override or 'defaults'}: {seconds:.4f} s ({base / seconds:.2f}x the defaults{rate}"
              f"{agreement})", flush=True)


def sparse_rows(T: int) -> None:
    """The sparse attention of one layer at T (indices from the fused top-k on random indexer projections: sets
    without locality), with and without the probability pass."""
    iq, ik, iw = [t.detach() for t in dsa_inputs(T, 1, H=1)[0]]
    topk = indexer_topk(iq, ik, iw, DSA["k"])
    del iq, ik, iw
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(1, T, DSA["H"], 576, generator=g, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, T, 576, generator=g, device="cuda", dtype=torch.bfloat16)
    entries = (topk >= 0).sum().item() * DSA["H"]
    prob = torch.zeros(topk.shape, device="cuda")

    def agree(first, result):  # out on every 61st row (all of it in fp32 would take 32 GiB at 128K), lse on all
        rows = slice(None, None, 61)
        out = (first[0][:, rows].float() - result[0][:, rows].float()).abs().max().item()
        lse = (first[1] - result[1]).nan_to_num(posinf=0.0, neginf=0.0).abs().max().item()
        return f"max |out - defaults'| {out:.1e}, |lse - defaults'| {lse:.1e}"

    for with_prob in (False, True):
        def run(with_prob=with_prob):
            with torch.no_grad():
                return sparse_mqa_attention(q, kv, topk, DSA["Dq"] ** -0.5, 512,
                                            prob_out=prob if with_prob else None)
        flops = entries * (2 * 576 + 2 * 512)
        time_candidates(f"sparse_mqa_attention T={T} prob={with_prob}", SPARSE_CANDIDATES, run, flops, agree)


def sparse_kl_rows(T: int) -> None:
    """The sparse centroid KL of one F layer at T, forward + backward (the gradients come from the forward), over
    the fused top-k's lists of random indexer projections against a random normalised target."""
    index, _, _ = dsa_inputs(T, 1, H=1)
    index[2] = index[2].detach().float().requires_grad_()  # the Distiller's head weights are fp32
    topk = indexer_topk(*[t.detach() for t in index], DSA["k"])
    g = torch.Generator(device="cuda").manual_seed(T)
    target = torch.rand(topk.shape, generator=g, device="cuda").masked_fill_(topk < 0, 0.0)
    target /= target.sum(-1, keepdim=True).clamp_min(1e-30)
    run = fwd_bwd(lambda: sparse_centroid_kl(*index, target, topk), index)

    def grads():
        run()
        return [t.grad.clone() for t in index]

    def agree(first, result):
        return "max rel. |grad - defaults'| " + " ".join(f"{relative_error(a, b):.1e}" for a, b in zip(result, first))

    time_candidates(f"sparse_centroid_kl T={T}", SPARSE_KL_CANDIDATES, grads, check=agree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--topk-seq-len", type=int, default=32768)
    parser.add_argument("--ops", nargs="+", default=["centroid", "topk"],
                        choices=["centroid", "topk", "sparse", "sparse_kl"])
    parser.add_argument("--sparse-seq-lens", type=int, nargs="+", default=[32768])
    args = parser.parse_args()
    for T in args.sparse_seq_lens:
        if "sparse" in args.ops:
            sparse_rows(T)
        if "sparse_kl" in args.ops:
            sparse_kl_rows(T)
    if "centroid" in args.ops:
        index, main_q, main_k = dsa_inputs(args.seq_len, max(args.groups))
        scale = DSA["Dq"] ** -0.5
        lse = flash_lse(main_q, main_k, scale)  # as the job runs it: the backbone's attention hands over its LSE
        main_k, main_k_rope = job_keys(main_k)
        for G in args.groups:
            run = fwd_bwd(lambda: centroid_kl(*index, main_q[:G], main_k[:G], scale, main_lse=lse[:G],
                                              main_k_rope=main_k_rope[:G]), index)
            time_candidates(f"centroid_kl T={args.seq_len} G={G}", CANDIDATES, run)
        index, main_q, main_k, main_k_rope, lse = None, None, None, None, None
        torch.cuda.empty_cache()
    if "topk" in args.ops:
        iq, ik, iw = [t.detach() for t in dsa_inputs(args.topk_seq_len, 1, H=1)[0]]
        time_candidates(f"indexer_topk T={args.topk_seq_len}", TOPK_CANDIDATES,
                        lambda: indexer_topk(iq, ik, iw, DSA["k"]))


if __name__ == "__main__":
    main()
