"""kernels.dense_attention (the backbone's fused causal attention with LSE) against the reference."""
import pytest
import torch

from kernels import reference
from kernels.dense_attention import causal_attention, document_runs, head_group_bytes, in_head_groups, memory_extent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("documents", [False, True])
def test_matches_reference_with_mla_shapes(dtype, documents):
    g = torch.Generator().manual_seed(0)
    B, T, H, Dq, Dv = 2, 37, 3, 24, 16  # v narrower than q/k, as in MLA; T not a multiple of any block
    q, k = (torch.randn(B, T, H, Dq, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=g).to(dtype)
    cu = torch.tensor([0, 5, 37, 40, 74]) if documents else None
    out, lse = causal_attention(q, k, v, 0.4, cu_seqlens=cu)
    ref_out, ref_lse = reference.causal_attention(q.float(), k.float(), v.float(), 0.4, cu_seqlens=cu)
    assert out.dtype == dtype and out.shape == (B, T, H, Dv) and lse.shape == (B, H, T) and lse.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, **tol)
    if documents:  # the first key of the second document sees only itself: its output is its value
        torch.testing.assert_close(out[0, 5].float(), v[0, 5].float(), **tol)


def test_reference_equals_direct_softmax_in_any_chunking():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 11, 2, 4, generator=g), torch.randn(1, 11, 2, 4, generator=g), torch.randn(1, 11, 2, 3)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * 0.5
    scores = scores.masked_fill(~torch.ones(11, 11, dtype=torch.bool).tril(), float("-inf"))
    for chunk in (1, 4, None):
        out, lse = reference.causal_attention(q, k, v, 0.5, chunk_size=chunk)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
        torch.testing.assert_close(out, torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v))


def test_document_runs_split_rows_at_documents_and_row_starts():
    assert document_runs(torch.tensor([0, 5, 21, 30, 42]), 2, 21) == [(0, 0, 5), (0, 5, 21), (1, 0, 9), (1, 9, 21)]
    assert document_runs(torch.tensor([0, 42]), 2, 21) == [(0, 0, 21), (1, 0, 21)]


def test_head_groups_of_wide_strided_views_are_contiguous_and_exact():
    """v sliced out of a wider kv (MLA's layout) reaches past the extent limit though it holds fewer elements:
    the heads go in groups, each call gets contiguous tensors within the limit, and the result is one call's."""
    g = torch.Generator().manual_seed(2)
    B, T, H, Dq, Dv = 1, 13, 5, 8, 6
    q, k = (torch.randn(B, T, H, Dq, generator=g) for _ in range(2))
    v = torch.randn(B, T, H, Dq + Dv, generator=g)[..., Dq:]  # [B, T, H, Dv] view of a [B, T, H, Dq + Dv] tensor
    views = [t.transpose(1, 2) for t in (q, k, v)]
    calls = []

    def fused(qh, kh, vh, scale):  # [B, h, T, D] -> (out [B, h, T, Dv], lse [B, h, T])
        calls.append([(t.is_contiguous(), t.numel()) for t in (qh, kh, vh)])
        out, lse = reference.causal_attention(qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2), scale)
        return out.transpose(1, 2), lse

    want_out, want_lse = fused(*views, 0.3)
    limit = 2 * T * Dq  # the widest view, q's, holds 5 heads: groups of 2, 2, 1
    assert v.numel() < B * T * H * Dq and v.stride(2) == Dq + Dv
    calls.clear()
    out, lse = in_head_groups(fused, *views, 0.3, max_extent=limit)
    assert len(calls) == 3 and all(contiguous and n <= limit for call in calls for contiguous, n in call)
    group, cats = 2 * T * (2 * Dq + Dv) * 4, H * T * (Dv * 4 + 4)  # one group's q, k, v; the concatenated out, lse
    assert head_group_bytes(B, T, H, Dq, Dv, Dq + Dv, 4, max_extent=limit) == group + cats
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)
    calls.clear()
    in_head_groups(fused, *views, 0.3, max_extent=B * T * H * (Dq + Dv))  # every view within: one call, no copy
    assert len(calls) == 1 and not calls[0][2][0]
    assert head_group_bytes(B, T, H, Dq, Dv, Dq + Dv, 4, max_extent=memory_extent(views[2])) == 0
