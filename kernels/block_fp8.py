"""Block-scaled FP8 linear of a frozen weight (docs/FP8.md).

A published block-FP8 weight W [N, K] is float8_e4m3fn with one fp32 inverse scale per [bn, bk] block,
scale_inv [ceil(N / bn), ceil(K / bk)]: W ~= W8 * scale_inv (each scale broadcast over its block). The layer is

    y = x @ W^T       x [..., K] (bf16 / fp16 / fp32) -> y [..., N] (x's dtype)

- CUDA, compute capability >= 9.0 (Hopper), 128 x 128 blocks, K a multiple of 128 (N is padded to whole blocks
  with zero rows for the call where it is not: DeepSeek's 576-row kv_a_proj_with_mqa): torch's block-scaled FP8 GEMM
  (`torch.nn.functional.scaled_mm`, cuBLAS), as DeepSeek's own inference runs it: x quantised to FP8 per token
  and 128 columns (1 x 128 blocks, dynamic scales, by `quantize_rows` below: one fused pass over x), W's 128 x 128
  blocks as stored. docs/BENCHMARKS.md ("Block-FP8 linear") has the measurement that chose it.
- everywhere else: `kernels.reference.block_fp8_linear` (dequantise W to x's dtype, then F.linear), which is also
  the CPU path every test runs.

No autograd: the backbone is frozen and nothing differentiates through its projections (the indexer weights that
train are dequantised once at load).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import reference

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0   # the largest finite float8_e4m3fn
BLOCK = 128       # the block the GEMM path takes (the published checkpoints' 128 x 128)
ROWS = 16         # cuBLAS's block-scaled GEMM refuses (CUBLAS_STATUS_NOT_SUPPORTED) row counts off this multiple


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, M, M_out, K, x_row_stride, BLOCK_M: tl.constexpr,
                          BLOCK_K: tl.constexpr, FP8_MAX: tl.constexpr):
    """One program quantises BLOCK_M rows x one 128-column block: scale = amax / FP8_MAX (1 where the block is 0),
    q = x / scale in float8; scale written K-block-major, scale[kb, m] (the layout the GEMM takes). Rows M .. M_out
    - 1 (padding) are written as zeros with scale 1. Offsets in 64 bits: M x K passes 2^31 elements at long context
    (DeepSeek-V3.2's dense MLP input, 18432 columns, beyond 116K tokens)."""
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    kb = tl.program_id(1)
    cols = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
    q = x / scale[:, None]
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty),
             mask=(rows[:, None] < M_out) & (cols[None, :] < K))
    tl.store(scale_ptr + kb * M_out + rows, scale, mask=rows < M_out)


def quantize_rows(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M', K] float8_e4m3fn, scale [M', ceil(K / block)] fp32 with strides (1, M')), M' = M rounded
    up to a multiple of ROWS (the rows past M are zeros): x ~= q[:M] * scale[:M], one scale per row and `block`
    columns. Same values as `kernels.reference.quantize_rows` on the first M rows: the fp8 bytes are checked on the GPU
    by `bench.check_kernels` (Triton 3.6's CPU interpreter casts to float8 wrongly, 126.9 -> 64), the scales and the
    padding rows also on the CPU (tests/kernels/test_kernel_block_fp8.py)."""
    M, K = x.shape
    M_out = -(-M // ROWS) * ROWS
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(M_out, K, dtype=FP8, device=x.device)
    scale = torch.empty(triton.cdiv(K, block), M_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M_out, 32), triton.cdiv(K, block))
    _quantize_rows_kernel[grid](x_ptr=x, q_ptr=q, scale_ptr=scale, M=M, M_out=M_out, K=K, x_row_stride=x.stride(0),
                                BLOCK_M=32, BLOCK_K=block, FP8_MAX=FP8_MAX)
    return q, scale.t()


def gemm_scales(scale_inv: torch.Tensor) -> torch.Tensor:
    """A weight's scale_inv [N / 128, K / 128] in the layout the block-scaled GEMM takes for its 128 x 128 operand:
    K-blocks padded to a multiple of 4, [L4, N / 128] with strides (1, L4). Made once per weight (at load)."""
    n_blocks, k_blocks = scale_inv.shape
    padded = scale_inv.new_ones(n_blocks, -(-k_blocks // 4) * 4)
    padded[:, :k_blocks] = scale_inv
    return padded.t()


def uses_gemm(weight: torch.Tensor, block: tuple[int, int]) -> bool:
    """Whether `block_fp8_linear` runs a weight [N, K] through the block-scaled FP8 GEMM (else the reference)."""
    return (weight.is_cuda and weight.dtype == FP8 and tuple(block) == (BLOCK, BLOCK)
            and torch.cuda.get_device_capability(weight.device) >= (9, 0) and weight.shape[1] % BLOCK == 0)


def block_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, gemm_scale: torch.Tensor | None = None,
                     quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (weight [N, K] float8 * scale_inv per `block`)^T (+ bias), in x's dtype; see the
    module docstring. gemm_scale: `gemm_scales(scale_inv)`, made once by the caller (else made here per call);
    quantized: `quantize_rows(x)` where the caller has it (two weights reading one input quantise it once). The GEMM
    runs on bf16 activations (others take the reference), their rows padded to a multiple of ROWS."""
    if not uses_gemm(weight, block) or x.dtype != torch.bfloat16:  # cuBLAS refused fp16 output here (H100)
        return reference.block_fp8_linear(x, weight, scale_inv, block, bias)
    (N, K), lead = weight.shape, x.shape[:-1]
    M = x.numel() // K
    q, x_scale = quantize_rows(x.reshape(M, K)) if quantized is None else quantized
    if N % BLOCK:  # rows short of a whole last block (DeepSeek's kv_a_proj_with_mqa: 576): zero rows, sliced off
        weight = F.pad(weight.view(torch.uint8), (0, 0, 0, -N % BLOCK)).view(FP8)
    y = F.scaled_mm(q, weight.t(), x_scale, F.ScalingType.BlockWise1x128,
                    gemm_scales(scale_inv) if gemm_scale is None else gemm_scale, F.ScalingType.BlockWise128x128,
                    bias=None, output_dtype=x.dtype)[:M, :N]
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, N)
