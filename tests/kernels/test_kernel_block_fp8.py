"""kernels.block_fp8.quantize_rows (the fused per-token, per-128-column FP8 quantisation of the GEMM path) against the
reference, on the CPU interpreter: the scales and the padding rows (its float8 bytes are checked on the GPU by
bench.check_kernels: the interpreter casts to float8 wrongly)."""
import pytest
import torch

from kernels import block_fp8, reference


@pytest.mark.parametrize("M, K, row_stride", [(37, 384, 384), (16, 200, 200), (5, 256, 640)])
def test_quantize_rows_scales_and_padding_match_the_reference(M, K, row_stride):
    """Odd row counts (padded to ROWS), a last column block short of 128, and rows strided apart (a column slice)."""
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, row_stride, generator=g) * 3).to(torch.bfloat16)[:, :K]
    x[1, :128] = 0  # an all-zero block gets scale 1
    q, scale = block_fp8.quantize_rows(x)
    _, scale_ref = reference.quantize_rows(x)
    M_out = -(-M // block_fp8.ROWS) * block_fp8.ROWS
    assert q.shape == (M_out, K) and q.dtype == block_fp8.FP8
    assert scale.shape == (M_out, -(-K // 128)) and scale.stride() == (1, M_out)
    torch.testing.assert_close(scale[:M], scale_ref, rtol=0, atol=0)
    assert scale[1, 0] == 1.0
    assert (scale[M:] == 1).all() and (q[M:].view(torch.uint8) == 0).all()
