"""DeepSeek-V3.2 (transformers `deepseek_v32`): token-level MLA DSA, half-split indexer RoPE; transformers has
no cross-layer sharing for it (the export converts to GlmMoeDsa, which has)."""
from transformers import DeepseekV32Config, DeepseekV32ForCausalLM

from distill.adapters.mla import MlaDsaFamily

FAMILY = MlaDsaFamily(model_type="deepseek_v32", indexer_rope="half", causal_lm=DeepseekV32ForCausalLM,
                      config_class=DeepseekV32Config, export_as="glm_moe_dsa")
