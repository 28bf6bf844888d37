"""Nothing a user does by mistake loses work: run names, the run-directory lock, resume=never, kills of the
launcher, damaged checkpoints, checkpoints and metrics of one run only."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from tests.jobs import KILL_STEPS, QUICK, cfg, copy_run, job, launcher_env, metrics
from train.checkpoint import DamagedCheckpoint
from train.distill import _claim_run_dir, prepare
from train.run_dir import LOCK, RunDirInUse, hold_run_lock

pytestmark = pytest.mark.slow  # jobs in processes of their own, or the whole job in this one

CPU = torch.device("cpu")


def test_run_names_say_what_defines_the_run():
    """An explicit pattern, a freq, a retention and the target each name their own run directory."""
    names = {o: cfg(*o, hydra=True).hydra.run.dir for o in [
        (), ("distill.pattern=FSSFSSSF",), ("distill.pattern=FSSFSSSF", "distill.target=own"), ("distill.freq=4",),
        ("distill.retention=0.5",), ("distill.pattern=" + "F" + "S" * 77,)]}
    assert list(names.values()) == ["runs/tiny_glm-r0.25-centroid", "runs/tiny_glm-FSSFSSSF-centroid",
                                    "runs/tiny_glm-FSSFSSSF-own", "runs/tiny_glm-freq4-centroid",
                                    "runs/tiny_glm-r0.5-centroid", names[("distill.pattern=" + "F" + "S" * 77,)]]
    assert len(set(names.values())) == len(names)
    assert len(os.path.basename(names[("distill.pattern=" + "F" + "S" * 77,)])) < 32  # a hash, not 78 letters


def test_resume_never_moves_an_earlier_run_aside(tmp_path):
    """resume=never starts clean: the earlier checkpoints, export, metrics and config record are moved into
    replaced/<time>/ whole, and the new launch's config is recorded."""
    for name in ("checkpoints/step_4", "export", ".hydra"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_4" / "meta.json").write_text("{}")
    (tmp_path / "export" / "manifest.json").write_text("{}")
    (tmp_path / ".hydra" / "config.yaml").write_text("earlier: run\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    _claim_run_dir(cfg("resume=never"), str(tmp_path))
    [aside] = (tmp_path / "replaced").iterdir()
    assert (aside / "checkpoints" / "step_4" / "meta.json").exists() and (aside / "export" / "manifest.json").exists()
    assert (aside / ".hydra" / "config.yaml").read_text() == "earlier: run\n"
    assert (aside / "metrics.jsonl").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "export").exists()
    assert "resume: never" in (tmp_path / ".hydra" / "config.yaml").read_text()


def test_the_run_lock_refuses_a_second_writer_with_the_holders_pid(tmp_path):
    probe = ("import sys; from train.run_dir import hold_run_lock\n"
             "with hold_run_lock(sys.argv[1]): pass")
    with hold_run_lock(str(tmp_path)):
        proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        assert proc.returncode != 0 and f"is in use by pid {os.getpid()}" in proc.stderr
        with pytest.raises(RunDirInUse), hold_run_lock(str(tmp_path)):  # another open of the file, even in this process
            pass
    proc = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr  # released at the end of the block


def _alive(pid: int) -> bool:
    """True while process `pid` runs (a zombie, dead but not reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_killing_the_launchers_process_group_ends_its_workers_and_frees_the_run(tmp_path):
    """kill -9 of launch/distill.sh's process group (no usable torchrun on PATH) ends the worker, which held the run
    directory's lock: a second job on the directory was refused naming it (and left the running job's config
record alone), and the lock is free afterwards."""
    run_dir = tmp_path / "run"
    args = [*QUICK, f"hydra.run.dir={run_dir}", "distill.dense_steps=100000", "distill.sparse_steps=0",
            "distill.save_every=100000", "distill.eval_every=100000", "distill.log_every=1", "distill.lm_eval=false"]
    launcher = subprocess.Popen(["bash", "launch/distill.sh", *args], cwd=ROOT, env=launcher_env(tmp_path, 1),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    lock, worker = run_dir / LOCK, None
    try:
        deadline = time.time() + 240
        while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 1):
            assert launcher.poll() is None and time.time() < deadline
            time.sleep(0.1)
        worker = int(lock.read_text())
        assert worker != launcher.pid and _alive(worker)
        out = job(tmp_path, run_dir, "distill.dense_steps=4", returncode=None)
        assert f"is in use by pid {worker}" in out
        assert "dense_steps: 100000" in (run_dir / ".hydra" / "config.yaml").read_text()  # the refused job wrote none
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while _alive(worker):
            assert time.time() < deadline, "the worker outlived its launcher"
            time.sleep(0.1)
        with open(lock) as f:  # free once the worker's last thread has exited
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.time() < deadline, "the run directory stayed locked after its worker died"
                    time.sleep(0.1)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_damaged_checkpoints_are_named_and_resume_falls_back_to_the_newest_intact_one(tmp_path, capsys,
                                                                                      killed_in_save_run):
    """A truncated DeepSpeed state file, a truncated indexers.safetensors or a garbage meta.json: the checkpoint is
    named as damaged with the previous good one offered; resume=auto falls back to it, says so, and the resumed
    run logs each step once and prunes only its own checkpoints."""
    run_dir = copy_run(killed_in_save_run, tmp_path)  # SIGKILLed while writing step_6; latest: step_4
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_4" and [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    foreign = root / "step_1"  # a checkpoint of another run in the same folder
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"run_id": "another-run", "step": 1}))
    step_4 = root / "step_4"
    for name, damage in (("zero_pp_rank_0_mp_rank_00_optim_states.pt", lambda b: b[:len(b) // 2]),
                         ("indexers.safetensors", lambda b: b[:100]), ("meta.json", lambda b: b"{garbage")):
        original = (step_4 / name).read_bytes()
        (step_4 / name).write_bytes(damage(original))
        assert prepare(cfg(*KILL_STEPS), str(run_dir), 1, CPU).resume_from == str(root / "step_2")
        said = capsys.readouterr().out
        assert "step_4' is damaged" in said and name in said and "Resuming from" in said and "step_2" in said
        with pytest.raises(DamagedCheckpoint, match=rf"step_4' is damaged: .*{name}.*resume={root / 'step_2'}"):
            prepare(cfg(*KILL_STEPS, f"resume={step_4}"), str(run_dir), 1, CPU)
        (step_4 / name).write_bytes(original)
    (step_4 / "mp_rank_00_model_states.pt").write_bytes(b"")
    out = job(tmp_path, run_dir, *KILL_STEPS)
    assert "Resuming from" in out and "resumed at step 2" in out
    assert [m["step"] for m in metrics(run_dir)] == [1, 2, 3, 4, 5, 6, 7, 8]  # replayed steps 3-6 once, then 7-8
    assert sorted(p.name for p in root.glob("step_*")) == ["step_1", "step_6", "step_8"]  # keep_checkpoints=2 of ours


def test_prune_counts_and_deletes_only_this_runs_checkpoints(tmp_path):
    from train.checkpoint import _prune
    for step, run_id in ((1, "other"), (2, "ours"), (4, "ours"), (10, "ours"), (12, "other")):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "meta.json").write_text(json.dumps({"run_id": run_id, "step": step}))
    (tmp_path / "step_4_universal").mkdir()  # DeepSpeed's re-shardable form of step_4
    _prune(str(tmp_path), keep=2, current="step_10", run_id="ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_10", "step_12", "step_4", "step_4_universal"]
    _prune(str(tmp_path), keep=1, current="step_10", run_id="ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1", "step_10", "step_12"]
