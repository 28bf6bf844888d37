"""A dispatch mode that records every tensor the ops inside it produce (memory-contract tests)."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class OutputShapes(TorchDispatchMode):
    """`with OutputShapes() as shapes: ...`, then shapes.seen (every op output's shape) and shapes.largest (the
    most bytes of one output; Triton's CPU interpreter copies its arguments' storages as byte tensors)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.seen.append(tuple(t.shape))
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out
