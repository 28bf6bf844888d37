"""How the GPU compiler lays out a kernel's dots, on a machine without a GPU.

    python -m bench.kernel_layouts                  # the sparse attention at DeepSeek-V3.2's shapes, both layouts
    python -m bench.kernel_layouts --ptxas          # also registers and spills (Triton's bundled ptxas)
    python -m bench.kernel_layouts --centroid       # the dense centroid kernel's head loop, as compiled

Compiles `kernels.sparse_attention._sparse_mqa_kernel` for an sm_90 (Hopper) target through Triton's own pipeline,
with the arguments specialised as the launcher would specialise them (an int equal to 1 becomes a constant; ints
that are multiples of 16, and pointers, carry the divisibility hint), and prints the warp layout (warpsPerCTA) of
every tensor-core dot. With `sparse_split_scores` the two score dots ([64 heads, 64 keys]) must come out as
[4, 2] (the two warpgroups split the keys); Triton's rule for a dot that feeds another dot gives [8, 1], which
on a 64-row tile has both warpgroups compute the whole tile. tests/kernels/test_kernel_sparse.py checks both.

--centroid compiles `kernels.centroid_kl._centroid_kernel` (T = 16K, G = 1, the GPU's tiles) and prints the order of
the copy waits, dots, exps and copies in its head loop: which copies may still be in flight while a head computes;
the rope key columns are given once for all heads (main_k_rope) unless --expanded-keys.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.centroid_kl import _centroid_kernel, key_pieces, tma_tiles, wide_head_tiles
from kernels.sparse_attention import _sparse_mqa_kernel, attention_tiles
from kernels.tiles import tiles as tiles_for

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int8: "*i8"}


def compile_for(fn, args: dict, *, num_warps: int, num_stages: int, arch: int = 90):
    """fn compiled for sm_{arch}; args: parameter name -> a tensor (stands for a pointer of its dtype), a
    TensorDescriptor, an int, a float, or the value of a constexpr parameter (None included)."""
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if name in constexprs or value is None or (isinstance(value, int) and not isinstance(value, bool)
                                                   and value == 1):
            signature[name], constants[(i,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, TensorDescriptor):
            signature[name] = mangle_type(value)
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def dot_layouts(compiled) -> list[dict]:
    """Every tensor-core dot of the compiled kernel: its result shape and warpsPerCTA, in program order."""
    ttgir = compiled.asm["ttgir"]
    aliases = {name: [int(w) for w in warps.split(",")] for name, warps in
               re.findall(r"^(#mma\d*) = #ttg\.nvidia_mma<\{[^}]*warpsPerCTA = \[([\d, ]+)\]", ttgir, re.M)}
    dots = re.findall(r"ttng\.warp_group_dot %.*-> tensor<([\dx]+)xf32, (#mma\d*)>", ttgir)
    return [dict(shape=[int(n) for n in shape.split("x")], warps=aliases[alias]) for shape, alias in dots]


def loop_schedule(compiled) -> list[str]:
    """The innermost loop of the compiled kernel as its waits for copies (cp.async: with how many copy groups may
    stay in flight; TMA: on one copy's barrier), dots, exps and copies, in order."""
    ttgir = compiled.asm["ttgir"]
    loop = ttgir[ttgir.rindex("scf.for"):]
    loop = loop[:loop.index("scf.yield")]
    steps = []
    for op in re.finditer(r"ttg\.async_wait[^{]*\{num = (\d+)|ttng\.wait_barrier|ttng\.warp_group_dot |math\.exp|"
                          r"ttg\.async_copy_global_to_local|ttng\.async_tma_copy_global_to_local", loop):
        text = op.group(0)
        steps.append(f"wait for copies (up to {op.group(1)} groups in flight)" if text.startswith("ttg.async_wait")
                     else "wait for a TMA copy" if text == "ttng.wait_barrier"
                     else "dot" if "warp_group_dot" in text else "exp" if text == "math.exp" else "copy")
    return steps


def ptxas_usage(compiled, arch: int = 90) -> str:
    """ptxas -v's register and spill lines for the compiled kernel (Triton's bundled ptxas)."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"-arch=sm_{arch}a", path, "-o", os.path.join(d, "kernel.o")],
                             capture_output=True, text=True)
    return "; ".join(line.split(":", 1)[-1].strip() for line in (out.stdout + out.stderr).splitlines()
                     if "registers" in line or "spill" in line)


def sparse_attention(split: bool, *, T: int = 131072, H: int = 128, K: int = 2048, dk: int = 576, v: int = 512,
                     with_prob: bool = True):
    """`_sparse_mqa_kernel` compiled for sm_90 at DeepSeek-V3.2's absorbed MLA shapes with the GPU's tiles
    (kernels.tiles.tiles('cuda'), a `tiles_override` included)."""
    cfg = tiles_for("cuda")
    tiles = attention_tiles(cfg, H, K, dk, v)
    bf16, i32, f32 = (torch.empty(1, dtype=d) for d in (torch.bfloat16, torch.int32, torch.float32))
    args = dict(q=bf16, kv=bf16, idx_ptr=i32, doc_ptr=i32, out_ptr=bf16, lse_ptr=f32,
                p_scratch=torch.empty(1, dtype=torch.float16), m_scratch=f32,
                q_b=T * H * dk, q_t=H * dk, q_h=dk, q_d=1, kv_b=T * dk, kv_t=dk, kv_d=1, i_b=T * K, i_t=K, i_k=1,
                o_b=T * H * v, o_t=H * v, o_h=v, o_d=1, T=T, H=H, K=K, n_hb=tiles.n_hb, n_kb=tiles.n_kb,
                W=tiles.width, row0=0, n_items=T * tiles.n_hb, scale_log2=0.1, DK=dk, V=v, DA=tiles.da, DB=tiles.db,
                DV=tiles.dv, BLOCK_H=tiles.block_h, BLOCK_K=tiles.block_k, V_IS_A=v == tiles.da,
                WRITE_PROB=with_prob, SPLIT_S=split, PREC="tf32", DOT=tl.bfloat16)
    return compile_for(_sparse_mqa_kernel, args, num_warps=cfg.sparse_warps, num_stages=cfg.sparse_stages)


def centroid(*, T: int = 16384, G: int = 1, H: int = 128, nope: int = 128, rope: int = 64, tma: bool | None = None,
             shared_rope: bool = True):
    """`_centroid_kernel` compiled for sm_90 at DeepSeek-V3.2's MLA shapes (dense stage) with the GPU's tiles
    (kernels.tiles.tiles('cuda')) as the launcher adapts them to Dq = nope + rope; tma: whether q and k tiles come
    through TMA descriptors (default: the tiles' tma); shared_rope: main_k's rope columns given once for all heads
    (main_k_rope, as the job passes them), else main_k expanded to every head's nope + rope."""
    dq = nope + rope
    cfg = wide_head_tiles(tiles_for("cuda"), dq)
    bm, bn = cfg.centroid_block_m, cfg.centroid_block_n
    main_q = torch.empty(G, 1, T, H, dq, dtype=torch.bfloat16, device="meta")
    if shared_rope:
        main_k, main_k_rope = main_q[..., :nope], torch.empty(G, 1, T, 1, rope, dtype=torch.bfloat16, device="meta")
    else:
        main_k, main_k_rope = main_q, None
    pieces = key_pieces(main_k, main_k_rope, H, cfg.min_dot)
    mk, mr = pieces.pop("mk"), pieces.pop("mr")
    descriptors = tma_tiles(main_q, mk, mr, bm, bn, pieces["DA"], pieces["DB"],
                            cfg.tma if tma is None else tma)  # and TMA
    bf16, i32, f32 = (torch.empty(1, dtype=d) for d in (torch.bfloat16, torch.int32, torch.float32))
    strides = {f"{name}_{dim}": stride for name, x in (("sq", main_q), ("sk", mk), ("sr", mr))
               for dim, stride in zip("gbthd", x.stride())}
    args = dict(mq=bf16, mk=bf16, mr=bf16, **descriptors, lse_ptr=f32, doc_ptr=i32, keys_ptr=i32, grad_ptr=f32,
                ilse_ptr=f32, loss_ptr=f32, **strides,
                B=1, T=T, G=G, H=H, K=1, DQ=dq, r0=0, R=T, n_rb=triton.cdiv(T, bm), n_kb=triton.cdiv(T, bn),
                scale_log2=0.1, inv_gh=1.0 / (G * H), **pieces, BLOCK_M=bm, BLOCK_N=bn, GROUP=cfg.group,
                SPARSE=False, LOG2K=1, RATIO=1, WRITE_GRAD=True, PREC="tf32", DOT=tl.bfloat16)
    return compile_for(_centroid_kernel, args, num_warps=cfg.centroid_warps, num_stages=cfg.centroid_stages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ptxas", action="store_true", help="also print registers and spills")
    parser.add_argument("--json", action="store_true", help="one JSON object: split -> dot layouts")
    parser.add_argument("--centroid", action="store_true", help="the dense centroid kernel's head loop instead")
    parser.add_argument("--expanded-keys", action="store_true",
                        help="with --centroid: main_k with the rope columns copied to every head (no main_k_rope)")
    args = parser.parse_args()
    if args.centroid:
        compiled = centroid(shared_rope=not args.expanded_keys)
        print("centroid kernel, head loop:", ", ".join(loop_schedule(compiled)))
        print(f"  shared memory {compiled.metadata.shared} B" + (f"; ptxas: {ptxas_usage(compiled)}" if args.ptxas
                                                                   else ""))
        return
    result = {}
    for split in (True, False):
        compiled = sparse_attention(split)
        result["split" if split else "unsplit"] = dot_layouts(compiled)
        if not args.json:
            print(f"sparse attention, sparse_split_scores={int(split)}: dots {result['split' if split else 'unsplit']}")
            if args.ptxas:
                print(f"  ptxas: {ptxas_usage(compiled)}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
