"""No T x T tensor on any path a user runs (docs/DESIGN.md section 3), and memory that holds one group.

Every op's outputs are watched through a TorchDispatchMode on a narrow model at a T where T^2 dwarfs every
per-token width (T = 2048: T^2 = 4M elements, against 128 per token for a group's q/k and 260 for the
logits): training in both stages (forward and backward), evaluation with recall, the top-k overlap, the greedy
search and the end-of-run LM loss. The chunked paths' element budgets are constants independent of T (64M
elements by default, sized for 128K contexts); here they are set to 64K elements so that at this T they are
far below T^2, as the defaults are at real T. The largest tensor any op creates must stay below T^2 / 8.
"""
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import distill.evaluate
import kernels.reference
from distill.evaluate import evaluate, topk_overlap
from distill.objective import Distiller
from distill.pattern import Pattern
from distill.search import greedy_search
from tests.conftest import ROOT
from train.model import build_model

T = 2048
BUDGET = 64 << 10
NARROW = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_attention_heads=2,
              num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
              v_head_dim=8, index_n_heads=2, index_head_dim=16, max_position_embeddings=T)


def narrow_model():
    """tiny_glm (8 layers, index_topk 16) with every per-token width far below T / 8."""
    cfg = OmegaConf.load(os.path.join(ROOT, "conf", "model", "tiny_glm.yaml"))
    cfg.config.update(NARROW)
    return build_model(cfg)


class LargestTensor(TorchDispatchMode):
    """Records the largest output (elements) of any op run inside it, and the op."""

    def __init__(self):
        super().__init__()
        self.numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.numel:
                self.numel, self.op = t.numel(), f"{func} -> {tuple(t.shape)}"
        return out


@pytest.fixture
def small_budgets(monkeypatch):
    monkeypatch.setattr(kernels.reference, "CHUNK_ELEMENTS", BUDGET)
    monkeypatch.setattr(distill.evaluate, "CHUNK_ELEMENTS", BUDGET)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0))


def largest(fn) -> LargestTensor:
    with LargestTensor() as watch:
        fn()
    return watch


def assert_no_t_by_t(watch: LargestTensor):
    assert watch.numel < T * T // 8, f"{watch.op}: {watch.numel} elements, T^2 = {T * T}"


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_training_step_creates_no_t_by_t_tensor(small_budgets, ids, sparse):
    distiller = Distiller(narrow_model(), Pattern.parse("FSSSFSSS"))

    def step():
        out = distiller(ids, sparse=sparse, with_recall=True)
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(0 < r <= 1 for r in out.recall.values())

    assert_no_t_by_t(largest(step))


def test_evaluation_overlap_search_and_lm_loss_create_no_t_by_t_tensor(small_budgets, ids):
    model = narrow_model()
    assert_no_t_by_t(largest(lambda: evaluate(model, "FSSSFSSS", [ids])))
    assert_no_t_by_t(largest(lambda: evaluate(model, None, [ids])))
    assert_no_t_by_t(largest(lambda: topk_overlap(model, [ids])))
    assert_no_t_by_t(largest(lambda: greedy_search(model, [ids], 0.75)))
