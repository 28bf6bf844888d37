"""Every family on tiny random models (GlmMoeDsa, DeepseekV32, HY-V4, A.X-K2): the family forward against
transformers' own forward, the indexer projections against the backbone indexer, sinks, documents, export."""
import copy
from unittest import mock

import pytest
import torch

from distill.adapters import FAMILIES, MlaForms, family_of
from distill.capture import Capture
from distill.model import NotDSAModelError, apply_pattern, dsa_attentions
from distill.objective import Distiller
from distill.pattern import Pattern
from tests.conftest import tiny

NEW = ["tiny_hy_v4", "tiny_axk2"]
NAMES = ["tiny_glm", "tiny_dsv32", *NEW]  # every family the adapters know
# where the backbone indexer applies its softmax scale: on the q.k scores before the ReLU (as DeepSeek-V3.2), or
# folded into the head weights (HY-V4); the logits agree bit for bit only in the backbone's own order
SCALE_ON = {"glm_moe_dsa": "scores", "deepseek_v32": "scores", "hy_v4": "weights", "axk2": "scores"}


def build(name):
    """The tiny model, with distinct per-head sink logits where the family has sinks."""
    model = tiny(name)
    if family_of(model).sinks:
        g = torch.Generator().manual_seed(7)
        for attn in dsa_attentions(model):
            attn.sinks.data = torch.randn(attn.sinks.shape, generator=g) * 2
    return model


@pytest.fixture(scope="module", params=NAMES)
def model(request):
    return build(request.param)


def indexer_logits(q, k, weights, softmax_scale, scale_on):
    """Indexer logits [B, T, T] in the backbone indexer's operation order (no causal mask)."""
    scores = torch.matmul(q.float(), k.transpose(-1, -2).float().unsqueeze(1))
    if scale_on == "weights":
        return torch.matmul((weights * softmax_scale).unsqueeze(-2), scores.relu()).squeeze(-2)
    return torch.matmul(weights.unsqueeze(-2), (scores * softmax_scale).relu()).squeeze(-2)


class Recorder(Capture):
    """Records every layer's dense q, k and LSE."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dense = {}

    def dense_attended(self, layer, forms, q, k, lse, topk):
        self.dense[layer] = (q, k, lse, forms)


def test_indexer_projections_reproduce_backbone_logits_and_topk_exactly(model):
    from distill.adapters import IndexerInputs
    from kernels.reference import indexer_topk
    B, T = 2, 37
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    seen, inputs, outputs, handles = [], {}, {}, []
    real_topk = torch.Tensor.topk

    def spy(self, k, *args, **kwargs):  # the backbone indexer's last call: topk over its [B, T, T] logits
        if self.shape == (B, T, T):
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
    causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
    assert len(seen) == len(dsa_attentions(model))
    for f, attn in enumerate(dsa_attentions(model)):
        q, k, w = family.indexer_projections(attn.indexer, inputs[f])
        assert q.shape == (B, T, attn.indexer.n_heads, attn.indexer.head_dim) and k.shape == (B, T, q.shape[-1])
        ours = indexer_logits(q, k, w, attn.indexer.softmax_scale, SCALE_ON[model.config.model_type])
        assert torch.equal(ours[causal], seen[f][causal]), f"layer {f} logits differ"
        assert (seen[f][~causal] < -1e30).all()  # the backbone's causal mask (-inf or the dtype's min)
        topk = indexer_topk(q, k, family.kernel_weights(attn.indexer, w), attn.indexer.index_topk)
        valid = topk >= 0
        assert torch.equal(outputs[f][valid], topk[valid])
        assert (topk[:, 5, 6:] == -1).all() and valid[:, 15:].all()  # row t has min(t + 1, k) keys


def test_family_forward_equals_transformers_forward(model):
    """Sparse under all-F = the model's own DSA forward; dense = its forward with an index_topk covering every
    key. The LSE the dense layers hand on is over the causal keys only (no sink)."""
    B, T = 2, 33
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    family = family_of(model)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        native = model(x).logits
        sparse = model.lm_head(family.forward(model, x, Capture(family, Pattern.all_full(n), sparse=True,
                                                                 device=x.device)))
        record = Recorder(family, None, sparse=False, device=x.device)
        dense = model.lm_head(family.forward(model, x, record))
        wide = copy.deepcopy(model)
        for attn in dsa_attentions(wide):
            attn.indexer.index_topk = 10_000
        all_keys = wide(x).logits
    torch.testing.assert_close(sparse, native, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense, all_keys, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(dense, native, rtol=1e-4, atol=1e-4)  # index_topk=16 < 33 keys: DSA drops keys
    assert sorted(record.dense) == list(range(n))
    q, k, lse, forms = record.dense[1]
    c = model.config
    assert q.shape == k.shape == (B, T, c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
    logits = torch.einsum("bthd,bshd->bhts", q, k) * forms.scale
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    torch.testing.assert_close(lse, torch.logsumexp(logits.masked_fill(~causal, float("-inf")), -1))
    assert (forms.sinks is not None) == family.sinks


def test_sink_correction_is_the_softmax_with_the_sink_logit():
    """with_sinks(attention over keys, its LSE) = the softmax over [keys, sink] applied to the values."""
    g = torch.Generator().manual_seed(2)
    B, T, H, D = 2, 5, 3, 4
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    sinks = torch.randn(H, generator=g)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    lse = torch.logsumexp(scores, -1)                                       # [B, H, T]
    out = (scores.softmax(-1) @ v).transpose(1, 2)                          # [B, T, H, D]
    with_sink = torch.cat([scores, sinks[None, :, None, None].expand(B, H, T, 1)], -1).softmax(-1)
    expected = (with_sink[..., :-1] @ v).transpose(1, 2)
    forms = MlaForms.__new__(MlaForms)
    forms.sinks = sinks
    torch.testing.assert_close(forms.with_sinks(out, lse), expected)
    forms.sinks = None
    assert forms.with_sinks(out, lse) is out


def test_streamed_forward_builds_no_mask_and_runs_no_transformers_indexer(model):
    from transformers.models.axk2.modeling_axk2 import AXK2Indexer
    from transformers.models.hy_v4.modeling_hy_v4 import HYV4Indexer
    x = torch.randint(0, 256, (2, 29), generator=torch.Generator().manual_seed(4))
    distiller = Distiller(copy.deepcopy(model), Pattern.from_retention(model.config.num_hidden_layers, 0.5))
    boom = AssertionError("transformers' mask or indexer forward ran")
    with mock.patch("transformers.masking_utils.sdpa_mask", side_effect=boom), \
            mock.patch("transformers.masking_utils.eager_mask", side_effect=boom), \
            mock.patch.object(HYV4Indexer, "forward", side_effect=boom), \
            mock.patch.object(AXK2Indexer, "forward", side_effect=boom):
        for sparse in (False, True):
            distiller(x, sparse=sparse, with_recall=True).loss.backward()


def test_natively_shared_hy_v4_layer_cannot_be_full():
    """transformers' HY-V4 drops the indexer of a layer `indexer_types` marks shared: it can only be S."""
    from omegaconf import OmegaConf

    from tests.conftest import ROOT
    from train.model import build_model
    cfg = OmegaConf.load(f"{ROOT}/conf/model/tiny_hy_v4.yaml")
    cfg.config.indexer_types = ["full", "shared", "full", "shared"]
    model = build_model(cfg)
    assert sorted(apply_pattern(copy.deepcopy(model), Pattern.parse("FSFS"))) == [0, 2]
    with pytest.raises(NotDSAModelError, match="layer 1 is F in FFFF but the model has no indexer there"):
        apply_pattern(model, Pattern.parse("FFFF"))
    assert all(p.requires_grad for p in model.parameters())  # the refused pattern left the model as it was
    family = family_of(model)
    with torch.no_grad(), pytest.raises(NotDSAModelError, match="layer 1 is F in FFFF but the model has no indexer"):
        family.forward(model, torch.zeros(1, 4, dtype=torch.long),
                       Capture(family, Pattern.parse("FFFF"), sparse=True, device=torch.device("cpu")))


def test_unknown_family_names_all_known_ones():
    from transformers import LlamaConfig
    assert sorted(FAMILIES) == ["axk2", "deepseek_v32", "deepseek_v4", "glm_moe_dsa", "hy_v4"]
    with pytest.raises(NotDSAModelError) as error:
        family_of(LlamaConfig())
    assert all(name in str(error.value) for name in FAMILIES)
    assert family_of("hy_v4").sinks and not family_of("axk2").sinks


def test_full_model_export(tmp_path):
    """HY-V4 exports as itself (transformers shares top-k by its indexer_types) and loads with equal logits;
    A.X-K2 has no such class: only its indexers export."""
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, HYV4ForCausalLM

    from distill.export import ExportError, export
    from tests.conftest import ROOT
    x = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    for name in NEW:
        cfg = OmegaConf.to_container(OmegaConf.load(f"{ROOT}/conf/model/{name}.yaml"))
        model = build(name)
        apply_pattern(model, Pattern.parse("FSFS"))
        for attn in dsa_attentions(model)[::2]:  # trained indexers: not the ones a fresh build has
            attn.indexer.wk.weight.data.normal_(generator=torch.Generator().manual_seed(4))
        if name == "tiny_axk2":
            with pytest.raises(ExportError, match="axk2 has no transformers class that shares top-k"):
                export(model, "FSFS", tmp_path / name, model_cfg=cfg, full_model=True)
            export(model, "FSFS", tmp_path / name, model_cfg=cfg)
            continue
        out = export(model, "FSFS", tmp_path / name, model_cfg=cfg, full_model=True)
        loaded = AutoModelForCausalLM.from_pretrained(out / "model")
        assert isinstance(loaded, HYV4ForCausalLM) and loaded.config.indexer_types == ["full", "shared"] * 2
        assert [attn.indexer is None for attn in dsa_attentions(loaded)] == [False, True, False, True]
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_a_packed_row_gives_each_document_alone(model, sparse):
    """Two documents in one row (cu_seqlens, positions restarting): each document's final hidden states are
    those it has alone (sinks, gate and hyper-connections included)."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 256, (1, 13), generator=g), torch.randint(0, 256, (1, 20), generator=g)
    cu = torch.tensor([0, 13, 33], dtype=torch.int32)
    positions = torch.cat([torch.arange(13), torch.arange(20)])[None]
    family = family_of(model)
    pattern = Pattern.from_retention(model.config.num_hidden_layers, 0.5)
    with torch.no_grad():
        alone = [family.forward(model, ids, Capture(family, pattern, sparse=sparse, device=ids.device))
                 for ids in (a, b)]
        packed = family.forward(model, torch.cat([a, b], dim=1),
                                Capture(family, pattern, sparse=sparse, device=a.device, cu_seqlens=cu), positions)
    torch.testing.assert_close(packed, torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)


# ---- DeepSeek-V4: the CSA layers are the DSA layers; keys are 4:1 compressed entries ----------------------
def build_dsv4():
    """The tiny V4 with distinct sinks and compressor position biases (zeros in a fresh init)."""
    model = tiny("tiny_dsv4")
    g = torch.Generator().manual_seed(8)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.sinks.data = torch.randn(attn.sinks.shape, generator=g) * 2
        for module in (attn.compressor, getattr(attn.compressor, "indexer", None)):
            if module is not None:
                module.position_bias.data = torch.randn(module.position_bias.shape, generator=g)
    return model


@pytest.fixture(scope="module")
def dsv4():
    return build_dsv4()


def test_dsv4_pattern_runs_over_the_csa_layers(dsv4):
    family = family_of(dsv4)
    assert family.dsa_layer_ids(dsv4.config) == [1, 3, 4] and family.num_dsa_layers(dsv4.config) == 3
    indexers = apply_pattern(copy.deepcopy(dsv4), Pattern.parse("FSF"))
    assert sorted(indexers) == [0, 2]
    with pytest.raises(Exception, match="has 5 letters but the model has 3 DSA layers"):
        apply_pattern(copy.deepcopy(dsv4), Pattern.parse("FSFSF"))


def test_dsv4_forward_equals_transformers_and_shares_the_owners_topk(dsv4):
    """All-F sparse = transformers' forward; dense = transformers with an index_topk over every entry; FSF = the
    transformers forward whose S layer's indexer returns its owner's top-k (an independent implementation of
    sharing: eager attention with the block mask), across the HCA layer between them."""
    x = torch.randint(0, 256, (2, 36), generator=torch.Generator().manual_seed(1))  # 9 entries > index_topk 3
    family = family_of(dsv4)
    with torch.no_grad():
        native = dsv4(x).logits
        sparse = dsv4.lm_head(family.forward(dsv4, x, Capture(family, Pattern.all_full(3), sparse=True,
                                                                device=x.device)))
        record = Recorder(family, None, sparse=False, device=x.device)
        dense = dsv4.lm_head(family.forward(dsv4, x, record))
        wide = copy.deepcopy(dsv4)
        for attn in dsa_attentions(wide):
            attn.compressor.indexer.index_topk = 1000
        all_entries = wide(x).logits
        shared = copy.deepcopy(dsv4)
        apply_pattern(shared, Pattern.parse("FSF"))
        native_shared = shared(x).logits
        ours_shared = dsv4.lm_head(family.forward(dsv4, x, Capture(family, Pattern.parse("FSF"), sparse=True,
                                                                     device=x.device)))
    torch.testing.assert_close(sparse, native, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense, all_entries, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_shared, native_shared, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours_shared, native, rtol=1e-3, atol=1e-3)  # sharing changed the S layer
    assert sorted(record.dense) == [0, 1, 2]
    q, k, lse, forms = record.dense[1]
    assert q.shape == (2, 36, 4, 16) and k.shape == (2, 9, 1, 16) and forms.key_ratio == 4
    scores = torch.einsum("bthd,bsd->bhts", q, k[:, :, 0]) * forms.scale
    visible = torch.arange(9)[None, :] < ((torch.arange(36) + 1) // 4)[:, None]
    expected = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), -1)  # over the entries only
    torch.testing.assert_close(lse, expected)
    assert torch.isneginf(lse[:, :, :3]).all()  # rows 0..2 see no entry


def test_dsv4_indexer_projections_reproduce_the_backbone_topk(dsv4):
    from distill.adapters.deepseek_v4 import IndexerInputs
    from kernels.reference import indexer_logits, indexer_topk
    B, T = 2, 37  # an incomplete trailing window
    x = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(0))
    family = family_of(dsv4)
    inputs, outputs, handles = {}, {}, []
    for f, attn in enumerate(dsa_attentions(dsv4)):
        indexer = attn.compressor.indexer
        handles.append(indexer.register_forward_pre_hook(
            lambda m, args, f=f: inputs.__setitem__(f, IndexerInputs(args[0], args[1], args[2]))))
        handles.append(indexer.register_forward_hook(lambda m, args, out, f=f: outputs.__setitem__(f, out)))
    with torch.no_grad():
        dsv4(x)
    for h in handles:
        h.remove()
    for f, attn in enumerate(dsa_attentions(dsv4)):
        indexer = attn.compressor.indexer
        q, k, w = family.indexer_projections(indexer, inputs[f])
        assert q.shape == (B, T, 2, 16) and k.shape == (B, 9, 16) and w.shape == (B, T, 2)
        index_w = family.kernel_weights(indexer, w)
        scorer = indexer.scorer(q, k, inputs[f].hidden_states)  # the backbone's [B, T, S] scores
        torch.testing.assert_close(indexer_logits(q, k, index_w), scorer, rtol=1e-5, atol=1e-5)
        topk = indexer_topk(q, k, index_w, indexer.index_topk, ratio=4)
        assert torch.equal(topk.sort(-1).values, outputs[f].to(torch.int32).sort(-1).values)
        assert (topk[:, :3] == -1).all() and (topk[:, 5, 1:] == -1).all() and (topk[:, 11:] >= 0).all()


def test_dsv4_distillation_dense_and_sparse_trains_only_f_indexers():
    model = build_dsv4()
    before = {n: p.clone() for n, p in model.named_parameters()}
    distiller = Distiller(model, Pattern.parse("FSF"))
    opt = torch.optim.AdamW([p for p in distiller.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    losses = []
    for step in range(6):
        out = distiller(x, sparse=step >= 4, with_recall=step == 5)
        assert all(torch.isfinite(loss) for loss in out.group_losses.values())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[3] < 0.7 * losses[0] and sorted(out.recall) == [0, 2] and 0 < out.recall[0] <= 1
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".self_attn.compressor.indexer." in n for n in changed)
    assert {int(n.split(".")[2]) for n in changed} == {1, 4}  # decoder layers of CSA positions 0 and 2
    with pytest.raises(ValueError, match="packed documents"):
        distiller(x, cu_seqlens=torch.tensor([0, 40, 80], dtype=torch.int32))


def test_dsv4_export_names_the_csa_layers(tmp_path):
    """Indexers and manifest only (transformers has no V4 sharing); the pattern is over the CSA layers."""
    import json

    from omegaconf import OmegaConf

    from distill.export import ExportError, export, load_indexers_into
    from tests.conftest import ROOT
    cfg = OmegaConf.to_container(OmegaConf.load(f"{ROOT}/conf/model/tiny_dsv4.yaml"))
    model = build_dsv4()
    apply_pattern(model, Pattern.parse("FSF"))
    with pytest.raises(ExportError, match="deepseek_v4 has no transformers class that shares top-k"):
        export(model, "FSF", tmp_path / "full", model_cfg=cfg, full_model=True)
    out = export(model, "FSF", tmp_path / "v4", model_cfg=cfg)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pattern_over"] == "csa_layers" and manifest["dsa_layers"] == [1, 3, 4]
    assert manifest["index_topk_freq"] == {} and manifest["full_layers"] == [0, 2]
    assert manifest["consumer_lines"]["sglang"] == """--json-model-override-args '{"index_topk_pattern": "FSF"}'"""
    assert all(name.startswith(("model.layers.1.", "model.layers.4."))
               for name in manifest["indexer_weights"]["tensors"])
    fresh = build_dsv4()
    assert sorted(load_indexers_into(fresh, out)) == [0, 2]
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name])
