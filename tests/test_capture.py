"""The family forward and its capture, the indexer projections and the Distiller on tiny GlmMoeDsa / DeepseekV32."""
import copy
from unittest import mock

import pytest
import torch

from distill.adapters import FAMILIES, family_of
from distill.capture import Capture
from distill.model import NotDSAModelError, SharedIndexer, apply_pattern, dsa_attentions, rope_style
from distill.objective import Distiller
from distill.pattern import Pattern, PatternError
from tests.conftest import tiny


@pytest.fixture(scope="module", params=["tiny_glm", "tiny_dsv32"])
def model(request):
    return tiny(request.param)


def indexer_scores(q, k, weights, softmax_scale):
    """Causal indexer logits [B, T, T] in the backbone indexer's exact operation order (-inf above the diagonal)."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1)) * softmax_scale
    logits = torch.matmul(weights.unsqueeze(-2), scores.relu()).squeeze(-2)
    T = q.shape[1]
    return logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))


class Recorder(Capture):
    """Records every F layer's indexer inputs and top-k, and every layer's dense q, k and LSE."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inputs, self.kept, self.dense = {}, {}, {}

    def select(self, layer, indexer, inputs):
        self.inputs[layer] = inputs
        return super().select(layer, indexer, inputs)

    def indexed(self, layer, projections, topk):
        self.kept[layer] = topk

    def dense_attended(self, layer, forms, q, k, lse, topk):
        self.dense[layer] = (q, k, lse, forms.scale)


def test_indexer_projections_reproduce_backbone_logits_and_topk_exactly(model):
    """On the backbone indexer's own inputs, the family's projections give its logits bit for bit, and the
    fused top-k's signature (kernels.reference.indexer_topk) its top-k."""
    from distill.adapters import IndexerInputs
    from kernels.reference import indexer_topk
    x = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(0))
    seen, inputs, outputs, handles = [], {}, {}, []
    real_topk = torch.Tensor.topk

    def spy(self, k, *args, **kwargs):  # the backbone indexer's last call: topk over its [B, T, T] logits
        if self.shape == (2, 37, 37):
            seen.append(self.clone())
        return real_topk(self, k, *args, **kwargs)

    for f, attn in enumerate(dsa_attentions(model)):
        handles.append(attn.indexer.register_forward_pre_hook(
            lambda m, args, f=f: inputs.__setitem__(f, IndexerInputs(args[0], args[1], *args[2]))))
        handles.append(attn.indexer.register_forward_hook(lambda m, args, out, f=f: outputs.__setitem__(f, out)))
    with torch.no_grad(), mock.patch.object(torch.Tensor, "topk", spy):
        model(x)
    for h in handles:
        h.remove()
    family = family_of(model)
    for f, attn in enumerate(dsa_attentions(model)):
        q, k, w = family.indexer_projections(attn.indexer, inputs[f])
        ours = indexer_scores(q, k, w, attn.indexer.softmax_scale)
        assert torch.equal(ours, seen[f]), f"layer {f} logits differ"
        topk = indexer_topk(q, k, family.kernel_weights(attn.indexer, w), attn.indexer.index_topk)
        valid = topk >= 0
        assert torch.equal(outputs[f][valid], topk[valid])
        assert (topk[:, 5, 6:] == -1).all() and valid[:, 15:].all()  # row t has min(t + 1, k) keys


def test_family_forward_equals_transformers_forward(model):
    """Sparse under all-F = the model's own DSA forward; dense = attention over every causal key (an index_topk
    that covers every key); the dense layers hand on q, k [B, T, H, Dq], the scale and each head's true LSE."""
    x = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    family = family_of(model)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        native = model(x).logits
        sparse = model.lm_head(family.forward(model, x, Capture(family, Pattern.all_full(n), sparse=True,
                                                                 device=x.device)))
        dense_record = Recorder(family, None, sparse=False, device=x.device)
        dense = model.lm_head(family.forward(model, x, dense_record))
        wide = copy.deepcopy(model)
        for attn in dsa_attentions(wide):
            attn.indexer.index_topk = 10_000
        all_keys = wide(x).logits
    torch.testing.assert_close(sparse, native, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense, all_keys, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dense, native, rtol=1e-4, atol=1e-4)  # index_topk=16 < 33 keys: DSA really drops keys
    c = model.config
    assert sorted(dense_record.dense) == list(range(n))
    q, k, lse, scale = dense_record.dense[0]
    assert q.shape == k.shape == (2, 33, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
    assert scale == pytest.approx((c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * scale
    causal = torch.ones(33, 33, dtype=torch.bool).tril()
    torch.testing.assert_close(lse, torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1))


def test_unknown_family_names_the_known_ones():
    from transformers import LlamaConfig
    with pytest.raises(NotDSAModelError, match="glm_moe_dsa"):
        family_of(LlamaConfig())
    assert sorted(FAMILIES) == ["axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4"]
    assert rope_style(tiny("tiny_dsv32")) == "half"


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


@pytest.mark.parametrize("name", ["tiny_glm", "tiny_dsv32", "tiny_glm_dense", "tiny_hy_v4", "tiny_axk2"])
def test_distillation_loss_falls_and_only_f_indexers_change(name):
    model = tiny(name)
    before = {n: p.clone() for n, p in model.named_parameters()}
    n = model.config.num_hidden_layers
    pattern = Pattern.from_retention(n, 0.5)
    distiller = Distiller(model, pattern)
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
    assert changed and all(".self_attn.indexer." in n for n in changed)
    assert {int(n.split(".")[2]) for n in changed} == set(pattern.full_layers)


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


def test_streamed_forward_builds_no_mask_and_runs_no_transformers_indexer(model):
    """Neither stage builds transformers' causal mask or calls its indexer forward ([B, T, HI, T] scores)."""
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32Indexer
    from transformers.models.glm_moe_dsa.modeling_glm_moe_dsa import GlmMoeDsaIndexer
    x = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(4))
    distiller = Distiller(copy.deepcopy(model), Pattern.from_retention(model.config.num_hidden_layers, 0.5))
    boom = AssertionError("transformers' mask or indexer forward ran")
    with mock.patch("transformers.masking_utils.sdpa_mask", side_effect=boom), \
            mock.patch.object(GlmMoeDsaIndexer, "forward", side_effect=boom), \
            mock.patch.object(DeepseekV32Indexer, "forward", side_effect=boom):
        for sparse in (False, True):
            distiller(x, sparse=sparse, with_recall=True).loss.backward()


def test_one_group_at_a_time_and_losses_as_groups_end():
    """The streamed forward holds one group's q/k (dense) or target (sparse) at a time, and each group's loss
    exists as soon as its last layer has run (before any later layer runs)."""
    from distill.objective import GroupLosses
    model = tiny("tiny_glm")
    pattern = Pattern.parse("FSSFSFSS")
    distiller = Distiller(model, pattern)
    x = torch.randint(0, 256, (1, 21), generator=torch.Generator().manual_seed(5))
    live, losses_seen = [], []
    original_layer_done = GroupLosses.layer_done

    def layer_done(self, layer):
        live.append(len(self.dense) + len(self.targets))
        original_layer_done(self, layer)
        losses_seen.append((layer, sorted(self.losses)))

    with mock.patch.object(GroupLosses, "layer_done", layer_done):
        for sparse in (False, True):
            live.clear(), losses_seen.clear()
            distiller(x, sparse=sparse)
            assert max(live) == 1
            assert losses_seen == [(0, []), (1, []), (2, [0]), (3, [0]), (4, [0, 3]), (5, [0, 3]), (6, [0, 3]),
                                   (7, [0, 3, 5])]


def test_offloading_saved_inputs_changes_no_gradient():
    x = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(6))
    grads = []
    for offload in (False, True):
        distiller = Distiller(tiny("tiny_glm"), Pattern.parse("FSSSFSSS"), offload_saved=offload)
        distiller(x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in distiller.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)
