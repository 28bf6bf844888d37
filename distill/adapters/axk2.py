"""A.X-K2 (transformers `axk2`): token-level MLA DSA like DeepSeek-V3.2 (interleaved RoPE in the main attention,
a V3.2 indexer with half-split RoPE on the front dims), but the query and an output gate come from one fused
projection `q_gate_proj([q_resid, q_a_proj(x)])` (the heads' output times sigmoid(gate), in fp32), and the
layer norms are gated (`AXK2GatedRMSNorm`, called as modules). No attention sinks; transformers has no
cross-layer sharing for it (`indexer_types` is not read)."""
from transformers import AXK2Config, AXK2ForCausalLM

from distill.adapters.mla import MlaDsaFamily

FAMILY = MlaDsaFamily(model_type="axk2", indexer_rope="half", causal_lm=AXK2ForCausalLM, config_class=AXK2Config,
                      output_gate="q_gate_proj")
