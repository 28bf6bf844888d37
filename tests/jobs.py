"""The distillation job as the job tests run it (test_job, test_reliability and conftest's kill_runs): the quick
overrides, its config, the job in a fresh process (alone, side by side, or through launch/distill.sh) and what it
leaves in its run directory."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from hydra import compose, initialize_config_dir

from tests.conftest import ROOT

QUICK = ["model=tiny_glm", "data=stdlib_small", "distill.seq_len=64", "distill.micro_batch_size=2",
         "distill.eval_batches=2", "distill.warmup_steps=1", "logger=disabled"]

# the single-process runs of conftest's kill_runs (dense and sparse steps, a checkpoint every second step, every step
# logged), which the killed-run tests of test_job and test_reliability resume
KILL_STEPS = ["distill.dense_steps=6", "distill.sparse_steps=2", "distill.save_every=2", "distill.eval_every=100",
              "distill.log_every=1", "distill.lm_eval=false"]


def cfg(*overrides, hydra=False):
    """The job's config composed from conf/ with QUICK and `overrides`; hydra=True keeps the hydra node."""
    with initialize_config_dir(os.path.join(ROOT, "conf"), version_base="1.3"):
        return compose("config", overrides=[*QUICK, *overrides], return_hydra_config=hydra)


def env(tmp_path):
    return {**os.environ, "DS_ACCELERATOR": "cpu", "INDEXCACHE_CACHE": str(tmp_path.parent / "cache"),
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def launcher_env(tmp_path, nproc):
    """The environment of `bash launch/distill.sh` as with a virtualenv's python called by path, not activated:
    PYTHON names this interpreter, and the `torchrun` and `python` first on PATH are not this interpreter's
    (stand-ins that fail), so the launcher must run the interpreter's own torch.distributed.run."""
    stand_ins = tmp_path.parent / "not_this_venv"
    stand_ins.mkdir(exist_ok=True)
    for exe in ("torchrun", "python"):
        (stand_ins / exe).write_text(f"#!/bin/sh\necho '{exe} from PATH is not this virtualenv' >&2\nexit 97\n")
        (stand_ins / exe).chmod(0o755)
    return {**env(tmp_path), "PATH": f"{stand_ins}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable,
            "NPROC": str(nproc)}


def job(tmp_path, run_dir, *overrides, nproc=None, wait=True, faults=None, returncode=0, extra_env=None):
    """Run the job in a fresh process (DeepSpeed initialises torch.distributed once per process); its output.

    faults: INDEXCACHE_FAULTS for train.faults; returncode: the expected exit status (None: any failure);
    extra_env: more environment variables. wait=False returns the running process instead.
    """
    args = [*QUICK, f"hydra.run.dir={run_dir}", *overrides]
    environ = {**(launcher_env(tmp_path, nproc) if nproc else env(tmp_path)),
               **({"INDEXCACHE_FAULTS": faults} if faults else {}), **(extra_env or {})}
    if nproc:
        cmd = ["bash", "launch/distill.sh", *args]
    else:
        cmd = [sys.executable, "-m", "train.distill", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    ok = proc.returncode != 0 if returncode is None else proc.returncode == returncode  # None: any failure
    assert ok, out[-4000:]
    return out


def jobs(*calls):
    """job(*args, **kwargs) for each (args, kwargs) in calls, side by side (a single-process job keeps one of two
    cores busy, mostly importing); their outputs, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(job, *args, **kwargs) for args, kwargs in calls]]


def metrics(run_dir):
    """The records of a run's metrics.jsonl, in order."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def copy_run(source, tmp_path):
    """A copy of a shared fixture's run directory in this test's tmp_path, for a test to resume or change."""
    return shutil.copytree(source, tmp_path / "run")
