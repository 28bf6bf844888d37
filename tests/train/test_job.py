"""The distillation job end to end: single process, torchrun + DeepSpeed on two CPU processes, resume, sweeps."""
import json
import re
import shutil
import signal
import subprocess
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from distill.pattern import PatternError
from distill.source import ModelConfigError
from tests.conftest import ROOT, tiny
from tests.jobs import KILL_STEPS, QUICK, cfg, copy_run, job, jobs, launcher_env, metrics
from train.checkpoint import CheckpointError
from train.distill import prepare
from train.errors import ConfigError

pytestmark = pytest.mark.slow  # jobs in processes of their own, or the whole job in this one


def stage(zero: str) -> list[str]:
    """Overrides for a ZeRO stage; ZeRO-3 partitions even the tiny model's parameters (all under 1e5 elements)."""
    return [f"deepspeed={zero}", *(["deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]
                                   if zero == "zero3" else [])]


def indexers(run_dir, step):
    """The indexer weights of a run's checkpoint of `step`."""
    return load_file(run_dir / "checkpoints" / f"step_{step}" / "indexers.safetensors")


def assert_close_indexers(actual, expected):
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-4, atol=1e-5)


def same_indexers(run_a, run_b, step):
    a, b = indexers(run_a, step), indexers(run_b, step)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the two-process run each ZeRO stage makes once (two_process_run): three groups, dense and sparse steps, a checkpoint
# every step, a full-model export; on the stages test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere
# checks, rank 0's gradient is NaN at step 3
TWO_PROCESS = ["distill.pattern=FSSFSSFS", "distill.dense_steps=4", "distill.sparse_steps=2", "distill.save_every=1",
               "distill.keep_checkpoints=6", "distill.eval_every=6", "export.full_model=true"]
NAN_GRAD_AT_3 = ("zero2", "zero3")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """two_process_run(zero): the (run dir, output) of the stage's TWO_PROCESS run, made on first use."""
    runs = {}

    def get(zero):
        if zero not in runs:
            run_dir = tmp_path_factory.mktemp(f"two_process_{zero}") / "run"
            out = job(run_dir.parent, run_dir, *TWO_PROCESS, *stage(zero), nproc=2,
                      faults="nan_grad@3" if zero in NAN_GRAD_AT_3 else None)
            runs[zero] = run_dir, out
        return runs[zero]
    return get


def test_single_process_run_distils_and_exports(tmp_path):
    run_dir = tmp_path / "run"
    job(tmp_path, run_dir, "distill.dense_steps=12", "distill.sparse_steps=4", "distill.eval_every=4",
        "distill.save_every=8", "logger=offline", "distill.lr=1e-2")
    evals = [m["eval/loss"] for m in metrics(run_dir) if "eval/loss" in m]
    assert len(evals) == 4
    assert evals[2] < 0.8 * evals[0]  # the dense-stage distillation loss falls
    assert all(0 < m["eval/recall"] <= 1 for m in metrics(run_dir) if "eval/recall" in m)
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_16"
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert manifest["pattern"] == "FSSSFSSS"
    assert manifest["training_config"]["distill"]["pattern"] is None and "cache_dir" not in manifest["training_config"]
    trained = indexers(run_dir, 16)
    exported = load_file(run_dir / "export" / "indexers.safetensors")
    assert trained.keys() == exported.keys() and all(torch.equal(trained[k], exported[k]) for k in trained)


def test_two_process_launch_zero3_ends_with_an_export_transformers_loads(two_process_run):
    from transformers import AutoModelForCausalLM
    run_dir, out = two_process_run("zero3")
    assert "world 2" in out
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model")
    assert type(model).__name__ == "GlmMoeDsaForCausalLM"
    assert model.config.indexer_types == ["full", "shared", "shared", "full", "shared", "shared", "full", "shared"]
    trained = indexers(run_dir, 6)
    state = model.state_dict()
    assert sorted({int(k.split(".")[2]) for k in trained}) == [0, 3, 6]
    assert all(torch.equal(state[k], v) for k, v in trained.items())


def test_killed_run_resumes_to_the_same_weights(tmp_path, straight_run):
    """SIGKILL after the first checkpoint, then resume=auto: the final indexers equal an uninterrupted run's."""
    killed = tmp_path / "killed"
    proc = job(tmp_path, killed, *KILL_STEPS, wait=False)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not (latest.exists() and latest.read_text() in ("step_2", "step_4")) and proc.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text() in ("step_2", "step_4")
    out = job(tmp_path, killed, *KILL_STEPS)
    assert "resumed at step" in out
    assert same_indexers(straight_run, killed, 8)


def test_retention_sweep_makes_one_run_and_export_per_ratio(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        ["bash", "launch/distill.sh", "-m", "distill.retention=0.5,0.25", *QUICK, "distill.dense_steps=2",
         "distill.sparse_steps=0", "distill.eval_every=2", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=launcher_env(tmp_path, 1), capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    patterns = sorted(json.loads(p.read_text())["pattern"] for p in sweep.glob("*/export/manifest.json"))
    assert patterns == ["FSFSFSFS", "FSSSFSSS"]


@pytest.mark.parametrize("overrides, error, message", [
    (["distill.pattern=FSSF"], PatternError, "has 4 letters but the model has 8"),
    (["distill.pattern=FSXSFSSS"], PatternError, "only 'F'"),
    (["distill.retention=0.05"], PatternError, "rounds to 0 F layers"),
    (["distill.seq_len=4096"], ConfigError, "exceeds the model's max_position_embeddings"),
    (["model.type=llama"], ModelConfigError, "not a DSA model type"),
    (["+deepspeed.train_batch_size=64"], ConfigError, "conflicts with distill.micro_batch_size"),
    (["distill.dense_steps=0", "distill.sparse_steps=0"], ConfigError, "at least one step"),
    (["deepspeed.zero_optimization.stage=0"], ConfigError, "needs ZeRO stage 1, 2 or 3"),
    (["deepspeed.bf16.enabled=true", "+deepspeed.bf16.check_grad_overflow=false"], ConfigError,
     "bf16.check_grad_overflow left on"),
    # a value that is set is used, and refused with its key named (no fall-through to distill.retention)
    (["distill.freq=0"], PatternError, r"distill\.freq=0: freq must be a positive integer"),
    (["distill.pattern=''"], PatternError, r"distill\.pattern='': pattern is empty"),
    (["distill.retention=abc"], PatternError, r"distill\.retention='abc'"),
    # every other key the job reads, checked before the weights, the data, training and the export
    (["distill.kernel=fast"], ConfigError, r"distill\.kernel 'fast' is not one of"),
    (["distill.kernel=triton"], ConfigError, "needs a CUDA device"),
    (["export.keep_shared_indexers=true"], ConfigError, "it needs export.full_model=true"),
    (["export.full_model=yes"], ConfigError, "export.full_model must be true or false"),
    (["deepspeed=zero3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=abc"], ConfigError,
     "DeepSpeed refuses the config"),
    (["+deepspeed.zero_optimization.overlap_com=true"], ConfigError, "DeepSpeed refuses the config"),
    (["distill.lr=-1"], ConfigError, r"distill\.lr must be a number > 0"),
    (["distill.betas=[0.9]"], ConfigError, r"distill\.betas must be a list of 2 numbers"),
    (["distill.seq_len=64.5"], ConfigError, r"distill\.seq_len must be an integer"),
    (["distill.target=both"], ConfigError, r"distill\.target='both' is not one of"),
    (["distill.loss_reduction=max"], ConfigError, r"distill\.loss_reduction='max' is not one of"),
    (["distill.eval_batches=0"], ConfigError, "lm_eval=true evaluates on the validation batches"),
    (["model.dtype=int8"], ModelConfigError, "model.dtype 'int8'"),
    (["logger.mode=off"], ConfigError, r"logger\.mode='off' is not one of"),
    (["device=cuda"], ConfigError, "no CUDA device is visible"),
    (["resume=/nonexistent/step_4"], CheckpointError, "is no checkpoint directory"),
])
def test_bad_config_is_refused_before_any_work(tmp_path, monkeypatch, overrides, error, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # tests/conftest.py sets it for the suite
    with pytest.raises(error, match=message):
        prepare(cfg(*overrides), str(tmp_path), world_size=2, device=torch.device("cpu"))


def test_a_user_error_is_one_line_without_a_traceback(tmp_path):
    """A bad pattern: one `error:` line naming the key and what is wrong (on one process, and from rank 0 alone on
    two), exit status 2 and no traceback; with HYDRA_FULL_ERROR=1, the traceback."""
    said = "error: distill.pattern='FSSF': pattern 'FSSF' has 4 letters but the model has 8 DSA layers"
    short, two, full = jobs(((tmp_path, tmp_path / "short", "distill.pattern=FSSF"), {"returncode": 2}),
                            ((tmp_path, tmp_path / "two", "distill.pattern=FSSF"), {"nproc": 2, "returncode": None}),
                            ((tmp_path, tmp_path / "full", "distill.pattern=FSSF"),
                             {"returncode": None, "extra_env": {"HYDRA_FULL_ERROR": "1"}}))
    assert [line for line in short.splitlines() if "FSSF" in line] == [said] and "Traceback" not in short
    assert [line for line in two.splitlines() if "FSSF" in line] == [said] and "exitcode: 2" in two
    assert "Traceback" in full and "PatternError: distill.pattern='FSSF'" in full


def test_model_directory_without_dsa_is_refused(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelConfigError, match="no DSA indexers"):
        prepare(cfg("model=local", f"model.path={tmp_path / 'llama'}"), str(tmp_path), 1, torch.device("cpu"))


def test_checkpoint_of_another_pattern_or_model_is_refused(tmp_path):
    step = tmp_path / "checkpoints" / "step_4"
    step.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_4")
    c = cfg()
    from omegaconf import OmegaConf
    model = OmegaConf.to_container(c.model, resolve=True)
    (step / "meta.json").write_text(json.dumps({"pattern": "FSFSFSFS", "model": model, "step": 4}))
    with pytest.raises(CheckpointError, match="pattern 'FSFSFSFS'"):
        prepare(c, str(tmp_path), 1, torch.device("cpu"))
    (step / "meta.json").write_text(json.dumps({"pattern": "FSSSFSSS", "model": {**model, "init_seed": 7}}))
    with pytest.raises(CheckpointError, match="another model"):
        prepare(c, str(tmp_path), 1, torch.device("cpu"))
    (step / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        prepare(c, str(tmp_path), 1, torch.device("cpu"))
    assert prepare(cfg("resume=never"), str(tmp_path), 1, torch.device("cpu")).resume_from is None
    (step / "meta.json").write_text(json.dumps({"pattern": "FSSSFSSS", "model": model, "world_size": 2}))
    assert prepare(c, str(tmp_path), 1, torch.device("cpu")).ds_config["checkpoint"] == {"load_universal": True}
    assert prepare(c, str(tmp_path), 2, torch.device("cpu")).ds_config["checkpoint"] == {"load_universal": False}


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
    steps = ["distill.dense_steps=5", "distill.sparse_steps=0", "distill.eval_every=100", "distill.log_every=1"]
    run_dir = tmp_path / "skip"
    skipped, stopped = jobs(((tmp_path, run_dir, *steps), {"faults": "nan_loss@2"}),
                            ((tmp_path, tmp_path / "stop", *steps, "distill.max_bad_steps=3"),
                             {"faults": "nan_loss@2,nan_grad@3,nan_loss@4", "returncode": None}))
    assert "step 2: non-finite loss on some rank, step skipped (1 in a row)" in skipped
    assert any(m.get("train/skipped_nonfinite") == 1 and m["step"] == 2 for m in metrics(run_dir))
    assert "3 steps in a row with a non-finite loss or gradient (last at step 4: loss); stopping" in stopped


@pytest.mark.parametrize("zero", NAN_GRAD_AT_3)
def test_nonfinite_gradient_on_one_rank_skips_the_step_everywhere(tmp_path, two_process_run, zero):
    """NaN gradients on rank 0 only, with finite losses: no rank updates, and the run then goes on as if
    that step's batch had been skipped (same weights, after the dense and sparse steps, as a run whose step 3 had
    a NaN loss)."""
    grad, out = two_process_run(zero)  # nan_grad@3
    assert "step 3: non-finite gradient on some rank, step skipped (1 in a row)" in out
    before, skipped, after = (indexers(grad, s) for s in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) and torch.isfinite(after[k]).all() for k in before)
    assert not all(torch.equal(skipped[k], after[k]) for k in before)
    job(tmp_path, tmp_path / "loss", *TWO_PROCESS, *stage(zero), nproc=2, faults="nan_loss@3")
    assert same_indexers(grad, tmp_path / "loss", 6)


# the runs of local_model_runs: tiny_glm saved as a model directory, dense and sparse steps of 6 rows each, in
# micro-batches accumulated over 3, every step logged
ACCUM = ["distill.dense_steps=3", "distill.sparse_steps=1", "distill.grad_accum=3", "distill.eval_every=100",
         "distill.log_every=1", "export.enabled=false"]


@pytest.fixture(scope="module")
def local_model_runs(tmp_path_factory):
    """Once, side by side: {zero: (run dir, output)} of ACCUM under ZeRO-2 on one process (micro-batches of 2 rows)
    and ZeRO-3 on two (of 1 row): the same 6 rows a step."""
    model = tmp_path_factory.mktemp("local_model") / "model"
    tiny("tiny_glm").save_pretrained(model)
    zero2, zero3 = (tmp_path_factory.mktemp(f"local_{zero}") / "run" for zero in ("zero2", "zero3"))
    steps = ["model=local", f"model.path={model}", *ACCUM]
    outs = jobs(((zero2.parent, zero2, *steps, *stage("zero2"), "distill.micro_batch_size=2"), {}),
                ((zero3.parent, zero3, *steps, *stage("zero3"), "distill.micro_batch_size=1"), {"nproc": 2}))
    return {"zero2": (zero2, outs[0]), "zero3": (zero3, outs[1])}


def test_zero3_follows_zero2_with_gradient_accumulation(local_model_runs):
    """ZeRO-3 accumulates every micro-batch's gradient (it kept only the last one when all forwards ran before
    the backwards): the same weights and gradient norms as ZeRO-2 after dense and sparse steps."""
    (zero2, _), (zero3, _) = local_model_runs["zero2"], local_model_runs["zero3"]
    assert_close_indexers(indexers(zero3, 4), indexers(zero2, 4))
    grad_norms = [[m["train/grad_norm"] for m in metrics(run) if "train/grad_norm" in m] for run in (zero2, zero3)]
    assert len(grad_norms[0]) == 4 and grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-4)


def test_zero3_loads_a_model_directory_partitioned(local_model_runs):
    """Under ZeRO-3 a model directory loads straight into shards, here of two processes (a model larger than one
    GPU loads), and the run trains as ZeRO-2 does on the same weights and rows."""
    (zero2, out2), (zero3, out3) = local_model_runs["zero2"], local_model_runs["zero3"]
    assert "world 2" in out3 and "backbone loaded partitioned" in out3 and "backbone loaded partitioned" not in out2
    assert_close_indexers(indexers(zero3, 4), indexers(zero2, 4))


def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, straight_run, killed_in_save_run):
    run_dir = copy_run(killed_in_save_run, tmp_path)  # SIGKILLed while writing step_6
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_4"
    assert (run_dir / "checkpoints" / "step_6").is_dir()  # DeepSpeed's half of the write happened
    out = job(tmp_path, run_dir, *KILL_STEPS)
    assert "resumed at step 4" in out
    assert same_indexers(straight_run, run_dir, 8)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    steps = ["distill.dense_steps=400", "distill.sparse_steps=0", "distill.save_every=1000", "distill.eval_every=1000",
             "distill.log_every=1"]
    run_dir = tmp_path / "term"
    proc = job(tmp_path, run_dir, *steps, wait=False)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM: checkpoint of step" in out
    step = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 2 <= step < 400
    assert not (run_dir / "export").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pattern=st.one_of(st.none(), st.text(alphabet="FSfsX ,1", max_size=10)),
       retention=st.floats(-0.5, 1.5, allow_nan=False), seq_len=st.integers(-2, 5000),
       steps=st.tuples(st.integers(-1, 3), st.integers(-1, 3)))
def test_config_validation_fuzz(tmp_path, pattern, retention, seq_len, steps):
    overrides = [f"distill.retention={retention}", f"distill.seq_len={seq_len}",
                 f"distill.dense_steps={steps[0]}", f"distill.sparse_steps={steps[1]}",
                 "distill.pattern=" + ("null" if pattern is None else repr(pattern).replace("'", '"')), "resume=never"]
    try:
        prepared = prepare(cfg(*overrides), str(tmp_path), 1, torch.device("cpu"))
    except (PatternError, ValueError) as e:
        # the refusal names the key the user set (distill.pattern, distill.retention, distill.seq_len, ...)
        assert re.search(r"\bdistill\.(pattern|retention|seq_len|dense_steps|sparse_steps|freq)\b", str(e)), str(e)
    else:
        pattern = prepared.pattern
        assert len(pattern) == 8 and str(pattern)[0] == "F" and 1 <= seq_len <= 1024
        assert prepared.ds_config["train_batch_size"] == 2


@pytest.mark.parametrize("zero", ["zero1", "zero2", "zero3"])
def test_two_process_checkpoint_resumes_on_one_process(tmp_path, two_process_run, zero):
    """A ZeRO checkpoint of 2 processes, re-sharded (universal) to 1 process with the same global batch,
    continues the same trajectory: step 6 matches the uninterrupted 2-process run's step 6."""
    source, _ = two_process_run(zero)
    two = indexers(source, 6)
    run_dir = copy_run(source, tmp_path)
    for step in (5, 6):
        shutil.rmtree(run_dir / "checkpoints" / f"step_{step}")
    (run_dir / "checkpoints" / "latest").write_text("step_4")
    out = job(tmp_path, run_dir, *TWO_PROCESS, *stage(zero), "distill.micro_batch_size=1", "distill.grad_accum=4")
    assert "resumed at step 4" in out and "world 1" in out
    one, four = indexers(run_dir, 6), indexers(run_dir, 4)
    assert_close_indexers(one, two)
    assert all(not torch.allclose(one[k], four[k]) for k in two)  # it did train from step 4 to 6
