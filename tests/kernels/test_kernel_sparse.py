"""The sparse-stage kernels (CPU interpreter) against their plain-PyTorch references, and the references against
materialised T x T computations: sparse MQA attention (out, lse, prob_out) and sparse centroid KL (loss and the
gradients of index_q, index_k, index_w); neither path builds a T x T tensor."""
import json

import pytest
import torch

from kernels import reference, sparse_attention_fn, sparse_centroid_kl_fn
from kernels.reference import allowed_keys
from kernels.sparse_attention import sparse_mqa_attention
from kernels.sparse_centroid_kl import sparse_centroid_kl
from kernels.tiles import tiles_override
from tests.allocations import OutputShapes
from tests.kernel_checks import assert_matches_reference, kernel_layouts, loss_and_grads

pytestmark = pytest.mark.slow  # the Triton kernels on the CPU interpreter


def topk_lists(kind, B, T, K, cu, seed):
    """Int32 [B, T, K] of distinct entries. 'indexer': an indexer's top-k (early rows have fewer than K keys, then
    -1). 'random': random keys (many non-causal or in another document), a fifth -1, rows 3 and T-1 all -1."""
    g = torch.Generator().manual_seed(seed)
    if kind == "indexer":
        return reference.indexer_topk(torch.randn(B, T, 2, 4, generator=g), torch.randn(B, T, 4, generator=g),
                                      torch.rand(B, T, 2, generator=g), K, cu_seqlens=cu)
    idx = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(B * T)]).view(B, T, K).int()
    idx[torch.rand(B, T, K, generator=g) < 0.2] = -1
    idx[:, [3, T - 1]] = -1
    return idx


def dense_attention(q, kv, topk, scale, v_dim, cu):
    """(out, lse, head-averaged probabilities at the top-k entries) from the materialised [B, H, T, T] scores."""
    B, T = q.shape[:2]
    allowed = allowed_keys(B, T, slice(None), topk, q.device, cu_seqlens=cu)
    scores = torch.einsum("bthd,bsd->bhts", q.double(), kv.double()) * scale
    scores = scores.masked_fill(~allowed[:, None], -torch.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num()  # rows without keys: 0
    out = torch.einsum("bhts,bsv->bthv", probs, kv[..., :v_dim].double())
    keys = topk.clamp(min=0).long()
    valid = (topk >= 0) & allowed.gather(-1, keys)
    return out, scores.logsumexp(-1), torch.where(valid, probs.mean(1).gather(-1, keys), 0.0)


def sparse_target(topk, cu, seed, G=2, H=2, Dk=6):
    """The centroid of G random layers' sparse attention at the top-k entries ([B, T, K] fp32, accumulated with
    prob_out as the Distiller does) and the layers' q [G, B, T, H, Dk], kv [G, B, T, Dk]."""
    B, T, K = topk.shape
    g = torch.Generator().manual_seed(seed)
    q, kv = torch.randn(G, B, T, H, Dk, generator=g), torch.randn(G, B, T, Dk, generator=g)
    target = torch.zeros(B, T, K)
    for layer in range(G):
        reference.sparse_mqa_attention(q[layer], kv[layer], topk, 0.5, Dk, prob_out=target, prob_weight=1 / G,
                                       cu_seqlens=cu)
    return target, q, kv


def index_inputs(B, T, HI, D, dtype, seed, w_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    index = [torch.randn(B, T, HI, D, generator=g).to(dtype), torch.randn(B, T, D, generator=g).to(dtype),
             (0.5 * torch.randn(B, T, HI, generator=g)).to(w_dtype)]
    return [t.requires_grad_() for t in index]


# (B, T, H, Dk, v_dim, K, top-k lists, cu_seqlens, dtype): T not a multiple of the CPU key block, K > t on early
# rows, rows without keys, one head and several head blocks, documents (one crossing the batch-row boundary),
# v_dim the first power-of-two piece of Dk (the key tile is the value tile) or not.
ATTENTION = [(1, 37, 3, 24, 16, 5, "indexer", None, torch.float32),
             (2, 37, 1, 20, 10, 7, "random", [0, 20, 74], torch.float32),
             (1, 37, 2, 24, 16, 5, "random", [0, 15, 37], torch.bfloat16)]


@pytest.mark.parametrize("B,T,H,Dk,v_dim,K,lists,cu,dtype", ATTENTION)
def test_sparse_attention_matches_reference_and_dense(B, T, H, Dk, v_dim, K, lists, cu, dtype, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4000)  # the reference in several row chunks
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    g = torch.Generator().manual_seed(1)
    q, kv = torch.randn(B, T, H, Dk, generator=g).to(dtype), torch.randn(B, T, Dk, generator=g).to(dtype)
    topk = topk_lists(lists, B, T, K, cu, seed=T)
    prior = torch.rand(B, T, K, generator=g)  # prob_out adds to what is there
    want_out, want_lse, want_probs = dense_attention(q, kv, topk, 0.3, v_dim, cu)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # bf16 out
    # the fused kernel keeps p = exp2(s - running max) in an fp16 scratch for 16-bit inputs: 2^-11 relative
    prob_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-5)
    for fn in (reference.sparse_mqa_attention, sparse_mqa_attention):
        probs = prior.clone()
        out, lse = fn(q, kv, topk, 0.3, v_dim, prob_out=probs, prob_weight=0.25, cu_seqlens=cu)
        assert out.dtype == dtype and out.shape == (B, T, H, v_dim)
        assert lse.dtype == torch.float32 and lse.shape == (B, H, T)
        torch.testing.assert_close(out.double(), want_out, **tol)
        torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(probs.double(), prior.double() + 0.25 * want_probs, **prob_tol)
    if lists == "random":
        assert bool(lse[:, :, [3, T - 1]].isneginf().all()) and not bool(out[:, [3, T - 1]].any())


# (B, T, HI, D, K, top-k lists, cu_seqlens, dtype): one indexer head, D not a power of two, bf16 q and k with fp32
# head weights (as the Distiller passes them), rows without entries.
KL = [(1, 37, 1, 8, 5, "indexer", None, torch.float32),
      (1, 37, 3, 12, 7, "random", [0, 20, 37], torch.float32),
      (1, 37, 2, 16, 5, "random", [0, 15, 37], torch.bfloat16)]


@pytest.mark.parametrize("B,T,HI,D,K,lists,cu,dtype", KL)
def test_sparse_centroid_kl_matches_reference(B, T, HI, D, K, lists, cu, dtype):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    topk = topk_lists(lists, B, T, K, cu, seed=T)
    target, _, _ = sparse_target(topk, cu, seed=2)
    index = index_inputs(B, T, HI, D, dtype, seed=3)
    got, got_grads = loss_and_grads(sparse_centroid_kl, index, target, topk, cu_seqlens=cu)
    ref_index = [t.detach().float().requires_grad_() for t in index]
    want, want_grads = loss_and_grads(reference.sparse_centroid_kl, ref_index, target, topk, cu_seqlens=cu)
    assert got.shape == ()
    assert_matches_reference(index, got, got_grads, want, want_grads)


def test_sparse_centroid_kl_matches_the_dense_tiles_path(monkeypatch):
    """With the target built from main_q/main_k by the sparse attention's probabilities, the sparse loss and its
    gradients are centroid_kl's sparse stage over [B, T, T] tiles (MQA: main_k is kv repeated for every head)."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 500)  # several row chunks in every reference
    B, T, HI, D, K, H = 2, 19, 2, 8, 6, 2
    cu = torch.tensor([0, 7, 38], dtype=torch.int32)
    topk = topk_lists("indexer", B, T, K, cu, seed=5)  # every row has a key: the dense path needs one
    target, q, kv = sparse_target(topk, cu, seed=6, H=H)
    index = index_inputs(B, T, HI, D, torch.float32, seed=7)
    sparse, sparse_grads = loss_and_grads(reference.sparse_centroid_kl, index, target, topk, cu_seqlens=cu)
    main_k = kv[:, :, :, None, :].expand(-1, -1, -1, H, -1)
    dense, dense_grads = loss_and_grads(reference.centroid_kl, index, q, main_k, 0.5, topk, cu_seqlens=cu)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_reference_sparse_centroid_kl_gradcheck(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 60)  # chunks of 2 rows
    B, T, K = 1, 7, 3
    topk = topk_lists("random", B, T, K, None, seed=8)
    target = torch.rand(B, T, K, dtype=torch.float64)
    index = index_inputs(B, T, 2, 3, torch.float64, seed=9, w_dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: reference.sparse_centroid_kl(a, b, c, target, topk), index,
                                    fast_mode=True)


def test_grad_output_scaling_and_no_grad():
    B, T, K = 1, 9, 3
    topk = topk_lists("random", B, T, K, None, seed=10)
    target, _, _ = sparse_target(topk, None, seed=11)
    index = index_inputs(B, T, 2, 4, torch.float32, seed=12)
    loss = sparse_centroid_kl(*index, target, topk)
    once = torch.autograd.grad(loss, index, retain_graph=True)
    thrice = torch.autograd.grad(3.0 * loss, index)
    for a, b in zip(once, thrice):
        torch.testing.assert_close(3.0 * a, b)
    with torch.no_grad():
        torch.testing.assert_close(sparse_centroid_kl(*index, target, topk), loss.detach())


@pytest.mark.parametrize("split_scores", [0, 1])
def test_sparse_attention_without_prob_out(split_scores):
    with tiles_override("cpu", sparse_split_scores=split_scores):  # both layouts of the score tile
        B, T, H, Dk, K = 1, 9, 3, 8, 3
        g = torch.Generator().manual_seed(13)
        q, kv = torch.randn(B, T, H, Dk, generator=g), torch.randn(B, T, Dk, generator=g)
        topk = topk_lists("random", B, T, K, None, seed=13)
        with torch.no_grad():
            for got, want in zip(sparse_mqa_attention(q, kv, topk, 0.5, 8),
                                 reference.sparse_mqa_attention(q, kv, topk, 0.5, 8)):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,T,K", [("reference", 512, 4), ("triton", 64, 2)])  # the interpreter is slow
def test_no_t_by_t_tensor(kind, T, K):
    """T*T dwarfs T*K*width: no op may produce a tensor of T x T fp32 values, or anything near it."""
    B, H, Dk, HI, D = 1, 1, 2, 1, 2
    cu = torch.tensor([0, T // 3, T], dtype=torch.int32)
    g = torch.Generator().manual_seed(14)
    q, kv = torch.randn(B, T, H, Dk, generator=g), torch.randn(B, T, Dk, generator=g)
    topk = torch.stack([torch.randperm(T, generator=g)[:K] for _ in range(T)])[None].int()
    topk[..., 0] = torch.arange(T)
    index = index_inputs(B, T, HI, D, torch.float32, seed=15)
    with OutputShapes() as shapes:
        target = torch.zeros(B, T, K)
        sparse_attention_fn(kind, "cpu")(q, kv, topk, 0.5, Dk, prob_out=target, cu_seqlens=cu)
        loss = sparse_centroid_kl_fn(kind, "cpu")(*index, target, topk, cu_seqlens=cu)
        grads = torch.autograd.grad(loss, index)
    assert all(bool(gr.any()) for gr in grads)  # the backward really ran
    assert shapes.largest <= 4 * T * T // 16  # bytes: a sixteenth of a T x T fp32 matrix


def test_dispatch_and_bad_inputs():
    assert sparse_attention_fn("auto", "cpu") is reference.sparse_mqa_attention
    assert sparse_attention_fn("triton", "cpu") is sparse_mqa_attention
    assert sparse_centroid_kl_fn("reference", "cpu") is reference.sparse_centroid_kl
    assert sparse_centroid_kl_fn("triton", "cpu") is sparse_centroid_kl
    q, kv, topk = torch.zeros(1, 5, 2, 8), torch.zeros(1, 5, 8), torch.zeros(1, 5, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="v_dim"):
        sparse_mqa_attention(q, kv, topk, 1.0, 9)
    with pytest.raises(ValueError, match="S <= T keys"):  # fewer keys than tokens are compressed entries; more are not
        reference.sparse_mqa_attention(q, torch.zeros(1, 6, 8), topk, 1.0, 8)
    with pytest.raises(ValueError, match="prob_out"):
        sparse_mqa_attention(q, kv, topk, 1.0, 8, prob_out=torch.zeros(1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one dtype"):
        sparse_mqa_attention(q.double(), kv.double(), topk, 1.0, 8)
    index = index_inputs(1, 5, 2, 8, torch.float32, seed=16)
    with pytest.raises(ValueError, match="target"):
        sparse_centroid_kl(*index, torch.zeros(1, 5, 4), topk)
    with pytest.raises(ValueError, match="index_k"):
        reference.sparse_centroid_kl(index[0], torch.zeros(1, 6, 8), index[2], torch.zeros(1, 5, 3), topk)


def test_score_tile_split_between_warpgroups_on_hopper():
    """The layout the GPU compiler gives the sparse attention's dots, compiled for sm_90 without a GPU (in a process
    without the interpreter): with the split, both score dots ([64 heads, 64 keys]) put the two warpgroups side by
    side on the keys ([4, 2]); without it, Triton's chained-dot rule stacks all 8 warps on the 64 rows ([8, 1]), so
    both warpgroups compute the whole tile. The P.V dot splits the value columns either way."""
    layouts = json.loads(kernel_layouts("--json").splitlines()[-1])
    assert layouts["split"] == [{"shape": [64, 64], "warps": [4, 2]}] * 2 + [{"shape": [64, 512], "warps": [4, 2]}]
    assert [dot["warps"] for dot in layouts["unsplit"][:2]] == [[8, 1]] * 2
