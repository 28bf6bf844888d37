"""Model families: one module per DSA family says where its DSA layers and indexers are and how they compute.

`family_of(model_or_config)` gives the family of a transformers model or config (by `model_type`); a model
type no module covers gets an error naming the ones that are.
"""
from __future__ import annotations

from distill.adapters import axk2, deepseek_v4, deepseek_v32, glm_moe_dsa, hy_v4
from distill.adapters.family import DsaFamily, NotDSAModelError
from distill.adapters.mla import IndexerInputs, MlaDsaFamily, MlaForms

FAMILIES = {family.model_type: family
            for family in (glm_moe_dsa.FAMILY, deepseek_v32.FAMILY, hy_v4.FAMILY, axk2.FAMILY, deepseek_v4.FAMILY)}

__all__ = ["FAMILIES", "DsaFamily", "IndexerInputs", "MlaDsaFamily", "MlaForms", "NotDSAModelError", "family_of"]


def family_of(model_or_config) -> DsaFamily:
    """The family adapter of a transformers model, config, or model_type string."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise NotDSAModelError(f"model type {model_type!r} has no DSA indexer this framework knows (distillation "
                               "needs a DeepSeek Sparse Attention model); "
                               f"the families it knows: {sorted(FAMILIES)}")
    return FAMILIES[model_type]
