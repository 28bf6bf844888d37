"""The read bandwidth a kernel gets from L2 and from HBM on this GPU: the ceiling of a kernel that reads its operands
from L2 at a given ratio of FLOPs to bytes (the centroid kernel's q and k tiles: bench.profile_centroid).

    python -m bench.l2_bandwidth

Each program reads 16 KiB blocks of a bf16 buffer in turn (consecutive programs, consecutive blocks) and sums them
in fp32; the buffer is 24 MiB (resident in the 50 MiB L2 after the first pass) or 4 GiB (from HBM). Bytes read /
time of the whole grid, median of 5 runs.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl

from bench.common import measure


@triton.jit
def _read_kernel(src, out, n_blocks, passes, BLOCK: tl.constexpr):
    """out[program] = the fp32 sum of blocks program, program + programs, ... (passes of them, modulo n_blocks)."""
    pid = tl.program_id(0)
    acc = tl.zeros((BLOCK,), tl.float32)
    for i in range(passes):
        block = (pid + i * tl.num_programs(0)) % n_blocks
        acc += tl.load(src + block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out + pid, tl.sum(acc, 0))


def read_bandwidth(buffer_bytes: int, total_bytes: int, programs_per_sm: int = 16, block: int = 8192) -> float:
    """Bytes per second of `_read_kernel` reading total_bytes from a buffer_bytes bf16 buffer."""
    n_blocks = buffer_bytes // (2 * block)
    src = torch.randn(n_blocks * block, device="cuda", dtype=torch.bfloat16)
    programs = programs_per_sm * torch.cuda.get_device_properties(0).multi_processor_count
    passes = max(1, total_bytes // (2 * block * programs))
    out = torch.empty(programs, device="cuda", dtype=torch.float32)
    seconds, _ = measure(lambda: _read_kernel[(programs,)](src=src, out=out, n_blocks=n_blocks, passes=passes,
                                                           BLOCK=block, num_warps=4), reps=5, warmup=1)
    return programs * passes * 2 * block / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for label, buffer_bytes in (("L2-resident 24 MiB", 24 << 20), ("HBM 4 GiB", 4 << 30)):
        rate = read_bandwidth(buffer_bytes, total_bytes=16 << 30)
        print(f"read bandwidth, {label} buffer: {rate / 1e12:.2f} TB/s", flush=True)


if __name__ == "__main__":
    main()
