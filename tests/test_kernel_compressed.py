"""Kernels over compressed keys (ratio > 1, DeepSeek-V4's CSA entries: query t sees entry w iff w < (t + 1) // 4;
one key head broadcast to all query heads): the chunked references against a materialised computation, and the
fused top-k against the reference under the Triton interpreter (odd lengths, one head, bf16 and fp32)."""
import pytest
import torch

from kernels import enable_cpu_interpreter

enable_cpu_interpreter()  # TRITON_INTERPRET=1 (set before the kernel modules are imported or reloaded)

from kernels.indexer_topk import indexer_topk as fused_topk  # noqa: E402
from kernels.reference import centroid_kl, indexer_logits, indexer_topk  # noqa: E402


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
