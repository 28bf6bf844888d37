"""Kernels over compressed keys (ratio > 1, DeepSeek-V4's CSA entries: query t sees entry w iff w < (t + 1) // 4;
one key head broadcast to all query heads): the chunked references against a materialised computation, and the
fused top-k and centroid KL against the references under the Triton interpreter (odd lengths, one head, bf16 and
fp32)."""
import pytest
import torch

from kernels.centroid_kl import centroid_kl as fused_centroid_kl
from kernels.indexer_topk import indexer_topk as fused_topk
from kernels.reference import allowed_keys, centroid_kl, indexer_logits, indexer_topk
from tests.kernel_checks import assert_matches_reference, loss_and_grads

pytestmark = pytest.mark.slow  # the Triton kernels on the CPU interpreter


def inputs(B=2, T=23, H=1, Dq=8, HI=2, D=8, ratio=4, G=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = T // ratio
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return (make(B, T, HI, D), make(B, S, D), make(B, T, HI).abs()), make(G, B, T, H, Dq), make(G, B, S, 1, Dq)


def visible(T, S, ratio):
    return torch.arange(S)[None, :] < ((torch.arange(T) + 1) // ratio)[:, None]  # [T, S]


@pytest.mark.parametrize("H", [1, 3])
def test_reference_centroid_kl_over_compressed_entries_matches_a_materialised_kl(H):
    (iq, ik, iw), mq, mk = inputs(H=H)
    iq.requires_grad_(True)
    T, S = iq.shape[1], ik.shape[1]
    loss = centroid_kl(iq, ik, iw, mq, mk, 0.5, ratio=4, chunk_size=5)
    vis = visible(T, S, 4)
    scores = torch.einsum("gbthd,gbsd->gbhts", mq, mk[:, :, :, 0]) * 0.5
    target = scores.masked_fill(~vis, float("-inf")).softmax(-1).nan_to_num(0.0).mean(dim=(0, 2))  # [B, T, S]
    logits = indexer_logits(iq, ik, iw).masked_fill(~vis, float("-inf"))
    log_q = torch.where(vis, logits.log_softmax(-1), 0.0).nan_to_num(0.0)
    expected = (torch.xlogy(target, target) - target * log_q).sum() / (iq.shape[0] * T)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(iq.grad).all() and (iq.grad[:, :3] == 0).all()  # rows 0..2 see no entry: no loss


def test_compressed_keys_refuse_packed_documents_and_bad_shapes():
    (iq, ik, iw), mq, mk = inputs()
    with pytest.raises(ValueError, match="packed documents"):
        centroid_kl(iq, ik, iw, mq, mk, 0.5, ratio=4, cu_seqlens=torch.tensor([0, 10, 46]))
    with pytest.raises(ValueError, match="index_k"):
        centroid_kl(iq, ik, iw, mq, mk, 0.5)  # 5 entries are not 23 token keys
    with pytest.raises(ValueError, match="key ratio"):
        indexer_topk(iq, ik, iw, 2, ratio=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("k", [2, 3])
def test_fused_topk_over_compressed_entries_matches_the_reference(dtype, k):
    (iq, ik, iw), _, _ = inputs(B=1, T=29, HI=1, dtype=dtype, seed=3)
    ours, ref = fused_topk(iq, ik, iw, k, ratio=4), indexer_topk(iq, ik, iw, k, ratio=4)
    logits = indexer_logits(iq, ik, iw)
    picked = [torch.where(t >= 0, logits.gather(-1, t.clamp(min=0).long()), -torch.inf).sort(-1).values
              for t in (ours, ref)]
    torch.testing.assert_close(*picked)  # the same key sets up to ties (ReLU makes zero scores tie)
    assert torch.equal(ours >= 0, ref >= 0)
    assert (ours[:, :3] == -1).all() and (ours[:, 3, 1:] == -1).all() and (ours[:, 11:] >= 0).all()


# (B, T, H, Hk, G, ratio, dtype, main_lse, chunk_size, stage): T = 37 is neither a multiple of the 16-row CPU tile
# nor of the ratio; one key head broadcast (Hk = 1) or one per head; an odd ratio; scratch chunks of 10 rows (the
# first one's rows 0..2 see no entry); the sparse stage over the top-k entries of kernels.reference.indexer_topk.
FUSED_CASES = {
    "r4-broadcast-G2": (1, 37, 3, 1, 2, 4, torch.float32, False, None, "dense"),
    "r3-heads-lse": (1, 37, 2, 2, 1, 3, torch.float32, True, None, "dense"),
    "r4-bf16-lse-chunks": (2, 37, 1, 1, 2, 4, torch.bfloat16, True, 10, "dense"),
    "r4-sparse": (1, 37, 2, 1, 1, 4, torch.float32, False, None, "sparse"),
}


def visible_lse(mq, mk, scale, ratio):
    """The heads' natural-log LSE [G, B, H, T] of scale*q.k over the visible entries (-inf for rows without)."""
    G, B, T, H = mq.shape[:4]
    scores = torch.einsum("gbthd,gbshd->gbhts", mq.float(), mk.float().expand(-1, -1, -1, H, -1)) * scale
    vis = allowed_keys(B, T, slice(None), None, mq.device, ratio=ratio)  # [B, T, S]
    return scores.masked_fill(~vis[None, :, None], float("-inf")).logsumexp(-1)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_centroid_kl_over_compressed_entries_matches_the_reference(case):
    B, T, H, Hk, G, ratio, dtype, with_lse, chunk, stage = FUSED_CASES[case]
    g = torch.Generator().manual_seed(1)
    S = T // ratio
    make = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    index = [make(B, T, 2, 8), make(B, S, 8), 0.3 * torch.randn(B, T, 2, generator=g)]  # fp32 head weights
    mq, mk = make(G, B, T, H, 8), make(G, B, S, Hk, 8)
    lse = visible_lse(mq, mk, 0.4, ratio) if with_lse else None
    topk = indexer_topk(*index, 3, ratio=ratio) if stage == "sparse" else None
    index = [t.requires_grad_() for t in index]
    loss, grads = loss_and_grads(fused_centroid_kl, index, mq, mk, 0.4, topk, chunk, main_lse=lse, ratio=ratio)
    ref_index = [t.detach().float().requires_grad_() for t in index]
    want, want_grads = loss_and_grads(centroid_kl, ref_index, mq.float(), mk.float(), 0.4, topk, main_lse=lse,
                                      ratio=ratio)
    assert_matches_reference(index, loss, grads, want, want_grads)
    assert (grads[0][:, :ratio - 1] == 0).all() and (grads[2][:, :ratio - 1] == 0).all()  # rows seeing no entry


def test_distiller_dense_stage_on_deepseek_v4_with_the_fused_kl_equals_the_reference():
    """The fused kernels in the V4 Distiller's dense stage (main_k [G, B, S, 1, Dq] buffers, the entries' LSE, fp32
    head weights): the same group losses and indexer gradients as the references."""
    from distill.objective import Distiller
    from distill.pattern import Pattern
    from tests.distill.test_families import build_dsv4
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(2))
    results = []
    for kernel in ("reference", "triton"):
        model = build_dsv4()
        out = Distiller(model, Pattern.parse("FSF"), kernel=kernel)(x, sparse=False)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append(({f: loss.detach() for f, loss in out.group_losses.items()}, grads))
    (want_losses, want_grads), (losses, grads) = results
    assert sorted(losses) == [0, 2] and grads.keys() == want_grads.keys()
    for f in losses:
        torch.testing.assert_close(losses[f], want_losses[f], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5 * want_grads[name].abs().max())
