"""Several nodes (docs/CLUSTER.md): what launch/distill.sh hands torchrun for a node count, rank and rendezvous (its
own, or SLURM's), and a job of two "nodes" on this machine (two launches of two CPU processes each) that a SIGTERM to
both launchers stops with a checkpoint, and that a second pair of launches resumes and exports."""
import json
import os
import signal
import socket
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from distill.export import load_export
from tests.conftest import ROOT
from tests.jobs import launcher_env, metrics

pytestmark = pytest.mark.slow  # jobs in processes of their own, or the whole job in this one

LAUNCH = os.path.join(ROOT, "launch", "distill.sh")


def _without_cluster(environ):
    """`environ` without the node and SLURM settings of a shell that runs the tests inside an allocation."""
    cluster = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_BACKEND",
               "GRACE_S", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    return {k: v for k, v in environ.items() if k not in cluster and not k.startswith("SLURM_")}


@pytest.fixture
def dry_launch(tmp_path):
    """dry_launch(**env) -> (exit status, the torchrun command line or the error, its SIGTERM grace): the launcher run
    with a stand-in interpreter that prints what it was given, and a stand-in scontrol for SLURM's node list."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT $*"\n')
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[17-18]" ] && '
                                      'printf "gpu17\\ngpu18\\n"\n')
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)

    def run(**env):
        environ = {**_without_cluster(os.environ), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   "PYTHON": str(bin_dir / "python"), "NPROC": "2", **env}
        proc = subprocess.run(["bash", LAUNCH, "a=1"], env=environ, capture_output=True, text=True, timeout=60,
                              check=False)
        if proc.returncode:
            return proc.returncode, proc.stderr.strip(), None
        grace, line = proc.stdout.strip().split(" ", 1)
        return 0, line, int(grace)
    return run


def test_one_node_by_default_as_before(dry_launch):
    rc, line, grace = dry_launch()
    start, port, end = line.partition("--master_port=")
    assert rc == 0 and start == "-m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 "
    port, end = end.split(" ", 1)
    assert 29500 <= int(port) < 30500 and end == "-m train.distill a=1"
    assert grace == 120
    assert dry_launch(MASTER_PORT="1234", GRACE_S="600")[1:] == (
        ("-m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=1234 "
         "-m train.distill a=1"), 600)


def test_node_count_rank_and_rendezvous_from_the_environment(dry_launch):
    run = "-m torch.distributed.run --nnodes=2 --nproc_per_node=2"
    assert dry_launch(NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1")[:2] == (
        0, f"{run} --node_rank=1 --master_addr=10.0.0.1 --master_port=29500 -m train.distill a=1")
    assert dry_launch(NNODES="1:4", RDZV_ENDPOINT="head:29400", RDZV_ID="job7")[:2] == (
        0, ("-m torch.distributed.run --nnodes=1:4 --nproc_per_node=2 --rdzv_backend=c10d "
            "--rdzv_endpoint=head:29400 --rdzv_id=job7 -m train.distill a=1"))
    for env, error in (({"NNODES": "2", "NODE_RANK": "1"}, "set MASTER_ADDR"),
                       ({"NNODES": "2", "MASTER_ADDR": "h"}, "NODE_RANK=''"),
                       ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK='2'"),
                       ({"GRACE_S": "2m"}, "GRACE_S=2m")):
        rc, message, _ = dry_launch(**env)
        assert rc == 2 and error in message


def test_slurm_allocation_gives_the_nodes_rank_and_rendezvous(dry_launch):
    """Under srun (one task per node): the step's node count, SLURM_NODEID, the first host of the node list as
    scontrol expands it, and the job id (c10d's rendezvous id, and the port); settings given win over SLURM's."""
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NODEID": "1", "SLURM_LOCALID": "0", "SLURM_NNODES": "2",
             "SLURM_JOB_NODELIST": "gpu[17-18]"}
    run = "-m torch.distributed.run --nnodes=2 --nproc_per_node=2"
    assert dry_launch(**slurm)[:2] == (
        0, f"{run} --node_rank=1 --master_addr=gpu17 --master_port=29742 -m train.distill a=1")
    assert dry_launch(**slurm, RDZV_BACKEND="c10d")[:2] == (
        0, f"{run} --rdzv_backend=c10d --rdzv_endpoint=gpu17:29742 --rdzv_id=4242 -m train.distill a=1")
    assert dry_launch(**slurm, MASTER_ADDR="10.0.0.1", MASTER_PORT="29600")[:2] == (
        0, f"{run} --node_rank=1 --master_addr=10.0.0.1 --master_port=29600 -m train.distill a=1")
    rc, message, _ = dry_launch(**{**slurm, "SLURM_LOCALID": "1"})
    assert rc == 2 and "--ntasks-per-node=1" in message
    rc, message, _ = dry_launch(**{**slurm, "SLURM_JOB_NODELIST": "cpu[1-2]"})  # scontrol fails: no host
    assert rc == 2 and "set MASTER_ADDR" in message
    one_node = {**slurm, "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "gpu17"}
    assert dry_launch(**one_node)[1].startswith(
        "-m torch.distributed.run --nnodes=1 --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=")


# two CPU processes per "node", the shortest rows and batches: 4 processes share this machine's cores
TINY = ["model=tiny_glm", "data=stdlib_small", "distill.seq_len=32", "distill.micro_batch_size=1",
        "distill.eval_batches=1", "distill.warmup_steps=1", "logger=disabled", "distill.log_every=1",
        "distill.lm_eval=false", "distill.save_every=1000", "distill.eval_every=1000"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_nodes(tmp_path, name, run_dir, *overrides):
    """Two launches of launch/distill.sh side by side, node ranks 0 and 1 of 2, NPROC=2 each, node 0 at
    127.0.0.1:<a free port>; returns [(process, output file)] (each launcher leads its own process group)."""
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        log = tmp_path / f"{name}-node{rank}.log"
        env = {**_without_cluster(launcher_env(tmp_path, 2)), "NNODES": "2", "NODE_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", LAUNCH, *TINY, f"hydra.run.dir={run_dir}", *overrides], cwd=ROOT,
                                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append((proc, log))
    return nodes


def _finish(nodes, timeout=240):
    """Each launcher's (exit status, output); kills both launchers' process groups if one outlives `timeout`."""
    deadline = time.time() + timeout
    try:
        return [(proc.wait(timeout=max(deadline - time.time(), 1)), log.read_text()) for proc, log in nodes]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_two_nodes_stop_on_sigterm_with_a_checkpoint_then_resume_and_export(tmp_path):
    """Two nodes of two processes (world 4): SIGTERM to both launchers (as a scheduler stops a job) reaches every
    rank through torchrun, which checkpoints at the end of its step; two new launches resume there (resume=auto)
    and end with an export that loads. The resumed launch runs one step past the checkpoint (sparse_steps)."""
    run_dir = tmp_path / "run"
    nodes = _launch_nodes(tmp_path, "first", run_dir, "distill.dense_steps=2", "distill.sparse_steps=1000")
    try:
        deadline = time.time() + 180
        while not ((run_dir / "metrics.jsonl").exists() and len(metrics(run_dir)) >= 2):
            assert all(proc.poll() is None for proc, _ in nodes) and time.time() < deadline, \
                [log.read_text()[-3000:] for _, log in nodes]
            time.sleep(0.05)
        for proc, _ in nodes:
            proc.send_signal(signal.SIGTERM)  # torchrun itself: the launcher execs it
    finally:
        first = _finish(nodes)
    outs = "\n".join(out for _, out in first)
    assert "world 4" in first[0][1] and "SIGTERM: checkpoint of step" in outs, outs[-4000:]
    step = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    meta = json.loads((run_dir / "checkpoints" / f"step_{step}" / "meta.json").read_text())
    assert step >= 2 and meta["world_size"] == 4 and meta["step"] == step
    assert not (run_dir / "export").exists()

    second = _finish(_launch_nodes(tmp_path, "second", run_dir, "distill.dense_steps=2",
                                   f"distill.sparse_steps={step - 1}"))
    assert [rc for rc, _ in second] == [0, 0], "\n".join(out[-3000:] for _, out in second)
    assert "world 4" in second[0][1] and f"resumed at step {step}" in second[0][1]
    assert [m["step"] for m in metrics(run_dir)] == list(range(1, step + 2))  # each step once
    last = json.loads((run_dir / "checkpoints" / f"step_{step + 1}" / "meta.json").read_text())
    assert last["world_size"] == 4
    manifest, state = load_export(run_dir / "export")
    trained = load_file(run_dir / "checkpoints" / f"step_{step + 1}" / "indexers.safetensors")
    assert manifest["pattern"] == "FSSSFSSS" and state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
