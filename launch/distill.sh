#!/usr/bin/env bash
# Launch the distillation job with torch.distributed.run (torchrun); every argument is passed to Hydra.
#   bash launch/distill.sh                                   # embedded defaults
#   bash launch/distill.sh distill.retention=0.125 deepspeed=zero3
#   bash launch/distill.sh -m distill.retention=0.5,0.25,0.125   # one run per ratio (Hydra multirun)
# Processes per node: $NPROC if set, else every visible GPU, else 1 (CPU: DeepSpeed's CPU accelerator with gloo).
# Interpreter: $PYTHON if set (e.g. a virtualenv's bin/python, activated or not), else python from PATH; its own
# torch.distributed.run module runs, so no torchrun on PATH is needed.
# Nodes (docs/CLUSTER.md): run this script once per node. Unset, it is one node (127.0.0.1, a random port).
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun's static rendezvous (node 0's address; default port 29500)
#   RDZV_ENDPOINT=host:port, RDZV_ID             the c10d rendezvous instead (RDZV_BACKEND=c10d: MASTER_ADDR:port);
#                                                it numbers the nodes itself
#   under srun (one task per node), unset ones come from SLURM: the step's node count, SLURM_NODEID, the first host
#   of its node list (scontrol show hostnames), SLURM_JOB_ID (rendezvous id, and the port 29500 + id % 1000)
# SIGTERM (the scheduler's stop): torchrun forwards it to the workers, which save a checkpoint at the end of their
# step and exit; it SIGKILLs those still running $GRACE_S seconds later (default 120; TORCH_ELASTIC_SHUTDOWN_TIMEOUT,
# read by torch >= 2.12; torch 2.11 waits 30 s).
# Killing this launcher (its process group, kill -9 included) ends its workers: they die with their parent.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "launch/distill.sh: $*" >&2; exit 2; }
python=${PYTHON:-python}
if ! command -v "$python" >/dev/null 2>&1; then
  echo "launch/distill.sh: no Python interpreter '$python' found: set PYTHON=/path/to/python" >&2
  exit 127
fi
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -eq 0 ]; then
  export DS_ACCELERATOR=cpu
fi
nproc=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
# long contexts fragment the CUDA cache (large transient MoE buffers): let segments grow instead
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

grace=${GRACE_S:-${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}}
[[ $grace =~ ^[0-9]+$ ]] || die "GRACE_S=$grace: a whole number of seconds"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$grace

# SLURM: what srun says about this step, for the settings left unset
slurm_nodes="" slurm_node="" slurm_master="" slurm_id=""
if [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_NODEID:-}" ]; then
  if [ "${SLURM_LOCALID:-0}" != 0 ]; then
    die "one launch per node (srun --ntasks-per-node=1): it starts the node's NPROC processes itself"
  fi
  slurm_nodes=${SLURM_STEP_NUM_NODES:-${SLURM_NNODES:-}}
  slurm_node=$SLURM_NODEID
  slurm_id=$SLURM_JOB_ID
  nodelist=${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}
  if [ -n "$nodelist" ] && command -v scontrol >/dev/null 2>&1; then
    slurm_master=$(scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1) || slurm_master=""
  elif [[ $nodelist =~ ^[A-Za-z0-9._-]+$ ]]; then
    slurm_master=$nodelist  # a single plain host name
  fi
fi
nnodes=${NNODES:-${slurm_nodes:-1}}
backend=${RDZV_BACKEND:-$([ -n "${RDZV_ENDPOINT:-}" ] && echo c10d || echo static)}

if [ "$nnodes" = 1 ] && [ "$backend" = static ]; then  # one node: as always, 127.0.0.1 and a random port
  rdzv=(--master_addr=127.0.0.1 --master_port="${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}")
else
  port=${MASTER_PORT:-$([ -n "$slurm_id" ] && echo $(( 29500 + slurm_id % 1000 )) || echo 29500)}
  master=${MASTER_ADDR:-$slurm_master}
  rdzv_id=${RDZV_ID:-$slurm_id}
  case "$backend" in
    static)
      node_rank=${NODE_RANK:-${slurm_node:-}}
      [[ $nnodes =~ ^[0-9]+$ ]] || die "NNODES=$nnodes: a node count (a range MIN:MAX needs RDZV_BACKEND=c10d)"
      [ -n "$master" ] || die "$nnodes nodes: set MASTER_ADDR to node 0's address (or RDZV_ENDPOINT for c10d)"
      [[ $node_rank =~ ^[0-9]+$ ]] && [ "$node_rank" -lt "$nnodes" ] ||
        die "NODE_RANK='$node_rank': this node's rank, 0 to $(( nnodes - 1 )) (node 0 at MASTER_ADDR)"
      rdzv=(--node_rank="$node_rank" --master_addr="$master" --master_port="$port")
      where="node $node_rank of $nnodes, static rendezvous at $master:$port";;
    c10d)
      endpoint=${RDZV_ENDPOINT:-${master:+$master:$port}}
      [ -n "$endpoint" ] || die "RDZV_BACKEND=c10d: set RDZV_ENDPOINT=host:port (or MASTER_ADDR)"
      rdzv=(--rdzv_backend=c10d --rdzv_endpoint="$endpoint")
      if [ -n "$rdzv_id" ]; then rdzv+=(--rdzv_id="$rdzv_id"); fi
      where="$nnodes nodes, c10d rendezvous at $endpoint${rdzv_id:+ (id $rdzv_id)}";;
    *) die "RDZV_BACKEND=$backend: static or c10d";;
  esac
  echo "launch/distill.sh: $where, $nproc processes per node, SIGTERM grace ${grace} s" >&2
fi

# exec keeps this pid: the workers (train.distributed.die_with_launcher) die with it
export INDEXCACHE_LAUNCHER_PID=$$
exec "$python" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$nproc" "${rdzv[@]}" -m train.distill "$@"
