#!/usr/bin/env bash
# The paper's table on the reference model (issue 7), as users would run it:
#   1. the greedy layer search (OUT/search/search.json),
#   2. one distillation run per (pattern, target) cell: Hydra multirun through launch/distill.sh,
#   3. the table, plots and prefill timing (OUT/table.md, OUT/*.png), logged to wandb (offline).
# Usage: bash launch/paper_table.sh [OUT]   (default runs/paper_table). Extra evaluation overrides: EVAL_ARGS.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/paper_table}
export PYTHON=${PYTHON:-python}  # launch/distill.sh uses it too
eval_args=(model=reference data=stdlib batches.seq_len=${SEQ_LEN:-1024} batches.batch_size=${BATCH:-8}
           batches.max_batches=${BATCHES:-4} ${EVAL_ARGS:-})
"$PYTHON" -m train.search "${eval_args[@]}" batches.split=train target_retention=0.125 "hydra.run.dir=$out/search"
patterns=$("$PYTHON" -m train.paper_table patterns "$out")
bash launch/distill.sh -m experiment=paper_table "distill.pattern=$patterns" distill.target=own,centroid \
  "hydra.sweep.dir=$out/runs" ${DISTILL_ARGS:-}
"$PYTHON" -m train.paper_table summarize "$out" --prefill-len "${PREFILL_LEN:-8192}" "${eval_args[@]}"

