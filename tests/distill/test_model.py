"""Building and loading the backbone (train/model.py)."""
import torch
from omegaconf import OmegaConf

from tests.conftest import ROOT
from train.model import build_model


def test_bf16_model_keeps_rope_frequencies_in_fp32(tmp_path):
    """A bf16 random model holds RoPE's inv_freq in fp32, the same values as the fp32 model and as a bf16
    `from_pretrained` of it: the phases at long context do not depend on how the model was made."""
    cfg = OmegaConf.load(f"{ROOT}/conf/model/tiny_glm.yaml")
    fp32 = build_model(cfg)
    cfg.dtype = "bfloat16"
    bf16 = build_model(cfg)
    bf16.save_pretrained(tmp_path / "model")
    loaded = build_model(OmegaConf.create({"path": str(tmp_path / "model"), "dtype": "bfloat16", "config": {}}))
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    for model in (bf16, loaded):
        for name in ("inv_freq", "original_inv_freq"):
            freq = getattr(model.model.rotary_emb, name)
            assert freq.dtype == torch.float32 and torch.equal(freq, fp32.model.rotary_emb.inv_freq)
