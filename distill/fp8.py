"""Block-FP8 checkpoints as DeepSeek-V3.2 and GLM-5-FP8 ship them (docs/FP8.md): the format, the frozen
modules that keep their weights in FP8, and the conversion of trained weights back into the format.

The format: `config.quantization_config = {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
weight_block_size: [bn, bk]}` (optionally `scale_fmt: ue8m0`: every scale a power of two); a quantised linear
weight `<m>.weight` [N, K] is float8_e4m3fn beside `<m>.weight_scale_inv` [ceil(N / bn), ceil(K / bk)] fp32, and
W = weight * weight_scale_inv per block. Routed experts are per-expert tensors `<experts>.<e>.{gate,up,down}_proj.*`.
Norms, embeddings, the router, `lm_head` and whatever `modules_to_not_convert` names stay bf16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from distill.source import ModelConfigError
from kernels import reference
from kernels.block_fp8 import FP8, block_fp8_linear, gemm_scales, quantize_rows, uses_gemm

SCALE = "weight_scale_inv"
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def scale_name(weight_name: str) -> str:
    """The checkpoint name of a block-FP8 weight's scales: '<m>.weight' -> '<m>.weight_scale_inv'."""
    return weight_name.removesuffix("weight") + SCALE


class Fp8FormatError(ModelConfigError):
    """A block-FP8 checkpoint this framework cannot read as it says it is (config, scale shapes or values)."""


@dataclass(frozen=True)
class BlockFp8:
    """A checkpoint's block-FP8 format: `block` = (bn, bk) rows x columns per scale; `power_of_two_scales`: the
    scales are powers of two (`scale_fmt: ue8m0`), so re-quantised weights get such scales too."""

    block: tuple[int, int]
    power_of_two_scales: bool = False

    @classmethod
    def of(cls, config) -> BlockFp8 | None:
        """The format of a transformers config's `quantization_config`; None for an unquantised model."""
        qc = getattr(config, "quantization_config", None)
        if qc is None:
            return None
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        where = "config.json quantization_config"
        if qc.get("quant_method") != "fp8":
            raise Fp8FormatError(f"{where} has quant_method {qc.get('quant_method')!r}: only block-FP8 ('fp8') "
                                 "checkpoints load quantised; dequantise the model to bf16 first")
        if qc.get("fmt", "e4m3") != "e4m3":
            raise Fp8FormatError(f"{where} has fmt {qc.get('fmt')!r}: only float8 e4m3 weights load")
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise Fp8FormatError(f"{where} has activation_scheme {qc.get('activation_scheme')!r}: only 'dynamic' "
                                 "(activations quantised per token and block at run time) is supported")
        block = qc.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise Fp8FormatError(f"{where} has weight_block_size {block!r}: expected two positive integers, as "
                                 "[128, 128] in the published checkpoints (per-tensor FP8 is not supported)")
        return cls(tuple(block), qc.get("scale_fmt") == "ue8m0")

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The weight_scale_inv shape of a weight [..., N, K]."""
        *lead, N, K = shape
        return (*lead, math.ceil(N / self.block[0]), math.ceil(K / self.block[1]))

    def dequantize(self, weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """weight [N, K] float8 and its scale_inv -> [N, K] in `dtype`."""
        return reference.dequantize_block_fp8(weight, scale_inv, self.block, dtype)

    def quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """weight [N, K] (any float dtype) -> (float8_e4m3fn [N, K], scale_inv fp32) in this format: each block's
        scale amax / 448, rounded up to a power of two where the checkpoint's scales are."""
        return reference.quantize_block_fp8(weight, self.block, self.power_of_two_scales)


# ---- the frozen modules ---------------------------------------------------------------------------------------
def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def fp8_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float8_e4m3fn tensor's bytes as uint8 (a view, no copy): the form the frozen modules keep their weights in.

    Every engine moves uint8 as is (zero.Init casts a float8 tensor made under it to the training dtype, and
    gloo cannot gather float8), while FP8 is FP8 again by `.view(FP8)`, free, at each GEMM."""
    if tensor.dtype != FP8:
        raise TypeError(f"expected a float8_e4m3fn tensor, got {tensor.dtype}")
    return tensor.view(torch.uint8)


class BlockFp8Linear(nn.Module):
    """A frozen linear layer y = x W^T (+ b) whose weight stays block-FP8 on the device.

    weight [out, in] uint8, the float8_e4m3fn bits (`fp8_bits`): a frozen Parameter, so ZeRO-3 partitions,
    gathers and offloads it as bytes and no checkpoint saves it; weight_scale_inv [ceil(out / bn), ceil(in / bk)]
    fp32 and its GEMM layout: buffers outside the state dict (fp32 kept whatever the engine's dtype; the export
    reads the source's shards, never this module).
    """

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int], bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, tuple(block)
        self.weight = _frozen(torch.empty(out_features, in_features, dtype=torch.uint8))
        self.bias = _frozen(torch.empty(out_features)) if bias else None
        self.register_buffer(SCALE, torch.empty(BlockFp8(self.block).scale_shape((out_features, in_features))),
                             persistent=False)
        self.register_buffer("gemm_scale", None, persistent=False)

    def loaded(self) -> None:
        """Called once the weights are in place: the scales' GEMM layout, where the GEMM runs."""
        if uses_gemm(self.weight.view(FP8), self.block):
            self.gemm_scale = gemm_scales(self.weight_scale_inv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_fp8_linear(x, self.weight.view(FP8), self.weight_scale_inv, self.block, self.bias,
                                self.gemm_scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


class BlockFp8Experts(nn.Module):
    """The routed experts of an MoE layer with block-FP8 weights, in place of transformers' fused experts module
    (same call: hidden [N, hidden], top_k_index [N, k], top_k_weights [N, k] -> [N, hidden]).

    gate_proj, up_proj [E, I, hidden] and down_proj [E, hidden, I]: float8_e4m3fn bits as uint8 (frozen Parameters,
    as BlockFp8Linear's weight), each with its
    `<name>_scale_inv` [E, ...] fp32 buffer. Each expert's tokens are gathered (one sort of the routing), its
    input quantised once for the gate and up GEMMs, and its output scattered back, weighted.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, block: tuple[int, int], act_fn: nn.Module):
        super().__init__()
        self.num_experts, self.block, self.act_fn = num_experts, tuple(block), act_fn
        fmt = BlockFp8(self.block)
        for name, (rows, cols) in (("gate_proj", (intermediate, hidden)), ("up_proj", (intermediate, hidden)),
                                   ("down_proj", (hidden, intermediate))):
            setattr(self, name, _frozen(torch.empty(num_experts, rows, cols, dtype=torch.uint8)))
            self.register_buffer(f"{name}_{SCALE}", torch.empty(fmt.scale_shape((num_experts, rows, cols))),
                                 persistent=False)
            self.register_buffer(f"{name}_gemm_scale", None, persistent=False)

    @staticmethod
    def slot(name: str) -> tuple[str, int] | None:
        """(attribute, expert) of a checkpoint tensor name under the experts' prefix ('7.up_proj.weight_scale_inv'
        -> ('up_proj_weight_scale_inv', 7)); None for a name that is not one."""
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in EXPERT_PROJECTIONS:
            return None
        if parts[2] == "weight":
            return parts[1], int(parts[0])
        return (f"{parts[1]}_{SCALE}", int(parts[0])) if parts[2] == SCALE else None

    def loaded(self) -> None:
        for name in EXPERT_PROJECTIONS:
            weight = getattr(self, name)
            if uses_gemm(weight[0].view(FP8), self.block):
                scales = getattr(self, f"{name}_{SCALE}")
                # stored [E, N / 128, L4]: expert e's GEMM layout is the transpose of its slice (gemm_scales' strides)
                setattr(self, f"{name}_gemm_scale", torch.stack([gemm_scales(s).t() for s in scales]))

    def _linear(self, name: str, e: int, x: torch.Tensor, quantized=None) -> torch.Tensor:
        gemm = getattr(self, f"{name}_gemm_scale")
        return block_fp8_linear(x, getattr(self, name)[e].view(FP8), getattr(self, f"{name}_{SCALE}")[e], self.block,
                                gemm_scale=None if gemm is None else gemm[e].t(), quantized=quantized)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        k = top_k_index.shape[-1]
        expert_of = top_k_index.reshape(-1)
        order = torch.argsort(expert_of, stable=True)
        counts = torch.bincount(expert_of, minlength=self.num_experts).tolist()  # one host sync per layer
        tokens, weights = order // k, top_k_weights.reshape(-1)[order]
        out = torch.zeros_like(hidden_states)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = tokens[start:start + n]
            x = hidden_states[rows]
            fused = self.gate_proj_gemm_scale is not None and x.dtype == torch.bfloat16
            quantized = quantize_rows(x) if fused else None
            inner = self.act_fn(self._linear("gate_proj", e, x, quantized)) * self._linear("up_proj", e, x, quantized)
            y = self._linear("down_proj", e, inner) * weights[start:start + n, None]
            out.index_add_(0, rows, y.to(out.dtype))
            start += n
        return out
