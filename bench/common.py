"""Shared helpers of the GPU benchmarks: DeepSeek-V3.2-shaped inputs, CUDA-event timing with peak memory."""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

# DeepSeek-V3.2 (docs/DESIGN.md section 3): main heads, MLA q/k head dim and its rope part, indexer heads and dim,
# top-k.
DSA = dict(H=128, Dq=192, rope=64, HI=64, D=128, k=2048)


def dsa_inputs(T: int, G: int, *, B: int = 1, H: int = DSA["H"], Dq: int = DSA["Dq"], HI: int = DSA["HI"],
               D: int = DSA["D"], rope: int = DSA["rope"], dtype=torch.bfloat16, device="cuda", seed: int = 0):
    """([index_q, index_k, index_w] requiring grad, main_q, main_k [G, B, T, H, Dq]) at the backbone's scales:
    unit-variance q/k (scores scaled by Dq^-0.5 spread over a few nats), index_w with the HI^-0.5 D^-0.5 fold-in;
    main_k's last `rope` columns the same for every head, as MLA's rope keys are (`job_keys` splits them off)."""
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g, device=device, dtype=dtype)  # noqa: E731
    index_w = rand(B, T, HI) * (HI ** -0.5 * D ** -0.5)
    index = [rand(B, T, HI, D), rand(B, T, D), index_w]
    main_q, main_k = rand(G, B, T, H, Dq).mul_(1.5), rand(G, B, T, H, Dq).mul_(1.5)
    if rope:
        main_k[..., Dq - rope:] = main_k[..., :1, Dq - rope:].clone()
    return [t.requires_grad_() for t in index], main_q, main_k


def job_keys(main_k: torch.Tensor, rope: int = DSA["rope"]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(main_k, main_k_rope) as the job's capture keeps `dsa_inputs`' keys [G, B, T, H, Dq]: each head's first
    Dq - rope columns [G, B, T, H, Dq - rope] and the rope columns once [G, B, T, 1, rope]; (main_k, None) if rope
    is 0."""
    if not rope:
        return main_k, None
    return main_k[..., :-rope].contiguous(), main_k[..., :1, -rope:].contiguous()


def flash_lse(main_q: torch.Tensor, main_k: torch.Tensor, scale: float) -> torch.Tensor:
    """[G, B, H, T]: the causal log-sum-exp the flash-attention forward returns for each served layer."""
    lse = []
    for q, k in zip(main_q, main_k):  # [B, T, H, Dq] -> [B, H, T, Dq]; k stands in for v (same head dim)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        lse.append(torch.ops.aten._scaled_dot_product_flash_attention(q, k, k, 0.0, True, False, scale=scale)[1])
    return torch.stack(lse)


def materialised_topk(index_q: torch.Tensor, index_k: torch.Tensor, index_w: torch.Tensor, k: int) -> torch.Tensor:
    """Plain-PyTorch baseline: fp32 [B, T, T] indexer scores (bf16 matmuls, row chunks of ~1 GiB), causal mask,
    torch.topk. Same output as kernels.reference.indexer_topk, which would hold a [B, T, HI, T] fp32 tensor."""
    B, T, HI, _ = index_q.shape
    logits = torch.empty(B, T, T, device=index_q.device, dtype=torch.float32)
    rows = max(1, (1 << 30) // (B * HI * T * index_q.element_size()))
    for r0 in range(0, T, rows):
        scores = torch.einsum("bthd,bsd->bths", index_q[:, r0:r0 + rows], index_k).relu_()
        logits[:, r0:r0 + rows] = torch.einsum("bths,bth->bts", scores, index_w[:, r0:r0 + rows]).float()
        del scores
    logits.masked_fill_(torch.ones(T, T, dtype=torch.bool, device=logits.device).triu_(1), float("-inf"))
    values, indices = logits.topk(min(k, T), dim=-1)
    indices = indices.to(torch.int32).masked_fill_(values == float("-inf"), -1)
    return F.pad(indices, (0, k - indices.shape[-1]), value=-1)


def measure(fn, reps: int = 1, warmup: int = 0):
    """(median seconds, peak GiB allocated above the allocation before the call) of fn() on the GPU,
    or ('OOM', None) when it runs out of memory."""
    try:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM", None


def fwd_bwd(loss_fn, index):
    """A closure running loss_fn() and its backward into `index`'s .grad (cleared first)."""
    def run():
        for t in index:
            t.grad = None
        loss_fn().backward()
    return run
