"""The fused Triton centroid KL (CPU interpreter) against the plain-PyTorch reference: values and gradients."""
import contextlib
from unittest import mock

import pytest
import torch

from kernels import centroid_kl_fn, indexer_topk_fn, reference
from kernels.centroid_kl import centroid_kl, index_tiles, key_pieces, tma_tiles
from kernels.reference import allowed_keys, document_starts
from kernels.tiles import tiles_override
from tests.allocations import OutputShapes
from tests.kernel_checks import assert_matches_reference, kernel_layouts, loss_and_grads

pytestmark = pytest.mark.slow  # the Triton kernels on the CPU interpreter

# (B, T, HI, D, G, H, Dq, cu_seqlens, chunk_size): T not a multiple of the 16-row CPU tile, one head,
# G = 1..4, B > 1, documents (one crossing the batch-row boundary), several scratch chunks.
SHAPES = {
    "docs": (2, 23, 2, 8, 4, 1, 24, [0, 5, 17, 30, 46], 16),
    "plain": (1, 37, 3, 8, 1, 2, 12, None, None),
    "G2": (2, 18, 1, 16, 2, 3, 8, [0, 18, 36], None),
    "G3": (1, 20, 2, 8, 3, 1, 16, [0, 9, 20], 16),
}


def make_inputs(B, T, HI, D, G, H, Dq, dtype, seed=0, w_dtype=None):
    """w_dtype: index_w's dtype (the Distiller passes fp32 head weights with bf16 q and k); default dtype."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    index = [rand(B, T, HI, D), rand(B, T, D), (0.3 * torch.randn(B, T, HI, generator=g)).to(w_dtype or dtype)]
    return [t.requires_grad_() for t in index], rand(G, B, T, H, Dq), rand(G, B, T, H, Dq)


def messy_topk(B, T, K, seed=0):
    """Random top-k lists with -1, non-causal entries and duplicates; column 0 is the row itself."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, T, (B, T, K), generator=g, dtype=torch.int32)
    idx[..., 0] = torch.arange(T, dtype=torch.int32)
    idx[..., 1] = idx[..., 2]
    return idx


def head_lse(mq, mk, scale, topk, cu):
    """main_lse [G, B, H, T] of main_q, main_k [G, B, T, H, Dq] (fp32) over each row's allowed keys."""
    G, B, T, H = mq.shape[:4]
    allowed = allowed_keys(B, T, slice(None), topk, mq.device, cu_seqlens=cu)
    scores = torch.einsum("gbthd,gbshd->gbhts", mq.float(), mk.float().expand(-1, -1, -1, H, -1)) * scale
    return scores.masked_fill(~allowed[None, :, None], -torch.inf).logsumexp(-1)


CASES = [("docs", "dense", torch.float32), ("docs", "sparse", torch.float32), ("docs", "messy", torch.float32),
         ("plain", "dense", torch.float32), ("G2", "messy", torch.float32),
         ("docs", "dense", torch.bfloat16), ("docs", "sparse", torch.bfloat16)]


@pytest.mark.parametrize("shape,stage,dtype", CASES)
def test_fused_matches_reference(shape, stage, dtype):
    B, T, HI, D, G, H, Dq, cu, chunk = SHAPES[shape]
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    index, mq, mk = make_inputs(B, T, HI, D, G, H, Dq, dtype, w_dtype=torch.float32 if stage == "sparse" else None)
    topk = None
    if stage == "sparse":
        topk = reference.indexer_topk(*[t.detach().float() for t in index], 6, cu_seqlens=cu)
    elif stage == "messy":
        topk = messy_topk(B, T, 7)
    got, got_grads = loss_and_grads(centroid_kl, index, mq, mk, 0.4, topk, chunk, cu_seqlens=cu)
    ref_index = [t.detach().float().requires_grad_() for t in index]
    want, want_grads = loss_and_grads(reference.centroid_kl, ref_index, mq.float(), mk.float(), 0.4, topk, None,
                                      cu_seqlens=cu)
    assert_matches_reference(index, got, got_grads, want, want_grads)


def test_chunk_size_is_honoured_exactly():
    """chunk_size rows per dL/dI scratch chunk even when not a multiple of the row tile (9, 9, 5 rows of 23)."""
    B, T, HI, D, G, H, Dq, cu, _ = SHAPES["docs"]
    cu = torch.tensor(cu, dtype=torch.int32)
    index, mq, mk = make_inputs(B, T, HI, D, G, H, Dq, torch.float32, seed=3)
    topk = messy_topk(B, T, 7, seed=3)
    with OutputShapes() as shapes:
        got, got_grads = loss_and_grads(centroid_kl, index, mq, mk, 0.4, topk, 9, cu_seqlens=cu)
    assert {s for s in shapes.seen if len(s) == 3 and s[0] == B and s[2] == T} == {(B, 9, T)}  # the scratch
    want, want_grads = loss_and_grads(reference.centroid_kl, index, mq, mk, 0.4, topk, None, cu_seqlens=cu)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_tma_descriptors_only_where_they_read_the_right_tiles():
    """Descriptors for bf16/fp16 main q and k that flatten to [G*B*T, token row] (one key head included) with column
    pieces that make up Dq, and for the indexer's q, k and scratch alike; pointers otherwise."""
    def tma(mq, mk, enabled=True, dq=None):
        da, db = {24: (16, 8), 20: (16, 4), 8: (8, 0)}[dq or mq.shape[-1]]
        return tma_tiles(mq, mk, mk[..., da:] if db else mk, 8, 32, da, db, enabled)["TMA"]

    mq = torch.zeros(2, 3, 17, 4, 24, dtype=torch.bfloat16)
    assert tma(mq, mq) and tma(mq, torch.zeros(2, 3, 17, 1, 24, dtype=torch.bfloat16).expand(-1, -1, -1, 4, -1))
    assert tma(mq.half(), mq.half()) and tma(mq[..., :8], mq[..., :8], dq=8)  # heads inside a wider token row
    assert not tma(mq, mq, enabled=False) and not tma(mq.float(), mq.float())
    assert not tma(mq[..., :20], mq[..., :20])  # a 4-column piece: narrower than 16 bytes
    assert not tma(mq.transpose(2, 3), mq) and not tma(mq, mq[:, :, ::2])  # heads outside rows; uneven tokens

    iq, ik = torch.zeros(2, 20, 3, 8, dtype=torch.bfloat16), torch.zeros(2, 20, 8, dtype=torch.bfloat16)
    assert index_tiles(iq, ik, torch.empty(2, 16, 20), 16, 16, True)["TMA"]
    assert not index_tiles(iq, ik, torch.empty(2, 16, 18), 16, 16, True)["TMA"]  # scratch rows of 72 bytes
    assert not index_tiles(iq[..., :6], ik[..., :6], torch.empty(2, 16, 20), 16, 16, True)["TMA"]  # D = 6
    assert not index_tiles(iq.float(), ik.float(), torch.empty(2, 16, 20), 16, 16, True)["TMA"]


@pytest.mark.parametrize("tma", [True, False])
def test_tma_and_pointer_loads_match_the_reference(tma):
    """bf16 inputs through TMA descriptors or pointers (Tiles.tma), main and indexer kernels alike, with one key
    head broadcast, B = 2, documents, G = 2, scratch chunks and T not a multiple of the tiles (the descriptors read
    rows past T and past a chunk from the next batch row, layer or chunk row): values and gradients as the
    reference's, main LSE computed and given."""
    with tiles_override("cpu", tma=tma):
        B, T, HI, D, G, H, Dq, chunk = 2, 28, 2, 8, 2, 3, 24, 16
        cu = torch.tensor([0, 5, 17, 30, 56], dtype=torch.int32)
        index, mq, mk = make_inputs(B, T, HI, D, G, H, Dq, torch.bfloat16, seed=4)
        mk = mk[:, :, :, :1].clone()
        heads = mk.expand(-1, -1, -1, H, -1)
        assert tma_tiles(mq, heads, heads[..., 16:], 8, 32, 16, 8, True)["TMA"]
        assert index_tiles(*index[:2], torch.empty(B, chunk, T), 16, 16, True)["TMA"]
        lse = head_lse(mq, mk, 0.4, None, cu)
        for main_lse in (None, lse):
            got, got_grads = loss_and_grads(centroid_kl, index, mq, mk, 0.4, None, chunk, cu_seqlens=cu,
                                            main_lse=main_lse)
            ref_index = [t.detach().float().requires_grad_() for t in index]
            want, want_grads = loss_and_grads(reference.centroid_kl, ref_index, mq.float(), mk.float(), 0.4, None, None,
                                              cu_seqlens=cu, main_lse=main_lse)
            assert_matches_reference(index, got, got_grads, want, want_grads)


@pytest.mark.parametrize("dtype,tma,stage", [(torch.float32, False, "dense"), (torch.float32, False, "messy"),
                                             (torch.bfloat16, True, "dense"), (torch.bfloat16, False, "dense"),
                                             (torch.bfloat16, True, "messy")])
def test_shared_rope_keys_match_the_reference(dtype, tma, stage):
    """main_k_rope (MLA's rope key columns, one copy for all heads, read once per layer and tile): values and
    gradients as the reference's on every head's full key cat(nope_h, rope), with G = 2 (each layer its own rope),
    B = 2, documents, scratch chunks, T not a multiple of the tiles, through TMA and pointers, main LSE computed and
    given; and a nope width that is not a power of two (the keys joined before the kernels)."""
    with tiles_override("cpu", tma=tma):
        B, T, HI, D, G, H, chunk = 2, 23, 2, 8, 2, 3, 16
        cu = torch.tensor([0, 5, 17, 30, 46], dtype=torch.int32)
        topk = messy_topk(B, T, 7, seed=5) if stage == "messy" else None
        for nope, rope in ((16, 8), (12, 4)):
            index, mq, mk = make_inputs(B, T, HI, D, G, H, nope + rope, dtype, seed=5)
            mk_rope = mk[:, :, :, :1, nope:].contiguous()
            mk = mk[..., :nope].contiguous()
            full_k = torch.cat([mk, mk_rope.expand(-1, -1, -1, H, -1)], dim=-1).float()
            assert key_pieces(mk, mk_rope, H, 1)["B_SHARED"] == (nope == 16)
            lse = head_lse(mq, full_k, 0.4, topk, cu)
            for main_lse in (None, lse):
                got, got_grads = loss_and_grads(centroid_kl, index, mq, mk, 0.4, topk, chunk, cu_seqlens=cu,
                                                main_lse=main_lse, main_k_rope=mk_rope)
                ref_index = [t.detach().float().requires_grad_() for t in index]
                want, want_grads = loss_and_grads(reference.centroid_kl, ref_index, mq.float(), full_k, 0.4, topk, None,
                                                  cu_seqlens=cu, main_lse=main_lse)
                assert_matches_reference(index, got, got_grads, want, want_grads)
        with pytest.raises(ValueError, match="main_k_rope"):
            centroid_kl(*index, mq, mk, 0.4, main_k_rope=mk_rope.expand(-1, -1, -1, H, -1))
        with pytest.raises(ValueError, match="Dq-4"):
            centroid_kl(*index, mq, mk[..., :8], 0.4, main_k_rope=mk_rope)
        with pytest.raises(ValueError, match="main_k_rope"):  # one dtype for all
            centroid_kl(*index, mq, mk, 0.4, main_k_rope=mk_rope.half())


@pytest.mark.parametrize("sparse", [False, True])
def test_main_lse_is_used_and_consistent(sparse):
    B, T, HI, D, G, H, Dq, cu, chunk = SHAPES["G3"]
    cu = torch.tensor(cu, dtype=torch.int32)
    index, mq, mk = make_inputs(B, T, HI, D, G, H, Dq, torch.float32, seed=1)
    topk = messy_topk(B, T, 5, seed=1) if sparse else None
    lse = head_lse(mq, mk, 0.4, topk, cu)
    with torch.no_grad():
        plain = centroid_kl(*index, mq, mk, 0.4, topk, chunk, cu_seqlens=cu)
        given = centroid_kl(*index, mq, mk, 0.4, topk, chunk, cu_seqlens=cu, main_lse=lse)
        shifted = centroid_kl(*index, mq, mk, 0.4, topk, chunk, cu_seqlens=cu, main_lse=lse + 0.5)
        ref_given = reference.centroid_kl(*index, mq, mk, 0.4, topk, cu_seqlens=cu, main_lse=lse)
    torch.testing.assert_close(given, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(given, ref_given, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(shifted, plain)  # the given LSE really replaces the computed one


def test_no_grad_loss_and_grad_output_scaling():
    B, T, HI, D, G, H, Dq, cu, chunk = SHAPES["G2"]
    index, mq, mk = make_inputs(B, T, HI, D, G, H, Dq, torch.float32, seed=2)
    loss = centroid_kl(*index, mq, mk, 0.7)
    once = torch.autograd.grad(loss, index, retain_graph=True)
    thrice = torch.autograd.grad(3.0 * loss, index)
    for a, b in zip(once, thrice):
        torch.testing.assert_close(3.0 * a, b)
    with torch.no_grad():
        torch.testing.assert_close(centroid_kl(*index, mq, mk, 0.7), loss.detach())


def test_reference_varlen_and_lse_paths_gradcheck():
    B, T, HI, D, G, H, Dq = 2, 7, 2, 3, 2, 2, 4
    index, mq, mk = make_inputs(B, T, HI, D, G, H, Dq, torch.float64, seed=4)
    cu = torch.tensor([0, 3, 10, 14])
    topk = messy_topk(B, T, 3, seed=4)
    allowed = allowed_keys(B, T, slice(None), topk, mq.device, cu_seqlens=cu)
    lse = (torch.einsum("gbthd,gbshd->gbhts", mq, mk) * 0.5).masked_fill(~allowed[None, :, None], -torch.inf)
    lse = lse.logsumexp(-1)
    assert torch.autograd.gradcheck(
        lambda a, b, c: reference.centroid_kl(a, b, c, mq, mk, 0.5, None, 3, cu_seqlens=cu), index, fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: reference.centroid_kl(a, b, c, mq, mk, 0.5, topk, 4, cu_seqlens=cu, main_lse=lse), index,
        fast_mode=True)


def test_document_starts_and_bad_cu_seqlens():
    starts = document_starts(torch.tensor([0, 2, 7, 10]), 2, 5, torch.device("cpu"))
    assert starts.tolist() == [[0, 0, 2, 2, 2], [0, 0, 2, 2, 2]]  # doc [2, 7) is cut at the row boundary 5
    keys = allowed_keys(1, 4, slice(None), None, torch.device("cpu"), cu_seqlens=torch.tensor([0, 1, 4]))
    assert keys[0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]]
    for bad in ([0, 3], [1, 10], [0, 6, 4, 10]):  # checked without a host sync: torch._assert_async's error
        with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing offsets from 0 to B\\*T = 10"):
            document_starts(torch.tensor(bad), 2, 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="cu_seqlens must be offsets"):
        document_starts(torch.tensor([[0, 10]]), 2, 5, torch.device("cpu"))


def test_bad_inputs_and_dispatch(monkeypatch):
    index, mq, mk = make_inputs(1, 5, 1, 4, 1, 1, 4, torch.float32)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        centroid_kl(index[0].double(), index[1].double(), index[2].double(), mq.double(), mk.double(), 1.0)
    with pytest.raises(ValueError, match="share one dtype"):
        centroid_kl(*index, mq.half(), mk.half(), 1.0)
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        centroid_kl(index[0], index[1], index[2].double(), mq, mk, 1.0)
    with pytest.raises(ValueError, match="main_lse"):
        centroid_kl(*index, mq, mk, 1.0, main_lse=torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="not one of"):
        centroid_kl_fn("fast", "cpu")
    assert centroid_kl_fn("auto", "cpu") is reference.centroid_kl
    assert indexer_topk_fn("reference", "cpu") is reference.indexer_topk
    assert centroid_kl_fn("triton", "cpu") is centroid_kl
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        indexer_topk_fn("triton", "cpu")


def test_centroid_head_loop_compiles_for_hopper():
    """`bench.kernel_layouts --centroid` compiles the GPU centroid kernel for sm_90 without a GPU (what
    docs/BENCHMARKS.md reads its head-loop schedule from): at DeepSeek-V3.2's Dq = 192 each head is two score dots
    (128 + 64 columns) then its exps, in one loop over the heads. With the rope columns given once (main_k_rope)
    the loop copies the head's two q pieces and its nope keys, not the shared rope keys: three tiles, not four."""
    def head_loop(*args):
        loop = kernel_layouts("--centroid", *args).split("head loop:", 1)[1].splitlines()[0].split(", ")
        assert [step for step in loop if step in ("dot", "exp")] == ["dot", "dot", "exp"], loop
        return loop.count("copy")

    assert (head_loop(), head_loop("--expanded-keys")) == (3, 4)


def test_distiller_keeps_one_copy_of_the_rope_keys():
    """With the fused kernels the MLA dense stage keeps each served layer's rope key columns once (main_k_rope [G, B,
    T, 1, rope]) beside the heads' nope columns (the references, which would join them back, get every head's full
    key), and gets the same group losses and indexer gradients as with every head's full key (the capture told the
    family shares no key columns)."""
    from distill.adapters.mla import MlaForms
    from distill.objective import Distiller, GroupLosses
    from distill.pattern import Pattern
    from tests.conftest import tiny
    x = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(7))
    kept, results = [], {}
    group_done = GroupLosses.group_done

    def record(self, f):
        group = self.dense.get(f)
        kept.append(None if group is None else (group["main_k"].shape[-1], group["main_k_rope"] is not None and
                                                tuple(group["main_k_rope"].shape)))
        group_done(self, f)

    for kernel in ("reference", "triton"):
        for expanded in (False, True):
            kept.clear()
            model = tiny("tiny_dsv32")
            with mock.patch.object(GroupLosses, "group_done", record), \
                    mock.patch.object(MlaForms, "shared_keys", None) if expanded else contextlib.nullcontext():
                out = Distiller(model, Pattern.parse("FSFS"), kernel=kernel)(x, sparse=False)
            out.loss.backward()
            apart = kernel == "triton" and not expanded
            assert kept == ([(16, (2, 1, 21, 1, 8))] * 2 if apart else [(24, False)] * 2)
            results[kernel, expanded] = ({f: loss.detach() for f, loss in out.group_losses.items()},
                                         {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    want_losses, want_grads = results["reference", True]
    for losses, grads in results.values():
        assert losses.keys() == want_losses.keys() == {0, 2} and grads.keys() == want_grads.keys()
        for f in losses:
            torch.testing.assert_close(losses[f], want_losses[f], rtol=1e-5, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-5 * want_grads[name].abs().max())


def test_keys_stay_whole_where_the_kernels_would_join_them():
    """The capture keeps the rope keys apart only where centroid_kl reads them apart (`kernels.shared_keys_apart`):
    the fused kernels with power-of-two widths of at least the device's smallest dot; elsewhere (a 12-wide nope, as
    GLM-5's 192; the references) a split would only add the kernels' joined copy to the buffers."""
    from omegaconf import OmegaConf

    from distill.objective import Distiller, GroupLosses
    from distill.pattern import Pattern
    from kernels import shared_keys_apart
    from tests.conftest import ROOT
    from train.model import build_model
    assert shared_keys_apart("triton", "cpu", 16, 8) and shared_keys_apart("triton", "cuda", 128, 64)
    assert not shared_keys_apart("reference", "cpu", 16, 8) and not shared_keys_apart("auto", "cpu", 16, 8)
    assert not shared_keys_apart("triton", "cuda", 192, 64) and not shared_keys_apart("triton", "cuda", 16, 8)
    assert not shared_keys_apart("triton", "cpu", 12, 8)
    cfg = OmegaConf.load(f"{ROOT}/conf/model/tiny_dsv32.yaml")
    cfg.config.qk_nope_head_dim = 12
    kept = []
    group_done = GroupLosses.group_done

    def record(self, f):
        kept.append((self.dense[f]["main_k"].shape[-1], self.dense[f]["main_k_rope"]))
        group_done(self, f)

    x = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(8))
    with mock.patch.object(GroupLosses, "group_done", record):
        Distiller(build_model(cfg), Pattern.parse("FSFS"), kernel="triton")(x, sparse=False)
    assert kept == [(20, None)] * 2
