"""The plain-PyTorch centroid KL against a direct, fully materialised computation, and gradcheck."""
import pytest
import torch

from kernels.reference import centroid_kl, centroid_target, indexer_topk


def inputs(B=2, T=9, HI=3, D=4, G=3, H=2, Dq=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    iq, ik, iw = mk(B, T, HI, D), mk(B, T, D), mk(B, T, HI)
    return [t.requires_grad_() for t in (iq, ik, iw)], mk(G, B, T, H, Dq), mk(G, B, T, H, Dq)


def direct_kl(iq, ik, iw, mq, mk, scale, topk=None):
    """KL(pbar || q) from full [B, T, T] matrices, layer by layer and head by head."""
    B, T = iq.shape[:2]
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    if topk is not None:
        sel = torch.zeros(B, T, T, dtype=torch.bool)
        for b in range(B):
            for t in range(T):
                for s in topk[b, t].tolist():
                    if s >= 0:
                        sel[b, t, s] = True
        allowed &= sel
    pbar = 0
    for g in range(mq.shape[0]):
        for h in range(mq.shape[3]):
            logits = scale * mq[g, :, :, h] @ mk[g, :, :, h].transpose(1, 2)
            pbar = pbar + logits.masked_fill(~allowed, -torch.inf).softmax(-1) / (mq.shape[0] * mq.shape[3])
    logits = sum(iw[:, :, j, None] * (iq[:, :, j] @ ik.transpose(1, 2)).relu() for j in range(iq.shape[2]))
    logq = logits.masked_fill(~allowed, -torch.inf).log_softmax(-1)
    kl = torch.where(allowed, torch.xlogy(pbar, pbar) - pbar * logq.masked_fill(~allowed, 0), 0)
    return kl.sum() / (B * T)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_matches_direct_computation(sparse, chunk):
    (iq, ik, iw), mq, mk = inputs()
    topk = indexer_topk(iq.detach(), ik.detach(), iw.detach(), 4) if sparse else None
    got = centroid_kl(iq, ik, iw, mq, mk, 0.7, topk, chunk_size=chunk)
    want = direct_kl(iq, ik, iw, mq, mk, 0.7, topk)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (iq, ik, iw)), torch.autograd.grad(want, (iq, ik, iw))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(sparse):
    (iq, ik, iw), mq, mk = inputs(B=2, T=6, HI=2, D=3, G=2, H=2, Dq=3)
    topk = indexer_topk(iq.detach(), ik.detach(), iw.detach(), 3) if sparse else None
    assert torch.autograd.gradcheck(lambda a, b, c: centroid_kl(a, b, c, mq, mk, 0.5, topk, chunk_size=4),
                                    (iq, ik, iw))


def test_centroid_is_gradient_equivalent_to_all_served_layers():
    """sum_l KL(a^l || q) = G * KL(pbar || q) + const: same gradient w.r.t. the indexer."""
    (iq, ik, iw), mq, mk = inputs(G=3)
    per_layer = sum(centroid_kl(iq, ik, iw, mq[g:g + 1], mk[g:g + 1], 0.7) for g in range(3))
    centroid = 3 * centroid_kl(iq, ik, iw, mq, mk, 0.7)
    for a, b in zip(torch.autograd.grad(per_layer, (iq, ik, iw)), torch.autograd.grad(centroid, (iq, ik, iw))):
        torch.testing.assert_close(a, b)
    assert per_layer.item() > centroid.item()  # the difference is the layers' spread around the centroid


def test_bf16_inputs_accumulate_in_fp32():
    (iq, ik, iw), mq, mk = inputs(dtype=torch.float32)
    low = [t.detach().bfloat16() for t in (iq, ik, iw, mq, mk)]
    loss = centroid_kl(*low, 0.7)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, centroid_kl(*[t.float() for t in low], 0.7))


def test_topk_reference_matches_torch_topk_and_pads():
    (iq, ik, iw), _, _ = inputs(T=7)
    topk = indexer_topk(iq.detach(), ik.detach(), iw.detach(), 5)
    assert topk.shape == (2, 7, 5) and topk.dtype == torch.int32
    for t in range(7):
        valid = topk[:, t][topk[:, t] >= 0]
        assert valid.numel() == 2 * min(t + 1, 5) and int(valid.max()) <= t
        assert (topk[:, t, min(t + 1, 5):] == -1).all()


def test_centroid_target_rows_sum_to_one():
    (_, _, _), mq, mk = inputs(T=8)
    target = centroid_target(mq, mk, 0.7)
    torch.testing.assert_close(target.sum(-1), torch.ones(2, 8, dtype=target.dtype))
    assert (target.triu(1) == 0).all()


def test_shape_errors():
    (iq, ik, iw), mq, mk = inputs()
    with pytest.raises(ValueError, match="index_k"):
        centroid_kl(iq, ik[:, :-1], iw, mq, mk, 0.7)
    with pytest.raises(ValueError, match="main_q and main_k"):
        centroid_kl(iq, ik, iw, mq[..., :-1], mk, 0.7)

