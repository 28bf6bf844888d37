"""A trainable linear layer kept in a wider dtype than its input, whose backward keeps the input as given.

transformers keeps DeepSeek-V3.2's and GLM-5's `indexer.weights_proj` in fp32 and feeds it the bf16 hidden states cast
to fp32; autograd then saves that fp32 copy of x [B, T, hidden] for the weight's gradient, twice the bytes of x
itself, in every F layer (7168 x 4 bytes per token for DeepSeek-V3.2: 3.8 GB per F layer at 128K). The cast is
exact, so saving x and casting again in backward gives the same gradient from half the bytes. `apply_pattern` makes
every nn.Linear of an F-layer indexer an `UpcastLinear` (same parameters, same module: the class changes);
`linear_in_weight_dtype` is the call for a linear that may or may not be one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _UpcastLinear(torch.autograd.Function):
    """y = x.to(w.dtype) @ w^T (+ b) [..., N] of x [..., K]; backward recasts the saved x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = (grad @ weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad.flatten(0, -2).T @ x.flatten(0, -2).to(weight.dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class UpcastLinear(nn.Linear):
    """nn.Linear that takes input of any float dtype: the product in the weight's dtype (as `linear(x.to(w.dtype))`),
    the input saved for backward in its own dtype (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return _UpcastLinear.apply(x, self.weight, self.bias)

    @classmethod
    def convert(cls, module: nn.Module) -> None:
        """Make every plain nn.Linear inside `module` an UpcastLinear, in place (parameters, hooks and ZeRO-3 state
        untouched)."""
        for m in module.modules():
            if type(m) is nn.Linear:
                m.__class__ = cls


def linear_in_weight_dtype(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) computed in the linear's weight dtype, x [..., K] of any float dtype -> [..., N]."""
    return linear(x) if isinstance(linear, UpcastLinear) else linear(x.to(linear.weight.dtype))
