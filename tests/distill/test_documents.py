"""Packed documents stay apart: a row of two documents gives exactly what the two documents give alone."""
import pytest
import torch

from distill.adapters import family_of
from distill.capture import Capture, KeepTopk
from distill.evaluate import evaluate
from distill.objective import Distiller
from distill.pattern import Pattern
from tests.conftest import tiny

A, B = 13, 20  # two documents, packed into one row of 33 tokens


def documents():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 256, (1, A), generator=g), torch.randint(0, 256, (1, B), generator=g)
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(A), torch.arange(B)])[None]  # RoPE restarts per document
    return a, b, packed, torch.tensor([0, A, A + B], dtype=torch.int32), positions


def test_hidden_states_and_topk_of_a_packed_row_equal_each_document_alone():
    model = tiny("tiny_glm")
    family = family_of(model)
    a, b, packed, cu, positions = documents()
    pattern = Pattern.parse("FSSFSSSS")
    runs = {}
    with torch.no_grad():
        for name, ids, kwargs in (("a", a, {}), ("b", b, {}),
                                  ("packed", packed, dict(cu_seqlens=cu, position_ids=positions))):
            for sparse in (False, True):
                run = KeepTopk(family, pattern, sparse=sparse, device=ids.device, select_dense=True,
                               cu_seqlens=kwargs.get("cu_seqlens"))
                runs[name, sparse] = (family.forward(model, ids, run, kwargs.get("position_ids")), run.kept)
    for sparse in (False, True):
        hidden, kept = runs["packed", sparse]
        torch.testing.assert_close(hidden, torch.cat([runs["a", sparse][0], runs["b", sparse][0]], dim=1),
                                   rtol=1e-5, atol=1e-5)
        for f in pattern.full_layers:
            alone_b = runs["b", sparse][1][f]
            same_set = lambda x, y: torch.equal(x.sort(-1).values, y.sort(-1).values)  # noqa: E731 (up to ties)
            assert same_set(kept[f][:, :A], runs["a", sparse][1][f])
            assert same_set(kept[f][:, A:], torch.where(alone_b >= 0, alone_b + A, -1))
    mixed = runs["packed", True][0]
    with torch.no_grad():
        run = Capture(family, pattern, sparse=True, device=packed.device)
        crossing = family.forward(model, packed, run, positions)
    assert not torch.allclose(crossing[:, A:], mixed[:, A:], atol=1e-4)  # without the mask, b sees a


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_losses_and_gradients_of_a_packed_row_are_those_of_each_document(sparse):
    """Group losses are means over rows: packed = (A * alone_a + B * alone_b) / (A + B), gradients alike.
    The reference kernels run here; the fused kernels' documents are checked against the references in
    tests/kernels/test_kernel_centroid_kl.py and tests/kernels/test_kernel_sparse.py (a whole model under the Triton
    interpreter is too slow for the suite)."""
    a, b, packed, cu, positions = documents()
    results = {}
    for name, ids, kwargs in (("a", a, {}), ("b", b, {}),
                              ("packed", packed, dict(cu_seqlens=cu, position_ids=positions))):
        distiller = Distiller(tiny("tiny_glm"), Pattern.parse("FSSFSSSS"))
        out = distiller(ids, sparse=sparse, **kwargs)
        out.loss.backward()
        results[name] = ({f: l.detach() for f, l in out.group_losses.items()},
                         {n: p.grad.clone() for n, p in distiller.named_parameters() if p.requires_grad})
    for f, loss in results["packed"][0].items():
        expected = (A * results["a"][0][f] + B * results["b"][0][f]) / (A + B)
        torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    for name, grad in results["packed"][1].items():
        expected = (A * results["a"][1][name] + B * results["b"][1][name]) / (A + B)
        torch.testing.assert_close(grad, expected, rtol=1e-3, atol=1e-5)


def test_lm_loss_of_a_packed_row_counts_each_document_alone(glm):
    """evaluate() on a Batch-like object with documents: each document's tokens see only their document."""
    a, b, packed, cu, positions = documents()

    class Batch:
        input_ids, cu_seqlens, position_ids = packed, cu, positions

    alone = [evaluate(glm, "FSSSFSSS", [ids], recall=False) for ids in (a, b)]
    together = evaluate(glm, "FSSSFSSS", [Batch()], recall=False)
    # the packed row adds one prediction, a's last token predicting b's first, from a's context alone
    family = family_of(glm)
    with torch.no_grad():
        last = glm.lm_head(family.forward(glm, a, Capture(family, Pattern.parse("FSSSFSSS"), sparse=True,
                                                          device=a.device))[:, -1])
    boundary = torch.nn.functional.cross_entropy(last, b[:, 0]).item()
    assert together["tokens"] == alone[0]["tokens"] + alone[1]["tokens"] + 1
    expected = sum(m["loss"] * m["tokens"] for m in alone) + boundary
    assert together["loss"] * together["tokens"] == pytest.approx(expected, rel=1e-5)
