"""No T x T tensor on any path a user runs (DESIGN.md section 3), and memory that holds one group.

Every op's outputs are watched through a TorchDispatchMode on a tiny model at a T where T^2 dwarfs
everything else (T = 1024: T^2 = 1M elements against T * hidden = 64K, T * vocab = 266K): training in both
stages (forward and backward), evaluation with recall, the top-k overlap, the greedy search and the end-of-run
LM loss. The chunked paths' element budgets are constants independent of T (64M elements by default, sized
for 128K contexts); here they are set to 32K elements so that at this T they are far below T^2, as the
defaults are at real T. The largest tensor any op creates must stay below T^2 / 8.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import distill.evaluate
import kernels.reference
from distill.evaluate import evaluate, topk_overlap
from distill.objective import Distiller
from distill.pattern import Pattern
from distill.search import greedy_search
from tests.conftest import tiny

T = 1024
BUDGET = 32 << 10


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
    distiller = Distiller(tiny("tiny_glm"), Pattern.parse("FSSSFSSS"))

    def step():
        out = distiller(ids, sparse=sparse, with_recall=True)
        out.loss.backward()
        assert torch.isfinite(out.loss) and all(0 < r <= 1 for r in out.recall.values())

    assert_no_t_by_t(largest(step))


def test_evaluation_overlap_search_and_lm_loss_create_no_t_by_t_tensor(small_budgets, ids):
    model = tiny("tiny_glm")
    assert_no_t_by_t(largest(lambda: evaluate(model, "FSSSFSSS", [ids])))
    assert_no_t_by_t(largest(lambda: evaluate(model, None, [ids])))
    assert_no_t_by_t(largest(lambda: topk_overlap(model, [ids])))
    assert_no_t_by_t(largest(lambda: greedy_search(model, [ids], 0.75)))
