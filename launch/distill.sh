#!/usr/bin/env bash
# Launch the distillation job with torch.distributed.run (torchrun); every argument is passed to Hydra.
#   bash launch/distill.sh                                   # embedded defaults
#   bash launch/distill.sh distill.retention=0.125 deepspeed=zero3
#   bash launch/distill.sh -m distill.retention=0.5,0.25,0.125   # one run per ratio (Hydra multirun)
# Processes: $NPROC if set, else every visible GPU, else 1 (CPU: DeepSpeed's CPU accelerator with gloo).
# Interpreter: $PYTHON if set (e.g. a virtualenv's bin/python, activated or not), else python from PATH; its own
# torch.distributed.run module runs, so no torchrun on PATH is needed.
# Killing this launcher (its process group, kill -9 included) ends its workers: they die with their parent.
set -euo pipefail
cd "$(dirname "$0")/.."
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
port=${MASTER_PORT:-$(( 29500 + RANDOM % 1000 ))}
# exec keeps this pid: the workers (train.distill.die_with_launcher) die with it
export INDEXCACHE_LAUNCHER_PID=$$
exec "$python" -m torch.distributed.run --nnodes=1 --nproc_per_node="$nproc" --master_addr=127.0.0.1 \
  --master_port="$port" -m train.distill "$@"
