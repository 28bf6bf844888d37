"""Shared test helpers: the repository root, the tiny random models of conf/model/, and the single-process job
runs (tests/jobs.py) that test_job and test_reliability both resume from.

Without a GPU the whole suite runs the Triton kernels on Triton's CPU interpreter, switched on here, before any test
module is collected (not as a side effect of importing one); tests of what happens without it unset
TRITON_INTERPRET themselves (monkeypatch)."""
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from kernels import enable_cpu_interpreter
from train.model import build_model

if not torch.cuda.is_available():
    enable_cpu_interpreter()

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


@pytest.fixture(scope="session")
def kill_runs(tmp_path_factory):
    """Once per session, side by side: the run dirs of an uninterrupted single-process run of KILL_STEPS and of one
    SIGKILLed while writing its step-6 checkpoint; a test that changes one changes a copy (copy_run)."""
    from tests.jobs import KILL_STEPS, jobs  # here, not at the top: tests.jobs imports ROOT from this module
    straight, killed = (tmp_path_factory.mktemp(name) / "run" for name in ("straight", "killed_in_save"))
    jobs(((straight.parent, straight, *KILL_STEPS), {}),
         ((killed.parent, killed, *KILL_STEPS), {"faults": "kill_in_save@6", "returncode": -signal.SIGKILL}))
    return straight, killed


@pytest.fixture
def straight_run(kill_runs):
    """kill_runs' uninterrupted run: the weights a killed run resumes to."""
    return kill_runs[0]


@pytest.fixture
def killed_in_save_run(kill_runs):
    """kill_runs' run killed while writing step_6 (latest: step_4)."""
    return kill_runs[1]
