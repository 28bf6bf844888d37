"""Shared test helpers: the repository root and the tiny random models of conf/model/."""
import os

import pytest
from omegaconf import OmegaConf

from train.model import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(name: str):
    """A tiny random model of conf/model/<name>.yaml, fp32 on the CPU."""
    return build_model(OmegaConf.load(os.path.join(ROOT, "conf", "model", f"{name}.yaml")))


@pytest.fixture(scope="module")
def glm():
    return tiny("tiny_glm")


@pytest.fixture(scope="module")
def dsv32():
    return tiny("tiny_dsv32")
