"""distill.upcast: an F-layer indexer's fp32 linear on bf16 input computes what transformers computes (the input cast
to fp32) with the same gradients, and what autograd keeps for its backward is the bf16 input, not an fp32 copy."""
import pytest
import torch
from torch import nn

from distill.model import apply_pattern
from distill.pattern import Pattern
from distill.upcast import UpcastLinear, linear_in_weight_dtype
from tests.conftest import tiny


def saved_dtypes(fn):
    """fn()'s output and the dtypes of the tensors autograd saved while it ran."""
    dtypes = []

    def pack(t):
        dtypes.append(t.dtype)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, dtypes


@pytest.mark.parametrize("bias", [False, True])
def test_upcast_linear_matches_linear_of_the_cast_input_and_saves_the_narrow_input(bias):
    torch.manual_seed(0)
    plain = nn.Linear(24, 5, bias=bias)  # fp32, as transformers keeps weights_proj
    upcast = nn.Linear(24, 5, bias=bias)
    upcast.load_state_dict(plain.state_dict())
    UpcastLinear.convert(upcast)
    assert isinstance(upcast, UpcastLinear)
    x = torch.randn(2, 7, 24).to(torch.bfloat16)
    grad = torch.randn(2, 7, 5)
    want, want_saved = saved_dtypes(lambda: plain(x.float()))
    got, got_saved = saved_dtypes(lambda: linear_in_weight_dtype(upcast, x))
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.float32 in want_saved and got_saved == [torch.bfloat16, torch.float32]  # x as given, the weight
    want.backward(grad)
    got.backward(grad)
    for name, p in plain.named_parameters():
        torch.testing.assert_close(dict(upcast.named_parameters())[name].grad, p.grad, rtol=1e-6, atol=1e-6)
    # same dtype in and out: the plain linear's path
    y = torch.randn(3, 24)
    assert torch.equal(upcast(y), plain(y))


def test_apply_pattern_converts_only_the_f_layers_indexers():
    glm = tiny("tiny_glm")
    applied = apply_pattern(glm, Pattern("FSSSFSSS"))
    assert sorted(applied) == [0, 4]
    for indexer in applied.values():
        assert all(isinstance(m, UpcastLinear) for m in indexer.modules() if isinstance(m, nn.Linear))
    others = [m for name, m in glm.named_modules() if isinstance(m, nn.Linear) and ".indexer." not in f"{name}."]
    assert others and not any(isinstance(m, UpcastLinear) for m in others)
