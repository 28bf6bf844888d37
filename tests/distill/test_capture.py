"""The pattern on the backbone and the streamed Distiller on tiny models (the family forward and its equivalence
with transformers, per family: tests/distill/test_families.py)."""
from unittest import mock

import pytest
import torch

from distill.adapters import family_of
from distill.capture import Capture
from distill.model import NotDSAModelError, RelayedForward, SharedIndexer, apply_pattern, dsa_attentions
from distill.objective import Distiller
from distill.pattern import Pattern, PatternError
from tests.conftest import tiny


def test_apply_pattern_freezes_backbone_and_drops_shared_indexers():
    model = tiny("tiny_glm")
    indexers = apply_pattern(model, Pattern.parse("FSSFSSFS"))
    assert sorted(indexers) == [0, 3, 6] and indexers.relay is None  # GlmMoeDsa shares top-k natively
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".self_attn.indexer." in n for n in trainable)
    assert {int(n.split(".")[2]) for n in trainable} == {0, 3, 6}
    assert not any(n.startswith("model.layers.1.self_attn.indexer") for n in model.state_dict())
    attentions = dsa_attentions(model)
    assert attentions[1].indexer is None and attentions[1].skip_topk and not attentions[0].skip_topk
    assert model.config.indexer_types[:4] == ["full", "shared", "shared", "full"]
    with pytest.raises(PatternError, match="has 4 letters but the model has 8"):
        apply_pattern(tiny("tiny_glm"), Pattern.parse("FSSS"))


def test_transformers_forward_under_an_applied_pattern_shares_topk():
    """transformers' own forward of a model under an applied pattern runs the pattern: GlmMoeDsa by its own
    sharing (S layers without an indexer, as transformers builds them from indexer_types), DeepseekV32 through the
    pattern's TopkRelay; both equal the family forward under the pattern. Closing the relay restores the class's
    forward; a refused pattern changes nothing."""
    x = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(6))
    for name, letters in (("tiny_glm", "FSSFSFSS"), ("tiny_dsv32", "FSFS")):
        model, pattern = tiny(name), Pattern.parse(letters)
        family = family_of(model)
        with torch.no_grad():
            ours = model.lm_head(family.forward(model, x, Capture(family, pattern, sparse=True, device=x.device)))
            before = model(x).logits
        applied = apply_pattern(model, pattern)
        with torch.no_grad():
            shared = model(x).logits
        torch.testing.assert_close(shared, ours, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(shared, before, rtol=1e-4, atol=1e-4)
        attentions = dsa_attentions(model)
        if family.shares_topk:
            assert applied.relay is None and attentions[1].indexer is None
            continue
        relay = applied.relay
        assert isinstance(attentions[1].indexer, SharedIndexer) and attentions[1].indexer.owner == 0
        assert sorted(relay.topk) == [0, 2] and isinstance(attentions[0].indexer.forward, RelayedForward)
        relay.close()
        assert all("forward" not in vars(applied[f]) for f in applied) and relay.topk == {}
        with pytest.raises(RuntimeError, match="before its owner F layer 0"):
            model(x)  # S layers still stand in, but nothing relays their owners' top-k any more

    model = tiny("tiny_dsv32")
    apply_pattern(model, Pattern.parse("FSFS"))
    with pytest.raises(NotDSAModelError, match="layer 1 is F"):
        apply_pattern(model, Pattern.parse("FFFS"))
    assert isinstance(dsa_attentions(model)[1].indexer, SharedIndexer)
    assert model.config.indexer_types == Pattern.parse("FSFS").indexer_types()


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
