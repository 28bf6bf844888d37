"""GPU correctness of the fused kernels against the plain-PyTorch references at moderate DeepSeek-like shapes.

    python -m bench.check_kernels          (exits non-zero on a mismatch)
"""
from __future__ import annotations

import contextlib
import sys

import torch

from bench.common import DSA, dsa_inputs, flash_lse, job_keys
from bench.real_scale import real_scale_run
from kernels import block_fp8, reference
from kernels.centroid_kl import centroid_kl
from kernels.compressed_attention import compressed_attention
from kernels.dense_attention import causal_attention
from kernels.indexer_topk import indexer_topk
from kernels.reference import allowed_keys
from kernels.sparse_attention import sparse_mqa_attention
from kernels.sparse_centroid_kl import sparse_centroid_kl


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| over want's finite entries; inf where the non-finite entries differ (an LSE
    is -inf on rows without keys)."""
    got, want = got.float(), want.float()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)) or not torch.equal(got[~finite], want[~finite]):
        return float("inf")
    return ((got[finite] - want[finite]).abs().max() / want[finite].abs().max()).item()


def check_centroid_kl(name, T, G, H, dtype, *, B=1, sparse_k=None, docs=None, with_lse=False, fp32_w=False,
                      tol=2e-2, dq=DSA["Dq"], rope=DSA["rope"]):
    """The fused centroid KL against the reference (fp32) on dsa_inputs; the fused kernels get the keys as the job
    passes them (`job_keys`: the rope columns once; rope=0: every head's full key)."""
    index, mq, mk = dsa_inputs(T, G, B=B, H=H, Dq=dq, rope=rope, dtype=dtype, seed=T)
    if fp32_w:  # the Distiller's head weights are fp32
        index[2] = index[2].detach().float().requires_grad_()
    scale = dq ** -0.5
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32, device="cuda")
    topk = None if sparse_k is None else indexer_topk(*[t.detach() for t in index], sparse_k, cu_seqlens=cu)
    lse = flash_lse(mq, mk, scale) if with_lse else None
    nope, shared = job_keys(mk, rope)
    loss = centroid_kl(*index, mq, nope, scale, topk, cu_seqlens=cu, main_lse=lse, main_k_rope=shared)
    grads = torch.autograd.grad(loss, index)
    ref_index = [t.detach().float().requires_grad_() for t in index]
    want = reference.centroid_kl(*ref_index, mq.float(), mk.float(), scale, topk, cu_seqlens=cu)
    want_grads = torch.autograd.grad(want, ref_index)
    errors = [abs(loss.item() - want.item()) / abs(want.item())] + [relative_error(a, b) for a, b in
                                                                     zip(grads, want_grads)]
    ok = all(e < tol for e in errors)
    print(f"centroid_kl {name:<34} loss {loss.item():.6f} ref {want.item():.6f}  rel.err loss/dq/dk/dw "
          + " ".join(f"{e:.1e}" for e in errors) + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def check_topk(T, k, *, B=1, docs=None):
    index, _, _ = dsa_inputs(T, 1, B=B, H=1, seed=T + 1)
    iq, ik, iw = [t.detach() for t in index]
    iw = iw.float()  # the Distiller's head weights are fp32
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32, device="cuda")
    got = indexer_topk(iq, ik, iw, k, cu_seqlens=cu)
    want = reference.indexer_topk(iq, ik, iw, k, cu_seqlens=cu)
    logits = reference.indexer_logits(iq, ik, iw)
    scores = [torch.where(x >= 0, logits.gather(-1, x.clamp(min=0).long()), -torch.inf).sort(-1).values
              for x in (got, want)]
    allowed = allowed_keys(B, T, slice(None), None, iq.device, cu_seqlens=cu)
    counts_ok = torch.equal((got >= 0).sum(-1), allowed.sum(-1).clamp(max=k))
    in_doc = bool(allowed.gather(-1, got.clamp(min=0).long())[got >= 0].all())
    same_sets = (got.sort(-1).values == want.sort(-1).values).all(-1).float().mean().item()
    ok = counts_ok and in_doc and torch.allclose(scores[0], scores[1], rtol=1e-4, atol=1e-5)
    print(f"indexer_topk T={T} k={k} B={B} docs={docs is not None}: rows with identical sets {same_sets:.4f}, "
          f"selected scores match {ok}", flush=True)
    return ok


def check_sparse(T, *, B=1, H=DSA["H"], docs=None, dtype=torch.bfloat16, tol=2e-2):
    """sparse_mqa_attention (absorbed MLA: 576-wide kv, v 512) of two layers accumulating a sparse centroid, then
    sparse_centroid_kl against it, each against its reference, with top-k lists from indexer_topk."""
    index, _, _ = dsa_inputs(T, 1, B=B, H=1, dtype=dtype, seed=T + 2)
    index[2] = index[2].detach().float().requires_grad_()  # the Distiller's head weights are fp32
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32, device="cuda")
    topk = indexer_topk(*[t.detach() for t in index], DSA["k"], cu_seqlens=cu)
    g = torch.Generator(device="cuda")
    layers = []
    for layer in range(2):
        g.manual_seed(T + layer)
        layers.append((torch.randn(B, T, H, 576, generator=g, device="cuda", dtype=dtype),
                       torch.randn(B, T, 576, generator=g, device="cuda", dtype=dtype)))
    outputs, targets = [], []
    for impl in (sparse_mqa_attention, reference.sparse_mqa_attention):
        targets.append(torch.zeros(*topk.shape, device="cuda"))
        with torch.no_grad():
            outputs.append([impl(q, kv, topk, DSA["Dq"] ** -0.5, 512, prob_out=targets[-1], prob_weight=0.5,
                                cu_seqlens=cu) for q, kv in layers])
    errors = [relative_error(a, b) for got, want in zip(*outputs) for a, b in zip(got, want)]
    errors.append(relative_error(*targets))
    loss = sparse_centroid_kl(*index, targets[0], topk, cu_seqlens=cu)
    grads = torch.autograd.grad(loss, index)
    ref_index = [t.detach().float().requires_grad_() for t in index]
    want = reference.sparse_centroid_kl(*ref_index, targets[0], topk, cu_seqlens=cu)
    want_grads = torch.autograd.grad(want, ref_index)
    errors += [abs(loss.item() - want.item()) / abs(want.item())] + [relative_error(a, b)
                                                                     for a, b in zip(grads, want_grads)]
    ok = all(e < tol for e in errors)
    print(f"sparse T={T} B={B} H={H} k={DSA['k']} docs={docs is not None} {dtype}: rel.err out/lse x2, prob, "
          "loss/dq/dk/dw " + " ".join(f"{e:.1e}" for e in errors) + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def check_compressed(T, *, H=64, Dq=512, G=2, ratio=4, k=512, tol=2e-2):
    """DeepSeek-V4's CSA shapes: 64 query heads of 512 against one 512-wide key head of T // ratio compressed
    entries. The fused dense centroid KL (LSE computed, then given as the backbone's attention returns it) and the
    sparse attention over the fused top-k entries with its probabilities, each against its reference."""
    S = T // ratio
    index, _, _ = dsa_inputs(T, 1, H=1, seed=T + 3)
    iq, iw = index[0], index[2]
    ik = index[1][:, :S].detach().clone().requires_grad_()
    g = torch.Generator(device="cuda").manual_seed(T)
    mq = torch.randn(G, 1, T, H, Dq, generator=g, device="cuda", dtype=torch.bfloat16)
    mk = torch.randn(G, 1, S, 1, Dq, generator=g, device="cuda", dtype=torch.bfloat16)
    scale = Dq ** -0.5
    name = f"compressed (V4) T={T} H={H} Dq={Dq} G={G} ratio={ratio}"
    ref_index = [t.detach().float().requires_grad_() for t in (iq, ik, iw)]
    want = reference.centroid_kl(*ref_index, mq.float(), mk.float(), scale, ratio=ratio)
    want_grads = torch.autograd.grad(want, ref_index)
    lse = torch.stack([compressed_attention(q, kk[:, :, 0], scale, ratio)[1] for q, kk in zip(mq, mk)])  # backbone's
    results = []
    for label, main_lse in (("LSE computed", None), ("LSE given", lse)):
        loss = centroid_kl(iq, ik, iw, mq, mk, scale, main_lse=main_lse, ratio=ratio)
        grads = torch.autograd.grad(loss, (iq, ik, iw))
        errors = [abs(loss.item() - want.item()) / abs(want.item())] + [relative_error(a, b)
                                                                         for a, b in zip(grads, want_grads)]
        results.append(all(e < tol for e in errors))
        print(f"{name} centroid_kl {label}: rel.err loss/dq/dk/dw " + " ".join(f"{e:.1e}" for e in errors)
              + ("  ok" if results[-1] else "  FAIL"), flush=True)
    topk = indexer_topk(iq.detach(), ik.detach(), iw.detach().float(), k, ratio=ratio)
    q, kv = mq[0], mk[0, :, :, 0]
    targets, outputs = [], []
    for impl in (sparse_mqa_attention, reference.sparse_mqa_attention):
        targets.append(torch.zeros(*topk.shape, device="cuda"))
        with torch.no_grad():
            outputs.append(impl(q, kv, topk, scale, Dq, prob_out=targets[-1]))
    errors = [relative_error(a, b) for a, b in zip(*outputs)] + [relative_error(*targets)]
    results.append(all(e < tol for e in errors))
    print(f"{name} sparse attention k={k}: rel.err out/lse/prob " + " ".join(f"{e:.1e}" for e in errors)
          + ("  ok" if results[-1] else "  FAIL"), flush=True)
    return all(results)


def check_dense_attention(T, *, B=1, H=DSA["H"], docs=None, dtype=torch.bfloat16, tol=2e-2):
    """The backbone's fused causal attention (cuDNN, MLA shapes: q/k 192, v 128) and its LSE against the reference."""
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k = (torch.randn(B, T, H, DSA["Dq"], generator=g, device="cuda", dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, 128, generator=g, device="cuda", dtype=dtype)
    cu = None if docs is None else torch.tensor(docs, dtype=torch.int32, device="cuda")
    scale = DSA["Dq"] ** -0.5
    out, lse = causal_attention(q, k, v, scale, cu_seqlens=cu)
    want_out, want_lse = reference.causal_attention(q.float(), k.float(), v.float(), scale, cu_seqlens=cu)
    torch.cuda.synchronize()  # surfaces the backend's asynchronous LSE check
    errors = [relative_error(out, want_out), relative_error(lse, want_lse)]
    ok = all(e < tol for e in errors)
    print(f"dense attention {dtype} B={B} T={T} H={H}{' docs' if docs else ''}: out/lse "
          + " ".join(f"{e:.1e}" for e in errors) + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def check_dense_attention_long(T=131072, *, H=DSA["H"], rows=(0, 4095, 65537, -1), tol=2e-2):
    """Past 2^31 elements of extent per tensor (DeepSeek-V3.2's 128 heads of 192 beyond 87K tokens; v, a slice of
    MLA's kv of 256 per head, beyond 64K) the fused attention runs in groups of heads, each contiguous: its out and LSE
    at a few query rows against a direct fp32 computation of those rows, and the same rows of one ungrouped cuDNN call
    for comparison (what the grouping avoids)."""
    from kernels import dense_attention
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k = (torch.randn(1, T, H, DSA["Dq"], generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, T, H, 256, generator=g, device="cuda", dtype=torch.bfloat16)[..., 128:]  # MLA: kv's v half
    scale = DSA["Dq"] ** -0.5
    out, lse = causal_attention(q, k, v, scale)
    torch.cuda.synchronize()

    def direct(t):
        scores = torch.einsum("hd,shd->hs", q[0, t].float(), k[0, :t + 1].float()) * scale
        return torch.einsum("hs,shd->hd", scores.softmax(-1), v[0, :t + 1].float()), torch.logsumexp(scores, -1)
    picked = [t % T for t in rows]
    wants = [direct(t) for t in picked]
    errors = [max(relative_error(out[0, t], w_out), relative_error(lse[0, :, t], w_lse))
              for t, (w_out, w_lse) in zip(picked, wants)]
    del out, lse
    one_out, one_lse = dense_attention._cuda_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale)
    ungrouped = [max(relative_error(one_out[0, :, t], w_out), relative_error(one_lse[0, :, t].float(), w_lse))
                 for t, (w_out, w_lse) in zip(picked, wants)]
    ok = max(errors) < tol
    print(f"dense attention bf16 T={T} H={H} (q {q.numel() / 2**31:.2f} x 2^31 elements), rows {picked}: grouped "
          f"heads max rel.err {max(errors):.1e}; one cuDNN call {max(ungrouped):.1e}" + ("  ok" if ok else "  FAIL"),
          flush=True)
    return ok


def check_offload(T=4096, layers=4, tol=2e-2):
    """The Distiller's offload of saved tensors (copies to pinned host memory on a side stream, back in backward)
    changes no gradient: a dense and a sparse forward + backward of the real-scale model with it off twice (the
    run-to-run spread of the fp32 atomics, rounded to the bf16 weights' gradients) and on."""
    _, _, distiller, ids = real_scale_run(layers, T)
    params = {n: p for n, p in distiller.named_parameters() if p.requires_grad}
    spread, errors = [], []
    for sparse in (False, True):
        grads = []
        for offload in (False, False, True):
            distiller.offload_saved = offload
            distiller(ids, sparse=sparse).loss.backward()
            grads.append({n: p.grad.clone() for n, p in params.items()})
            for p in params.values():
                p.grad = None
        spread += [relative_error(grads[1][n], grads[0][n]) for n in params]
        errors += [relative_error(grads[2][n], grads[0][n]) for n in params]
    ok = max(errors) < tol
    print(f"offloaded saved tensors, {layers} layers T={T} dense+sparse: max rel.err of {len(errors)} gradients "
          f"{max(errors):.1e} (off against off: {max(spread):.1e})" + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def check_offload_shares_an_input(T=4096, hidden=7168, heads=64):
    """One tensor saved by two layers (x, by wk through a reshaped view and by the fp32 weights_proj as an
    UpcastLinear, as an F layer's indexer saves it) is copied to the host once, and the gradients equal those
    without offload."""
    import distill.objective as objective
    from distill.upcast import UpcastLinear
    torch.manual_seed(0)
    wk = torch.nn.Linear(hidden, 128, bias=False, device="cuda", dtype=torch.bfloat16)
    weights_proj = torch.nn.Linear(hidden, heads, bias=False, device="cuda")
    UpcastLinear.convert(weights_proj)
    x = torch.randn(1, T, hidden, device="cuda", dtype=torch.bfloat16)
    grads, copies = [], []
    copy = objective._copy_to_host

    def counted(tensor, stream):
        copies.append(tensor.numel() * tensor.element_size())
        return copy(tensor, stream)
    objective._copy_to_host = counted
    try:
        for offload in (False, True):
            context = objective.PinnedOffload(torch.cuda.Stream()) if offload else contextlib.nullcontext()
            with context:
                loss = wk(x).float().square().mean() + weights_proj(x).square().mean()
            loss.backward()
            grads.append([wk.weight.grad.clone(), weights_proj.weight.grad.clone()])
            wk.weight.grad = weights_proj.weight.grad = None
    finally:
        objective._copy_to_host = copy
    errors = [relative_error(a, b) for a, b in zip(grads[1], grads[0])]
    x_copies = sum(1 for c in copies if c == x.numel() * x.element_size())
    ok = max(errors) < 1e-6 and x_copies == 1
    print(f"offload of x saved twice (T={T}): {x_copies} host cop{'y' if x_copies == 1 else 'ies'} of x, "
          f"{len(copies)} copies in all; gradients' rel.err {max(errors):.1e}" + ("  ok" if ok else "  FAIL"),
          flush=True)
    return ok


def check_block_fp8(M, N, K, *, tol=4e-3):  # the output is bf16: up to 2^-8 of the largest |y| by rounding
    """quantize_rows against its reference (the fused kernel's fp8 bytes and scales), and block_fp8_linear through
    the FP8 GEMM against the fp32 product of the same FP8 operands (the activations quantised by the reference,
    the weight dequantised); the error against the exact product of bf16 activations is printed too (what FP8
    activations cost, as in DeepSeek's own inference: about 2.5% of the output's norm on random data)."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = block_fp8.quantize_rows(x)
    q_ref, scale_ref = reference.quantize_rows(x)
    differing = (q[:M].view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
    weight, scale_inv = reference.quantize_block_fp8(torch.randn(N, K, device="cuda") * 0.02, (128, 128))
    got = block_fp8.block_fp8_linear(x, weight, scale_inv, (128, 128)).float()
    w = reference.dequantize_block_fp8(weight, scale_inv, (128, 128))
    want = reference.dequantize_block_fp8(q_ref, scale_ref, (1, 128)) @ w.T
    exact = x.float() @ w.T
    errors = [relative_error(scale[:M], scale_ref), differing, relative_error(got, want)]
    ok = errors[0] < 1e-6 and errors[1] < 1e-3 and errors[2] < tol
    print(f"block_fp8 M={M} N={N} K={K} gemm={block_fp8.uses_gemm(weight, (128, 128))}: rel.err scales "
          f"{errors[0]:.1e}, fp8 bytes differing {errors[1]:.1e}, linear {errors[2]:.1e} (against bf16 activations: "
          f"{((got - exact).norm() / exact.norm()).item():.1e} of the norm)" + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def check_quantize_rows_long(M=131072, K=18432, rows=(0, 65535, 116508, 131071)):
    """quantize_rows past 2^31 elements (DeepSeek-V3.2's dense MLP input at 128K tokens: 2.4e9), where 32-bit offsets
    wrap from row 2^31 // K on: the fp8 bytes and scales of a few rows, the last ones included, against the
    reference on those rows."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    q, scale = block_fp8.quantize_rows(x)
    torch.cuda.synchronize()
    picked = list(rows)
    q_ref, scale_ref = reference.quantize_rows(x[picked])
    differing = (q[picked].view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
    scale_error = relative_error(scale[picked], scale_ref)
    ok = differing < 1e-3 and scale_error < 1e-6
    print(f"block_fp8 quantize_rows M={M} K={K} ({M * K / 2**31:.2f} x 2^31 elements), rows {picked}: rel.err scales "
          f"{scale_error:.1e}, fp8 bytes differing {differing:.1e}" + ("  ok" if ok else "  FAIL"), flush=True)
    return ok


def main() -> int:
    print(torch.cuda.get_device_name(), flush=True)
    results = [
        check_dense_attention(4096),
        check_dense_attention(2000, B=2, H=16, docs=[0, 700, 2000, 2500, 4000]),
        check_dense_attention(777, H=8, dtype=torch.float32, tol=1e-4),
        check_topk(4096, DSA["k"]),
        check_topk(1500, 256, B=2, docs=[0, 700, 1900, 3000]),
        check_centroid_kl("dense bf16 T=1500 G=2 H=16", 1500, 2, 16, torch.bfloat16),
        check_centroid_kl("dense bf16 T=1500 G=2 H=16 full keys", 1500, 2, 16, torch.bfloat16, rope=0),
        check_centroid_kl("dense bf16 T=1500 G=2 H=16 Dq=256", 1500, 2, 16, torch.bfloat16, dq=256),  # GLM-5, HY-V4
        check_centroid_kl("dense bf16 T=1100 G=1 H=8 flash-LSE fp32 w", 1100, 1, 8, torch.bfloat16, with_lse=True,
                          fp32_w=True),
        check_centroid_kl("sparse bf16 T=2048 G=4 H=8 k=256", 2048, 4, 8, torch.bfloat16, sparse_k=256),
        check_centroid_kl("docs bf16 B=2 T=1000 G=3 H=8", 1000, 3, 8, torch.bfloat16, B=2,
                          docs=[0, 300, 1000, 1999, 2000]),
        check_centroid_kl("docs sparse fp16 B=2 T=777 G=1 H=8", 777, 1, 8, torch.float16, B=2, sparse_k=128,
                          docs=[0, 500, 1554]),
        check_centroid_kl("dense fp32 T=777 G=2 H=4", 777, 2, 4, torch.float32, tol=1e-4),
        check_sparse(3000),
        check_sparse(1500, B=2, H=20, docs=[0, 700, 1900, 3000]),
        check_sparse(777, H=16, dtype=torch.float32, tol=1e-4),
        check_compressed(2048),
        check_dense_attention_long(),
        check_offload(),
        check_offload_shares_an_input(),
        check_block_fp8(4096, 1536, 7168),
        check_block_fp8(1000, 576, 7168),     # kv_a_proj_with_mqa: rows not a whole number of 128-blocks
        check_block_fp8(77, 7168, 2048),       # a routed expert's few tokens: rows padded to 16
        check_quantize_rows_long(),
    ]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
