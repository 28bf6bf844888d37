"""The fused Triton indexer top-k (CPU interpreter) selects the reference's key sets, up to ties."""
import pytest
import torch

from kernels import indexer_topk_fn, reference
from kernels.indexer_topk import indexer_topk
from kernels.reference import allowed_keys

pytestmark = pytest.mark.slow  # the Triton kernels on the CPU interpreter


def selected_scores(indices, logits):
    """Each row's selected logits, sorted (-inf for -1 slots): equal for two selections equal up to ties."""
    picked = logits.gather(-1, indices.clamp(min=0).long())
    return torch.where(indices >= 0, picked, -torch.inf).sort(-1).values


def check(iq, ik, iw, k, cu=None):
    B, T = iq.shape[:2]
    got = indexer_topk(iq, ik, iw, k, cu_seqlens=cu)
    assert got.dtype == torch.int32 and got.shape == (B, T, k)
    allowed = allowed_keys(B, T, slice(None), None, iq.device, cu_seqlens=cu)
    assert torch.equal((got >= 0).sum(-1), allowed.sum(-1).clamp(max=k))  # min(k, #keys) valid entries
    assert bool(allowed.gather(-1, got.clamp(min=0).long())[got >= 0].all())  # causal, in-document
    valid = got.sort(-1).values
    assert not bool(((valid[..., 1:] == valid[..., :-1]) & (valid[..., 1:] >= 0)).any())  # no duplicates
    want = reference.indexer_topk(iq.float(), ik.float(), iw, k, cu_seqlens=cu)
    logits = reference.indexer_logits(iq.float(), ik.float(), iw)
    torch.testing.assert_close(selected_scores(got, logits), selected_scores(want, logits), rtol=1e-5, atol=1e-5)


# (B, T, HI, D, k, cu_seqlens, dtype), on the interpreter's tiles (8 keys per tile, 2 query rows per block,
# 32 keys per selection chunk): T odd and past a chunk, one head, k not a power of two, k = 1, k > T,
# documents (one spanning two batch rows) in bf16.
CASES = [(1, 37, 3, 8, 6, None, torch.float32),
         (2, 11, 1, 16, 3, [0, 4, 15, 22], torch.bfloat16),
         (1, 9, 2, 8, 1, None, torch.bfloat16),
         (1, 6, 2, 8, 8, None, torch.float32)]


@pytest.mark.parametrize("B,T,HI,D,k,cu,dtype", CASES)
def test_fused_topk_selects_the_reference_sets(B, T, HI, D, k, cu, dtype):
    g = torch.Generator().manual_seed(T)
    iq, ik = torch.randn(B, T, HI, D, generator=g).to(dtype), torch.randn(B, T, D, generator=g).to(dtype)
    iw = torch.randn(B, T, HI, generator=g)  # fp32 head weights, as the Distiller passes them
    check(iq, ik, iw, k, None if cu is None else torch.tensor(cu, dtype=torch.int32))


def test_fused_topk_with_tied_scores():
    """Small integer inputs: many equal scores, at the threshold too (any of the tied keys will do)."""
    g = torch.Generator().manual_seed(0)
    iq = torch.randint(-1, 2, (1, 16, 2, 4), generator=g).float()
    ik = torch.randint(-1, 2, (1, 16, 4), generator=g).float()
    check(iq, ik, torch.ones(1, 16, 2), 5)


def test_bad_k_and_dispatch():
    x = torch.zeros(1, 4, 1, 4)
    with pytest.raises(ValueError, match="k >= 1"):
        indexer_topk(x, x[:, :, 0], x[..., 0], 0)
    with pytest.raises(ValueError, match="expected index_q"):
        indexer_topk(x, x[:, :3, 0], x[..., 0], 2)
    assert indexer_topk_fn("auto", "cpu") is reference.indexer_topk
    assert indexer_topk_fn("triton", "cpu") is indexer_topk
