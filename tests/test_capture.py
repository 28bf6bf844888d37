"""Capture, the differentiable indexer forward and the Distiller on tiny GlmMoeDsa / DeepseekV32 models."""
import copy
from unittest import mock

import pytest
import torch

from distill.capture import capture
from distill.indexer import indexer_projections, indexer_scores
from distill.model import NotDSAModelError, SharedIndexer, apply_pattern, dsa_attentions, rope_style
from distill.objective import Distiller
from distill.pattern import Pattern, PatternError
from tests.conftest import tiny


@pytest.fixture(scope="module", params=["tiny_glm", "tiny_dsv32"])
def model(request):
    return tiny(request.param)


def test_indexer_forward_reproduces_backbone_logits_and_topk_exactly(model):
    x = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    seen = {}
    real_topk = torch.Tensor.topk

    def spy(self, k, *args, **kwargs):  # the backbone indexer's last call: topk over its [B, T, T] logits
        seen.setdefault("logits", []).append(self.clone())
        return real_topk(self, k, *args, **kwargs)

    with capture(model, sparse=True) as record, torch.no_grad(), mock.patch.object(torch.Tensor, "topk", spy):
        model(x)
    logits = [l for l in seen["logits"] if l.shape == (2, 37, 37)]
    for i, f in enumerate(sorted(record.indexer_inputs)):
        indexer = dsa_attentions(model)[f].indexer
        q, k, w = indexer_projections(indexer, record.indexer_inputs[f], rope_style(model))
        ours = indexer_scores(q, k, w, indexer.softmax_scale)
        assert torch.equal(ours, logits[i]), f"layer {f} logits differ"
        kk = indexer.index_topk
        topk = ours.topk(kk, dim=-1).indices
        valid = record.topk[f] >= 0
        assert torch.equal(topk.to(torch.int32)[valid], record.topk[f][valid])
        assert (record.topk[f][:, 5, 6:] == -1).all()  # row 5 has 6 causal keys


def test_capture_records_mla_q_k_and_keeps_forward(model):
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        native = model(x).logits
        with capture(model, sparse=True) as record:
            sparse = model(x).logits
        with capture(model, sparse=False) as dense_record:
            dense = model(x).logits
        wide = copy.deepcopy(model)
        for attn in dsa_attentions(wide):
            attn.indexer.index_topk = 10_000
        all_keys = wide(x).logits
    torch.testing.assert_close(sparse, native)          # sparse capture = the model's own DSA forward
    torch.testing.assert_close(dense, all_keys)         # dense capture = attention over every causal key
    assert not torch.allclose(dense, native)            # index_topk=16 < 33 keys: DSA really drops keys
    c = model.config
    assert len(record.main_q) == c.num_hidden_layers
    assert record.main_q[0].shape == (2, 33, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
    assert record.scale[0] == pytest.approx((c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5)
    assert dense_record.main_q.keys() == record.main_q.keys()


def test_apply_pattern_freezes_backbone_and_drops_shared_indexers():
    model = tiny("tiny_glm")
    indexers = apply_pattern(model, Pattern.parse("FSSFSSFS"))
    assert sorted(indexers) == [0, 3, 6]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn.indexer." in n for n in trainable)
    assert {int(n.split(".")[2]) for n in trainable} == {0, 3, 6}
    assert not any(n.startswith("model.layers.1.self_attn.indexer") for n in model.state_dict())
    assert isinstance(dsa_attentions(model)[1].indexer, SharedIndexer)
    assert model.config.indexer_types[:4] == ["full", "shared", "shared", "full"]
    with pytest.raises(PatternError, match="has 4 letters but the model has 8"):
        apply_pattern(tiny("tiny_glm"), Pattern.parse("FSSS"))


def test_model_without_dsa_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(NotDSAModelError, match="no DSA indexer"):
        Distiller(llama, Pattern.parse("F"))


@pytest.mark.parametrize("name", ["tiny_glm", "tiny_dsv32", "tiny_glm_dense"])
def test_distillation_loss_falls_and_only_f_indexers_change(name):
    model = tiny(name)
    before = {n: p.clone() for n, p in model.named_parameters()}
    n = model.config.num_hidden_layers
    distiller = Distiller(model, Pattern.from_retention(n, 0.5))
    opt = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=3e-3)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    losses = []
    for step in range(12):
        out = distiller(x, sparse=step >= 8)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[7] < 0.7 * losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_own_target_uses_only_the_f_layer():
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    own = Distiller(tiny("tiny_glm"), Pattern.parse("FSSSFSSS"), target="own")
    centroid = Distiller(tiny("tiny_glm"), Pattern.parse("FSSSFSSS"))
    single = Distiller(tiny("tiny_glm"), Pattern.parse("FFFFFFFF"))
    with torch.no_grad():
        a, b, c = own(x).group_losses, centroid(x).group_losses, single(x).group_losses
    torch.testing.assert_close(a[4], c[4])
    assert not torch.allclose(a[4], b[4])
    with pytest.raises(ValueError, match="distill.target"):
        Distiller(tiny("tiny_glm"), Pattern.parse("F" * 8), target="mean")


def test_capture_with_a_topk_function_needs_no_mask_and_matches(model):
    """With topk_fn (the fused kernel's signature) the dense forward builds no [B,1,T,T] mask and still
    equals the masked dense forward; the sparse forward equals the model's own DSA forward."""
    from kernels.reference import indexer_topk
    x = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        native = model(x).logits
        with capture(model, sparse=False) as masked:
            dense = model(x).logits
        with mock.patch("distill.capture.sdpa_mask", side_effect=AssertionError("mask built")):
            with capture(model, sparse=False, topk_fn=indexer_topk) as fused:
                assert fused.mask_free
                dense_fused = model(x).logits
        with capture(model, sparse=True) as own_sparse:
            model(x)
        with capture(model, sparse=True, topk_fn=indexer_topk) as fused_sparse:
            assert not fused_sparse.mask_free
            sparse_fused = model(x).logits
    torch.testing.assert_close(dense_fused, dense)
    torch.testing.assert_close(sparse_fused, native)
    for f in own_sparse.topk:
        assert torch.equal(fused_sparse.topk[f].sort(-1).values, own_sparse.topk[f].sort(-1).values)
    assert masked.topk.keys() == own_sparse.topk.keys()
    assert all("forward" not in vars(dsa_attentions(model)[f].indexer) for f in own_sparse.topk)  # restored
