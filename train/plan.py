"""A memory plan before the weights load (docs/PLAN.md): per-GPU and per-node bytes of a distillation job.

    python -m train.plan --model deepseek_v32 --gpus 8 --gpu-gib 141 --seq-len 32768 --weights fp8 --zero 2
    python -m train.plan --model tiny_glm                  # a conf/model name, or a model directory
    python -m bench.plan_check                             # against the benchmarks' settings

`plan(config, ...) -> Plan` is the API; the job calls `check_plan` in `train.distill.prepare`, before any weight
loads, and refuses a plan that does not fit (`plan.check=false` runs it anyway). Every term is in bytes and names
the tensors it stands for (the code's own: distill/objective.py, distill/capture.py, distill/adapters/mla.py,
kernels/*.py). The weights are counted from the model built on the meta device (no memory), in the form the job
loads them: block-FP8 (1 byte per weight + an fp32 scale per 128 x 128 block, train.fp8_loader's rule: every linear
and fused experts module but lm_head, the indexers and `modules_to_not_convert`) or the compute dtype, fp32 where
transformers keeps a module in fp32 (`_keep_in_fp32_modules`, for a model read from a directory), S-layer indexers
not loaded.

Per GPU, at the peak of a stage (the streamed forward holds one group; docs/DESIGN.md section 3):
  weights + gathered layer (ZeRO-3) + optimizer state + the stage's peak activations + framework overhead.
The stage's peak activations: the residual stream, what the largest group holds (dense: main_q, main_k,
main_k_rope, main_lse and the F layer's indexer projections; sparse: the [B, T, K] fp32 target and the int32
top-k), plus the largest transient of the group's last layer or of its loss (the attention's expanded or absorbed
tensors, the MLP's, the fused loss kernel's scratch and input gradients), plus the indexers' autograd-saved
tensors when they stay on the GPU (`distill.offload_saved=false`). What the model leaves out: the backward pass
(it frees the group buffers first; its peak is the saved tensors of one F layer brought back, below the forward's),
cuDNN's internal workspace, DeepSpeed's communication buckets beyond the gradient bucket, and NCCL's buffers; they
sit in FRAMEWORK_BYTES.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field

import torch
from omegaconf import OmegaConf

from distill.adapters import family_of
from distill.fp8 import BlockFp8
from distill.pattern import resolve_pattern
from distill.source import MODEL_TYPES, model_config, resolve_dtype
from kernels import reference
from kernels.dense_attention import head_group_bytes
from kernels.tiles import DEFAULT_TILES, SCRATCH_BYTES  # SCRATCH_BYTES: the dense loss's R x S fp32 scratch budget
from train.fp8_loader import fused_experts

GIB = 2 ** 30
# CUDA context, cuBLAS / cuDNN workspaces and NCCL buffers: memory the GPU loses outside torch's allocator,
# a constant of this model (a CUDA 12/13 context on Hopper is about 0.5-0.6 GiB; NCCL and the library workspaces
# the rest)
FRAMEWORK_BYTES = int(1.5 * GIB)
# the caching allocator's fragmentation, as a share of the step's activation peak (expandable segments on, as
# launch/distill.sh sets PYTORCH_CUDA_ALLOC_CONF; without them a 128K step has needed up to 20% more)
FRAGMENTATION = 0.05
SM_COUNT = 132                  # H100 / H200 SXM: the fused top-k's programs scale with it
_TILES = DEFAULT_TILES["cuda"]
SPARSE_SCRATCH_BYTES = _TILES.sparse_scratch_bytes  # the sparse loss's p scratch budget
TOPK_PROGRAMS, TOPK_BLOCK_T = _TILES.topk_programs, _TILES.topk_block_t  # top-k programs per SM, rows each
CENTROID_ROW_TILE = max(_TILES.block_m, _TILES.centroid_block_m)  # the scratch's row granularity
CHUNK_ELEMENTS = reference.CHUNK_ELEMENTS  # DeepSeek-V4's compressed attention's row chunks
MOE_IMBALANCE = 4               # the busiest routed expert's tokens, as a multiple of the mean (T * k / E)
DS_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce_bucket_size default: the bf16 gradient bucket of ZeRO-2/3

# Full-size models by name: transformers 5.17's config defaults are the released models'. DeepSeek-V4: the
# installed DeepseekV4Config defaults are DeepSeek-V4-Flash (43 layers, hidden 4096, 64 heads of 512, 256 experts
# of 2048, 6 active), the model bench/families.py's REAL_SHAPES names; a larger V4 is not described in this repo.
NAMED = {
    "deepseek_v32": ("DeepSeek-V3.2 (transformers DeepseekV32Config defaults)", "deepseek_v32"),
    "glm5": ("GLM-5 (transformers GlmMoeDsaConfig defaults)", "glm_moe_dsa"),
    "glm_moe_dsa": ("GLM-5 (transformers GlmMoeDsaConfig defaults)", "glm_moe_dsa"),
    "deepseek_v4": ("DeepSeek-V4-Flash (transformers DeepseekV4Config defaults; assumed for 'DeepSeek-V4')",
                    "deepseek_v4"),
}
FP8_QUANTIZATION = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}


# ---- the model's weights ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Inventory:
    """Bytes of the model's weights as the job holds them, counted on the meta device.

    total: every weight and buffer on a GPU when replicated; replicated: the part ZeRO-3 does not partition (buffers:
    the FP8 scales and their GEMM layout, RoPE's tables); layer: per decoder layer (the ZeRO-3 gather unit's
    upper bound: DeepSpeed gathers module by module, the largest being a layer's fused experts); largest_tensor: the
    largest single checkpoint tensor (what the loader holds on the host at a time); trainable: the F-layer indexers'
    parameter count; params: every parameter's count (fp32 random init on the host)."""

    total: int
    replicated: int
    layer: tuple[int, ...]
    largest_tensor: int
    trainable: int
    trainable_bytes: int
    params: int
    largest_param: int
    fp8: bool


def _meta_model(config):
    with torch.device("meta"):
        return MODEL_TYPES[config.model_type][1](config)


def layer_elements(config) -> int:
    """The parameter count of the largest decoder layer of `config` (counted on the meta device): ZeRO-3's unit of
    prefetch and residency (conf/deepspeed/zero3.yaml's `auto`). An FP8 weight is one element per byte, as the
    frozen modules keep it."""
    model = _meta_model(config)
    return max(sum(p.numel() for p in layer.parameters()) for layer in family_of(model).decoder_layers(model))


def inventory(config, pattern, fp8: bool, dtype_bytes: int = 2, fp32_modules: bool = True) -> Inventory:
    """The weights of `config` under `pattern` (S-layer indexers not loaded), FP8 where train.fp8_loader makes them
    FP8, else `dtype_bytes` per weight (fp32 for transformers' keep-in-fp32 modules when `fp32_modules`)."""
    model = _meta_model(config)
    family = family_of(model)
    prefixes = [f"model.layers.{i}.self_attn.{family.indexer_path}." for i in family.dsa_layer_ids(config)]
    shared = tuple(p for p, letter in zip(prefixes, str(pattern)) if letter == "S")
    trainable_prefixes = tuple(p for p, letter in zip(prefixes, str(pattern)) if letter == "F")
    block = BlockFp8.of(config).block if fp8 and BlockFp8.of(config) else (128, 128)
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    not_converted = tuple(qc.get("modules_to_not_convert") or ())
    keep32 = tuple(model._keep_in_fp32_modules or ()) + tuple(model._keep_in_fp32_modules_strict or ())
    sizes: dict[str, int] = {}  # parameter / buffer name -> bytes
    fp8_tensors: set[str] = set()
    replicated = largest_param = 0
    if fp8:
        for name, module in model.named_modules():
            if name == "lm_head" or f"{name}.".startswith(tuple(prefixes)) or any(n in name for n in not_converted):
                continue
            mats = []
            if fused_experts(module) is not None:
                mats = [(f"{name}.{p}", getattr(module, p).shape) for p in ("gate_up_proj", "down_proj")]
            elif isinstance(module, torch.nn.Linear):
                mats = [(f"{name}.weight", module.weight.shape)]
            for key, shape in mats:
                *lead, rows, cols = shape
                n, k_blocks = math.prod(lead), math.ceil(cols / block[1])
                # float8_e4m3fn weight + weight_scale_inv fp32 per (bn x bk) block + the scales' GEMM layout (K-blocks
                # padded to 4, kernels.block_fp8.gemm_scales), both buffers
                scales = n * 4 * math.ceil(rows / block[0]) * (k_blocks + -(-k_blocks // 4) * 4)
                sizes[key] = n * rows * cols + scales
                fp8_tensors.add(key)
                replicated += scales
                # BlockFp8Experts holds gate and up apart: half of gate_up_proj each
                largest_param = max(largest_param, n * rows * cols // (2 if key.endswith("gate_up_proj") else 1))
    trainable = trainable_bytes = 0
    for table in (model.named_parameters(), model.named_buffers()):
        for name, t in table:
            if name in fp8_tensors or name.startswith(shared):
                continue
            item = 4 if (fp32_modules and any(k in name for k in keep32)) or t.dtype == torch.float32 and \
                not isinstance(t, torch.nn.Parameter) else dtype_bytes
            sizes[name] = t.numel() * item
            if not isinstance(t, torch.nn.Parameter):
                replicated += sizes[name]
            else:
                largest_param = max(largest_param, sizes[name])
            if name.startswith(trainable_prefixes):
                trainable += t.numel()
                trainable_bytes += t.numel() * item
    layers = len(model.model.layers)
    layer = [0] * layers
    for name, b in sizes.items():
        if name.startswith("model.layers."):
            layer[int(name.split(".")[2])] += b
    # the checkpoint stores routed experts one expert's projection at a time; other tensors whole
    largest = max(b for name, b in sizes.items() if name not in fp8_tensors or not name.endswith("_proj"))
    params = sum(p.numel() for p in model.parameters())
    return Inventory(sum(sizes.values()), replicated, tuple(layer), largest, trainable, trainable_bytes, params,
                     largest_param, fp8)


# ---- the activations ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shapes:
    """What the activation terms read of a transformers config (MLA families, or DeepSeek-V4's CSA)."""

    v4: bool
    hidden: int
    heads: int
    q_lora: int
    nope: int      # MLA: per-head key columns (V4: 0)
    rope: int      # MLA: the rope columns all heads share (V4: the head's rope part, inside head_dim)
    v: int         # value width per head (V4: head_dim, K = V)
    kv_lora: int   # MLA latent (V4: head_dim)
    index_heads: int
    index_dim: int
    index_rope: int
    topk: int
    ratio: int     # tokens per key (V4 CSA: 4)
    dense_mlp: int     # the largest dense MLP's intermediate size (0: none)
    experts: int
    moe_inter: int
    active: int
    shared_experts: int
    streams: int   # residual streams (V4 / HY-V4 hyper-connections: hc_mult)

    @classmethod
    def of(cls, c) -> Shapes:
        v4 = c.model_type == "deepseek_v4"
        kinds = list(getattr(c, "mlp_layer_types", None) or [])
        first_dense = getattr(c, "first_k_dense_replace", None)
        has_dense = ("dense" in kinds) if kinds else bool(first_dense)

        def get(k, d=0):
            return getattr(c, k, d) or d

        if v4:
            head = c.head_dim
            return cls(True, c.hidden_size, c.num_attention_heads, c.q_lora_rank, 0, get("qk_rope_head_dim", 64), head,
                       head, c.index_n_heads, c.index_head_dim, get("qk_rope_head_dim", 64), c.index_topk,
                       c.compress_rates["compressed_sparse_attention"], 0, c.n_routed_experts,
                       c.moe_intermediate_size, c.num_experts_per_tok, get("n_shared_experts"), get("hc_mult", 1))
        return cls(False, c.hidden_size, c.num_attention_heads, get("q_lora_rank") or c.hidden_size,
                   c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.index_n_heads,
                   c.index_head_dim, c.qk_rope_head_dim, c.index_topk, 1,
                   get("intermediate_size") if has_dense else 0, get("n_routed_experts"), get("moe_intermediate_size"),
                   get("num_experts_per_tok"), get("n_shared_experts"), get("hc_mult", 1))


def _keys_apart(nope: int, rope: int) -> bool:
    """kernels.centroid_kl.keys_apart on a GPU (min_dot 16): both widths powers of two of at least 16."""
    return all(w >= 16 and w & (w - 1) == 0 for w in (nope, rope))


def group_terms(s: Shapes, B: int, T: int, G: int, stage: str, a: int) -> dict[str, int]:
    """Bytes the largest group holds until its loss (a: the compute dtype's bytes, 2 for bf16)."""
    S = T // s.ratio
    t = {"indexer projections (index_q [B,T,HI,D], index_k [B,S,D], index_w [B,T,HI] fp32)":
         B * T * s.index_heads * s.index_dim * a + B * S * s.index_dim * a + B * T * s.index_heads * 4}
    if stage == "dense":
        dq = s.v if s.v4 else s.nope + s.rope
        apart = not s.v4 and _keys_apart(s.nope, s.rope)
        kh = 1 if s.v4 else s.heads  # V4: one key head [G, B, S, 1, D]
        t["main_q [G,B,T,H,Dq]"] = G * B * T * s.heads * dq * a
        t["main_k [G,B,S,H,Dq-Dr] (or full keys)"] = G * B * S * kh * (s.nope if apart else dq) * a
        if apart:
            t["main_k_rope [G,B,S,1,Dr]"] = G * B * S * s.rope * a
        t["main_lse [G,B,H,T] fp32"] = G * B * s.heads * T * 4
    else:
        t["target [B,T,K] fp32"] = B * T * s.topk * 4
        t["topk [B,T,K] int32"] = B * T * s.topk * 4
    return t


def attention_transient(s: Shapes, B: int, T: int, stage: str, a: int) -> int:
    """Bytes alive at the peak of one layer's attention (the group's last layer, an S layer: no indexer)."""
    H = s.heads
    S = T // s.ratio
    if s.v4:
        # q_a_proj out, q_resid [B,T,q_lora]; q_b_proj out and its per-head norm [B,T,H,D]; kv [B,T,D];
        # the compressor's entries [B,S,D] (+ its indexer's [B,S,DI])
        base = 2 * B * T * s.q_lora * a + 2 * B * T * H * s.v * a + B * T * s.v * a + B * S * (s.v + s.index_dim) * a
        # window and compressed outputs [B,T,H,D] and their merge; the chunks' fp32 scores and probabilities
        chunks = 4 * CHUNK_ELEMENTS * 4
        if stage == "dense":
            return base + 3 * B * T * H * s.v * a + chunks
        return base + 3 * B * T * H * s.v * a + SPARSE_SCRATCH_BYTES
    dq = s.nope + s.rope
    base = (2 * B * T * s.q_lora * a          # q_a_proj out (q_compressed), q_resid
            + B * T * H * dq * a              # q_b_proj out (q_nope is a view of it)
            + B * T * H * s.rope * a          # q_rot after RoPE
            + B * T * (s.kv_lora + s.rope) * a + B * T * s.kv_lora * a + B * T * s.rope * a)  # kv_a out, latent, k_rot
    if stage == "dense":
        # MlaForms.expanded: kv_b_proj out [B,T,H,nope+v] (v a view), q and k cats [B,T,H,Dq]; the attention's
        # out [B,T,H,Dv] and lse [B,H,T] fp32
        # + the fused attention's head groups where a view passes 2^31 elements (kernels.dense_attention)
        return (base + B * T * H * (s.nope + s.v) * a + 2 * B * T * H * dq * a + B * T * H * s.v * a + B * H * T * 4
                + head_group_bytes(B, T, H, dq, s.v, s.nope + s.v, a))
    C = s.kv_lora
    # MlaForms.absorbed: q [B,T,H,C+rope], kv [B,T,C+rope]; sparse_mqa_attention's latent out [B,T,H,C], lse; then
    # either its p scratch (<= 1 GiB) or MlaForms.output's [B,T,H,Dv]
    absorbed = B * T * H * (C + s.rope) * a + B * T * (C + s.rope) * a + B * T * H * C * a + B * H * T * 4
    p_scratch = min(SPARSE_SCRATCH_BYTES, B * T * H * (s.topk * 2 + 4 * math.ceil(s.topk / 64)))
    return base + absorbed + max(p_scratch, B * T * H * s.v * a)


def mlp_transient(s: Shapes, B: int, T: int, a: int, fp8: bool = True) -> int:
    """Bytes alive at the peak of one layer's MLP: a dense MLP's gate, up and product [B,T,I]; or the MoE's router
    logits [B,T,E] fp32, routing (top_k index int64 / weights, argsort order, token ids), the shared experts'
    [B,T,I_s] x3, the routed output [B,T,hidden], and the routed experts' own: block-FP8 (`distill.fp8.
    BlockFp8Experts`, one expert at a time) the busiest expert's gathered tokens [n,hidden] (+ FP8 copy) and its
    [n,I] x3 (n = MOE_IMBALANCE x B T k / E, at most B T); else transformers' grouped experts (`grouped_mm`, every
    token-expert pair at once, S = B T k rows): the gathered tokens [S,hidden], gate_up [S,2I], the product [S,I],
    the down projection [S,hidden] and its weighted copy [S,hidden] fp32."""
    dense = 3 * B * T * s.dense_mlp * a
    moe = 0
    if s.experts:
        moe = (B * T * s.experts * 4 + B * T * s.active * (8 + 4 + 8 + 8)
               + 3 * B * T * s.moe_inter * s.shared_experts * a + B * T * s.hidden * a)
        if fp8:
            n = min(B * T, MOE_IMBALANCE * B * T * s.active // s.experts)
            moe += n * (s.hidden * (a + 1) + 3 * s.moe_inter * a)
        else:
            pairs = B * T * s.active
            moe += pairs * (2 * s.hidden * a + 3 * s.moe_inter * a + s.hidden * 4)
    return max(dense, moe)


def loss_transient(s: Shapes, B: int, T: int, G: int, stage: str, a: int) -> int:
    """Bytes the group's fused loss allocates besides its inputs: dense (kernels.centroid_kl._fused_forward): the
    LSE copy [G,B,H,T] fp32, the dL/dI scratch [B,R,S] fp32 (R rows within SCRATCH_BYTES), loss_rows [B,T],
    d_iq [B,T,HI,D], d_iw [B,T,HI] fp32, d_ik [B,S,D] fp32 + its cast; sparse (kernels.sparse_centroid_kl): the same
    gradients and loss rows."""
    S = T // s.ratio
    grads = B * T * s.index_heads * s.index_dim * a + B * T * s.index_heads * 4 + B * S * s.index_dim * (4 + a)
    if stage == "sparse":
        return grads + B * T * 4
    rows = max(CENTROID_ROW_TILE, min(math.ceil(T / CENTROID_ROW_TILE) * CENTROID_ROW_TILE,
                                      SCRATCH_BYTES // (4 * B * max(S, 1)) // CENTROID_ROW_TILE * CENTROID_ROW_TILE))
    return G * B * s.heads * T * 4 + B * rows * S * 4 + B * T * 4 + grads


def topk_transient(s: Shapes, B: int, T: int, a: int) -> int:
    """The F layer's selection (sparse stage): indexer_topk's int32 score scratch [programs, BLOCK_T, S] and the
    projections' intermediates (wq_b out, the rope'd halves, [B,T,HI,D] x2)."""
    S = T // s.ratio
    programs = min(B * math.ceil(T / TOPK_BLOCK_T), TOPK_PROGRAMS * SM_COUNT)
    return programs * TOPK_BLOCK_T * S * 4 + 2 * B * T * s.index_heads * s.index_dim * a


def saved_per_f_layer(s: Shapes, B: int, T: int, a: int) -> int:
    """Bytes autograd saves for one F layer's indexer backward (offloaded to pinned host memory under
    offload_saved): the inputs of wq_b (q_resid [B,T,q_lora]), wk and weights_proj (x [B,T,hidden], once: the same
    tensor, which distill.upcast keeps in its own dtype where transformers casts it to fp32 for weights_proj, and
    distill.objective.PinnedOffload copies once), k_norm's input [B,T,D] and its mean / rstd, RoPE's cos and sin for
    q and k, and the fused loss's input gradients (d_iq [B,T,HI,D], d_ik [B,S,D], d_iw [B,T,HI] fp32;
    ctx.save_for_backward)."""
    S = T // s.ratio
    inputs = (B * T * s.q_lora * a + B * T * s.hidden * a
              + B * S * s.index_dim * a + 2 * B * S * 4 + 4 * B * T * s.index_rope * a)
    if s.v4:  # the indexer's own compressor: kv_proj and gate_proj on x (fp32 modules)
        inputs += 2 * B * T * s.hidden * 4
    grads = B * T * s.index_heads * s.index_dim * a + B * S * s.index_dim * a + B * T * s.index_heads * 4
    return inputs + grads


# ---- the plan -----------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One stage's peak activations per GPU, bytes: `held` (the residual stream and the largest group's buffers),
    `transient` (the largest of the group's last layer's attention, an MLP, the F layer's selection, the loss), the
    saved tensors kept on the GPU (0 when offloaded), the gradients of the trainable parameters."""

    stage: str
    seq_len: int
    terms: dict[str, int]
    transient: dict[str, int]
    activations: int
    host_saved: int   # pinned host bytes per rank of every F layer's saved tensors (offload_saved)


@dataclass
class Plan:
    """Per-GPU bytes of a job (terms named after the tensors), whether it fits, and settings that would make it fit.

    gpu: {term: bytes} outside the stages (weights, gathered layer, optimizer state, framework overhead);
    stages: the dense and sparse stages' activation peaks; peak: the largest per-GPU total (bytes);
    host: {term: bytes} per node; supported: whether the job implements these settings (else `unsupported` says
    why); suggestions: [(change, Plan or None, note)] tried when it does not fit."""

    name: str
    setting: dict
    gpu: dict[str, int]
    stages: list[StagePlan]
    peak: int
    gpu_bytes: int
    host: dict[str, int]
    host_bytes: int | None
    supported: bool
    unsupported: list[str]
    suggestions: list[tuple[str, Plan | None, str]] = field(default_factory=list)

    @property
    def fits_gpu(self) -> bool:
        return self.peak <= self.gpu_bytes

    @property
    def fits_host(self) -> bool:
        return self.host_bytes is None or sum(self.host.values()) <= self.host_bytes

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def verdict(self) -> str:
        where = [] if self.fits_gpu else [f"GPU {self.peak / GIB:.1f} of {self.gpu_bytes / GIB:.0f} GiB"]
        if not self.fits_host:
            where.append(f"host {sum(self.host.values()) / GIB:.0f} of {self.host_bytes / GIB:.0f} GiB per node")
        state = "fits" if self.fits else "does NOT fit (" + "; ".join(where) + ")"
        return state + ("" if self.supported else "; not supported by the job: " + "; ".join(self.unsupported))

    def fix(self) -> str:
        """The first suggestion that fits and the job supports, as a one-line hint."""
        for change, alt, note in self.suggestions:
            if alt is not None and alt.fits and alt.supported:
                return f"{change} ({alt.peak / GIB:.1f} GiB per GPU{'; ' + note if note else ''})"
        return "no supported setting found (see python -m train.plan)"

    def table(self) -> str:
        s = self.setting
        lines = [f"{self.name}: {s['nodes']} node(s) x {s['gpus_per_node']} GPU(s) of {self.gpu_bytes / GIB:.0f} GiB, "
                 f"weights {s['weights']}, ZeRO-{s['zero']}" + (", parameter offload" if s["offload_param"] else "")
                 + f", B={s['micro_batch']}, pattern {s['pattern_desc']} (largest group G={s['G']}, "
                 f"{s['f_layers']} F layers), offload_saved={s['offload_saved']}",
                 f"  {'per GPU':58s} {'GiB':>8s}"]
        for k, v in self.gpu.items():
            lines.append(f"  {k:58s} {v / GIB:8.2f}")
        for st in self.stages:
            lines.append(f"  {st.stage} stage, T={st.seq_len}: activations {st.activations / GIB:.2f} GiB")
            for k, v in st.terms.items():
                lines.append(f"    {k:56s} {v / GIB:8.2f}")
            big = max(st.transient, key=st.transient.get)
            for k, v in st.transient.items():
                lines.append(f"    {('* ' if k == big else '  ') + k:56s} {v / GIB:8.2f}")
            total = sum(self.gpu.values()) + st.activations + int(FRAGMENTATION * st.activations)
            lines.append(f"    {'= total with weights, optimizer, overhead, fragmentation':56s} {total / GIB:8.2f}")
        lines.append(f"  {'peak per GPU':58s} {self.peak / GIB:8.2f}")
        lines.append(f"  {'host per node':58s} {sum(self.host.values()) / GIB:8.2f}"
                     + ("" if self.host_bytes is None else f"  (of {self.host_bytes / GIB:.0f})"))
        for k, v in self.host.items():
            lines.append(f"    {k:56s} {v / GIB:8.2f}")
        lines.append(f"  -> {self.verdict()}")
        for change, alt, note in self.suggestions:
            if alt is None:
                lines.append(f"     try {change}: {note}")
            else:
                lines.append(f"     try {change}: {alt.peak / GIB:.1f} GiB per GPU, "
                             f"{'fits' if alt.fits else 'does not fit'}"
                             + ("" if alt.supported else " (not supported by the job)")
                             + (f"; {note}" if note else ""))
        return "\n".join(lines)


def plan(config, *, pattern, gpus_per_node: int = 1, nodes: int = 1, gpu_gib: float = 80.0,
         host_gib: float | None = None, micro_batch: int = 1, dense_seq_len: int | None = 4096,
         sparse_seq_len: int | None = 4096, weights: str = "auto", zero: int = 2, offload_param: bool = False,
         offload_saved: bool = True, target: str = "centroid", dtype_bytes: int = 2, optimizer: str = "deepspeed",
         fp32_modules: bool = True, random_init: bool = False, name: str | None = None,
         suggest: bool = True, _inventory: Inventory | None = None) -> Plan:
    """The memory plan of distilling `config` (a transformers config) under `pattern` (a distill.pattern.Pattern).

    gpu_gib / host_gib: memory per GPU and per node in GiB (host None: not checked); dense_seq_len / sparse_seq_len:
    T of each stage (None: the stage does not run); weights 'fp8' | 'bf16' | 'auto' (FP8 when the config has a
    block-FP8 quantization_config); zero 1 | 2 | 3; offload_param: ZeRO-3 parameters on the host (about two layers
    resident); optimizer 'deepspeed' (fp32 master + 2 moments + fp32 gradient partition, sharded over the world) or
    'torch' (a plain AdamW, moments in the parameters' dtype: the benches); random_init: the model is built from a
    config on the host in fp32 (no checkpoint) before it moves to the GPU."""
    world = gpus_per_node * nodes
    fp8 = BlockFp8.of(config) is not None if weights == "auto" else weights == "fp8"
    inv = _inventory or inventory(config, pattern, fp8, dtype_bytes, fp32_modules)
    s = Shapes.of(config)
    groups = pattern.groups()
    G = max(len(m) for m in groups.values()) if target == "centroid" else 1
    F = len(groups)
    B, a = micro_batch, dtype_bytes

    unsupported = []
    if offload_param and zero != 3:
        unsupported.append("parameter offload needs ZeRO-3 (deepspeed=zero3_offload)")

    layer = max(inv.layer)
    gpu: dict[str, int] = {}
    if zero == 3 and offload_param:
        gpu["weights: two whole layers (offload: this one and the next, prefetched)"] = 2 * layer
        gpu["offload staging: the largest parameter's shard, copied in before its gather"] = inv.largest_param // world
        gpu["buffers, whole on every GPU (FP8 scales, RoPE tables)"] = inv.replicated
    elif zero == 3:
        gpu["weights: 1/world shard (ZeRO-3)"] = (inv.total - inv.replicated) // world
        gpu["buffers, whole on every GPU (FP8 scales, RoPE tables)"] = inv.replicated
        # one process: the shard is the whole parameter and DeepSpeed's gather allocates nothing (measured:
        # bench.sharded, docs/BENCHMARKS.md)
        gpu["gathered layers (ZeRO-3: this one and the next, prefetched)"] = 2 * layer if world > 1 else 0
    else:
        gpu[f"weights ({'block-FP8' if fp8 else 'bf16'}, replicated under ZeRO-{zero})"] = inv.total
    P = inv.trainable
    if optimizer == "torch":
        gpu["indexer optimizer: torch AdamW, 2 moments + gradients in param dtype"] = 3 * inv.trainable_bytes
    else:
        gpu["indexer optimizer: fp32 master + 2 moments + fp32 grad, / world"] = 16 * P // world
        grads = 2 * P if zero == 1 else 2 * P // world + 2 * min(P, DS_BUCKET_ELEMENTS)
        gpu[f"indexer gradients bf16 (ZeRO-{zero}{': + reduce bucket' if zero > 1 else ''})"] = grads
    gpu["framework: CUDA context, cuBLAS/cuDNN, NCCL (constant)"] = FRAMEWORK_BYTES

    stages = []
    for stage, T in (("dense", dense_seq_len), ("sparse", sparse_seq_len)):
        if not T:
            continue
        terms = {"residual stream (hidden, normed, attention / MLP out) x streams":
                 4 * B * T * s.hidden * a * s.streams}
        terms.update(group_terms(s, B, T, G, stage, a))
        saved = saved_per_f_layer(s, B, T, a)
        if not offload_saved:
            terms["indexer saved tensors, every F layer (offload_saved=false)"] = F * saved
        transient = {f"attention of the group's last layer ({'expanded' if stage == 'dense' else 'absorbed'})":
                     attention_transient(s, B, T, stage, a),
                     "MLP (dense gate/up, or MoE routing + the routed experts)": mlp_transient(s, B, T, a, fp8),
                     "fused loss (scratch, LSE copy, input gradients)": loss_transient(s, B, T, G, stage, a)}
        if stage == "sparse":
            transient["F layer's selection (top-k scratch, projections)"] = topk_transient(s, B, T, a)
        activations = sum(terms.values()) + max(transient.values())
        stages.append(StagePlan(stage, T, terms, transient, activations, F * saved if offload_saved else 0))
    fixed = sum(gpu.values())
    peak = max((fixed + st.activations + int(FRAGMENTATION * st.activations) for st in stages), default=fixed)

    host: dict[str, int] = {}
    host_saved = max((st.host_saved for st in stages), default=0)
    if host_saved:
        host["pinned offload buffers (every F layer's saved tensors) x GPUs"] = host_saved * gpus_per_node
    if zero == 3 and offload_param:
        host["CPU-offloaded weights (the node's ranks' shards)"] = (inv.total - inv.replicated) * gpus_per_node // world
    if random_init:
        host["random init: the whole model in fp32 per rank, then cast"] = inv.params * 4 * gpus_per_node
    else:
        host["loading: one checkpoint tensor at a time per rank"] = inv.largest_tensor * gpus_per_node
    setting = {"nodes": nodes, "gpus_per_node": gpus_per_node, "weights": "fp8" if fp8 else "bf16", "zero": zero,
                   "offload_param": offload_param, "micro_batch": B, "dense_seq_len": dense_seq_len,
                   "sparse_seq_len": sparse_seq_len, "pattern": str(pattern), "G": G, "f_layers": F,
                   "pattern_desc": _describe(pattern), "offload_saved": offload_saved, "target": target}
    result = Plan(name or config.model_type, setting, gpu, stages, peak, int(gpu_gib * GIB), host,
                  None if host_gib is None else int(host_gib * GIB), not unsupported, unsupported)
    if suggest and not result.fits:
        again = {"pattern": pattern, "gpus_per_node": gpus_per_node, "nodes": nodes, "gpu_gib": gpu_gib,
                     "host_gib": host_gib, "micro_batch": micro_batch, "dense_seq_len": dense_seq_len,
                     "sparse_seq_len": sparse_seq_len, "weights": "fp8" if fp8 else "bf16", "zero": zero,
                     "offload_param": offload_param, "offload_saved": offload_saved, "target": target,
                     "dtype_bytes": dtype_bytes, "optimizer": optimizer, "fp32_modules": fp32_modules,
                     "random_init": random_init, "name": name, "suggest": False}
        result.suggestions = _suggestions(config, again, inv)
    return result


def _describe(pattern) -> str:
    text = str(pattern)
    return text if len(text) <= 16 else f"{len(pattern.full_layers)} F of {len(text)}"


def _suggestions(config, kw: dict, inv: Inventory) -> list[tuple[str, Plan | None, str]]:
    """Settings that would make a plan fit, each planned: fewer tokens, micro batch 1, the saved tensors offloaded,
    FP8 weights, ZeRO-3, parameter offload, more nodes."""
    out = []

    def tried(change, note="", **over):
        fp8_changed = "weights" in over and over["weights"] != kw["weights"]
        out.append((change, plan(config, **{**kw, **over}, _inventory=None if fp8_changed else inv), note))

    same = kw["dense_seq_len"] == kw["sparse_seq_len"]
    for keys in ((("dense_seq_len", "sparse_seq_len"),) if same else (("dense_seq_len",), ("sparse_seq_len",))):
        T = kw[keys[0]]
        while T and T > 1024:
            T //= 2
            alt = plan(config, **{**kw, **dict.fromkeys(keys, T)}, _inventory=inv)
            if alt.fits:
                out.append((f"distill.{'seq_len' if same else keys[0]}={T}", alt, "fewer tokens per step"))
                break
    if kw["micro_batch"] > 1:
        tried("distill.micro_batch_size=1", "raise distill.grad_accum to keep the batch", micro_batch=1)
    if not kw["offload_saved"]:
        tried("distill.offload_saved=true", offload_saved=True)
    if kw["weights"] == "bf16":
        tried("the block-FP8 checkpoint (model.path=<FP8 directory>)", weights="fp8")
    if kw["zero"] != 3:
        tried("deepspeed=zero3", "weights partitioned over the world", zero=3)
    for nodes in (2 * kw["nodes"], 4 * kw["nodes"]):
        tried(f"{nodes} nodes with deepspeed=zero3", "a smaller weight shard", nodes=nodes, zero=3)
    if not kw["offload_param"]:
        tried("deepspeed=zero3_offload", "ZeRO-3 with the parameters on the host", zero=3, offload_param=True)
    return out


# ---- the job's check ----------------------------------------------------------------------------------------
def _host_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def job_plan(cfg, config, pattern, ds_config: dict, world_size: int, device: torch.device) -> Plan | None:
    """The plan of the job `cfg` (a composed conf/config.yaml), None where there is nothing to check (the CPU without
    plan.gpu_gib). plan.gpu_gib / host_gib / gpus_per_node default to this machine's (the device's memory, the host's
    physical memory, LOCAL_WORLD_SIZE)."""
    p = cfg.get("plan") or {}
    gpu_gib = p.get("gpu_gib")
    if gpu_gib is None:
        if device.type != "cuda":
            return None
        gpu_gib = torch.cuda.get_device_properties(device).total_memory / GIB
    host_gib = p.get("host_gib")
    if host_gib is None and device.type == "cuda" and _host_memory():
        host_gib = _host_memory() / GIB
    per_node = int(p.get("gpus_per_node") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    per_node = max(1, min(per_node, world_size))
    d = cfg.distill
    dense_T = d.get("dense_seq_len") or d.seq_len
    sparse_T = d.get("sparse_seq_len") or d.seq_len
    zero = ds_config.get("zero_optimization", {})
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    offload_saved = d.offload_saved if isinstance(d.offload_saved, bool) else device.type == "cuda"
    return plan(config, pattern=pattern, gpus_per_node=per_node, nodes=max(1, world_size // per_node),
                gpu_gib=gpu_gib, host_gib=host_gib, micro_batch=d.micro_batch_size,
                dense_seq_len=dense_T if d.dense_steps else None, sparse_seq_len=sparse_T if d.sparse_steps else None,
                zero=zero.get("stage", 1), offload_param=offload_param, offload_saved=offload_saved, target=d.target,
                dtype_bytes=resolve_dtype(cfg.model.get("dtype"), device).itemsize,
                fp32_modules=bool(cfg.model.get("path")), random_init=not cfg.model.get("path"),
                name=cfg.model.get("name"))


class PlanError(ValueError):
    """The memory plan does not fit."""


def check_plan(cfg, config, pattern, ds_config: dict, world_size: int, device: torch.device) -> Plan | None:
    """Refuse, with one line naming the fix and the override, a job whose plan does not fit (plan.check=false: run
    it anyway, with the plan's verdict printed)."""
    result = job_plan(cfg, config, pattern, ds_config, world_size, device)
    if result is None or result.fits:
        return result
    check = (cfg.get("plan") or {}).get("check", True)
    line = (f"plan: {result.name} {result.verdict()}; fix: {result.fix()}; or plan.check=false to run it anyway "
            "(python -m train.plan prints the plan)")
    if check:
        raise PlanError(line)
    print(f"[distill] warning: {line}", file=sys.stderr, flush=True)
    return result


# ---- the command line ---------------------------------------------------------------------------------------
def named_config(model: str, weights: str = "auto"):
    """(transformers config, name, from a directory) of `model`: a NAMED model, a conf/model/<name>.yaml, or a
    model directory; FP8 named models get the published block-FP8 quantization_config."""

    if model in NAMED:
        title, model_type = NAMED[model]
        config = MODEL_TYPES[model_type][0]()
        if weights == "fp8":
            config.quantization_config = dict(FP8_QUANTIZATION)
        return config, title, True
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf", "model", f"{model}.yaml")
    if os.path.isfile(here):
        cfg = OmegaConf.to_container(OmegaConf.load(here), resolve=False)
        return model_config(cfg), cfg.get("name", model), bool(cfg.get("path"))
    if os.path.isdir(model):
        return model_config({"path": model}), model, True
    raise SystemExit(f"--model {model!r}: not one of {sorted(NAMED)}, a conf/model name or a model directory")


def allocated_peak(result: Plan) -> dict:
    """What a benchmark measures of the plan's first stage: the peak GiB allocated above the allocation before the
    step (weights and optimizer state: the step's activations and the gradients its backward makes) and in all
    (allocated: no framework overhead, which torch's allocator does not see)."""
    st = result.stages[0]
    base = sum(v for k, v in result.gpu.items() if not k.startswith("framework"))
    grads = 0  # set to None before each step; the step's backward makes them
    for k, v in result.gpu.items():
        if "torch AdamW" in k:
            grads = v // 3
    above = st.activations + grads
    return {"stage": st.stage, "seq_len": st.seq_len, "peak_gib": above / GIB, "peak_total_gib": (base + above) / GIB}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek_v32",
                        help=f"one of {sorted(NAMED)}, a conf/model name (tiny_glm, ...) or a model directory")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=141.0, help="memory per GPU, GiB (H200 141, H100 80)")
    parser.add_argument("--host-gib", type=float, default=None, help="host memory per node, GiB (unchecked if unset)")
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--dense-seq-len", type=int, default=None)
    parser.add_argument("--sparse-seq-len", type=int, default=None)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--retention", type=float, default=0.25)
    parser.add_argument("--freq", type=int, default=None)
    parser.add_argument("--target", choices=("centroid", "own"), default="centroid")
    parser.add_argument("--weights", choices=("auto", "fp8", "bf16"), default="auto",
                        help="auto: FP8 for a block-FP8 directory, FP8 for a named model, else bf16")
    parser.add_argument("--zero", type=int, choices=(1, 2, 3), default=2)
    parser.add_argument("--offload-param", action="store_true", help="ZeRO-3 parameters offloaded to the host")
    parser.add_argument("--no-offload-saved", action="store_true", help="keep the indexers' saved tensors on the GPU")
    parser.add_argument("--stage", choices=("dense", "sparse", "both"), default="both")
    args = parser.parse_args(argv)
    weights = "fp8" if args.weights == "auto" and args.model in NAMED else args.weights
    config, title, from_dir = named_config(args.model, weights)
    pattern = resolve_pattern(family_of(config).num_dsa_layers(config), args.pattern,
                              None if args.pattern or args.freq else args.retention, args.freq)
    dense_T = args.dense_seq_len or args.seq_len
    sparse_T = args.sparse_seq_len or args.seq_len
    result = plan(config, pattern=pattern, gpus_per_node=args.gpus, nodes=args.nodes, gpu_gib=args.gpu_gib,
                  host_gib=args.host_gib, micro_batch=args.micro_batch,
                  dense_seq_len=dense_T if args.stage != "sparse" else None,
                  sparse_seq_len=sparse_T if args.stage != "dense" else None, weights=weights, zero=args.zero,
                  offload_param=args.offload_param, offload_saved=not args.no_offload_saved, target=args.target,
                  fp32_modules=from_dir, random_init=not from_dir, name=title)
    print(result.table())


if __name__ == "__main__":
    main()

