"""GLM-5 (transformers `glm_moe_dsa`): token-level MLA DSA, interleaved indexer RoPE. transformers shares
top-k across layers itself (`config.indexer_types`), so exports load as this family."""
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM

from distill.adapters.mla import MlaDsaFamily

FAMILY = MlaDsaFamily(model_type="glm_moe_dsa", indexer_rope="interleave", causal_lm=GlmMoeDsaForCausalLM,
                      config_class=GlmMoeDsaConfig, export_as="glm_moe_dsa")
