#!/usr/bin/env bash
# The paper's table on a reference model, as users would run it. RECIPE picks the model (default reference):
#   reference  models/reference, retention 1/2, 1/4, 1/8, 1024-token rows (conf/experiment/paper_table.yaml)
#   deep       models/reference_deep, retention 1/4, 1/8, 8192-token rows (conf/experiment/paper_table_deep.yaml)
# Steps:
#   1. the greedy layer search (OUT/search/search.json),
#   2. the distillation runs (`python -m train.paper_table cells`): all-F (the anchor, trained as long as the others),
#      each pattern x target (own, centroid), then the stage ablation (one pattern's centroid run with its steps all
#      dense, then all sparse); JOBS of them at a time (default 1), each through launch/distill.sh into
#      OUT/runs/<name> (its log: OUT/runs/<name>.log),
#   3. the table, plots and prefill timing (OUT/table.md, OUT/*.png), held-out LM loss, top-k recall and the
#      retrieval probe per row, logged to wandb (offline).
# Usage: bash launch/paper_table.sh [OUT]   (default runs/paper_table[_deep]).
# Extra overrides: EVAL_ARGS (search and summarize: conf/search.yaml, conf/evaluate.yaml), PROBE_ARGS (summarize:
# probe.*), DISTILL_ARGS (every run: conf/config.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${RECIPE:-reference}" in
  reference) experiment=paper_table ratios=0.5,0.25,0.125
             eval_args=(model=reference data=stdlib batches.seq_len=1024 batches.batch_size=8 batches.max_batches=4)
             probe=(probe.enabled=true "probe.lengths=[512,1024]");;
  deep) experiment=paper_table_deep ratios=0.25,0.125
        eval_args=(model=reference_deep data=packages batches.seq_len=8192 batches.batch_size=2 batches.max_batches=8)
        probe=(probe.enabled=true "probe.lengths=[2048,8192]");;
  *) echo "launch/paper_table.sh: RECIPE=$RECIPE is neither reference nor deep" >&2; exit 2;;
esac
out=${1:-runs/$experiment}
jobs=${JOBS:-1}
export PYTHON=${PYTHON:-python}  # launch/distill.sh uses it too
read -r -a extra_eval <<< "${EVAL_ARGS:-}"
read -r -a extra_probe <<< "${PROBE_ARGS:-}"
read -r -a extra_distill <<< "${DISTILL_ARGS:-}"
eval_args+=("${extra_eval[@]}")
mkdir -p "$out/runs"

"$PYTHON" -m train.search "${eval_args[@]}" batches.split=train batches.max_batches=4 target_retention="${ratios##*,}" \
  "hydra.run.dir=$out/search"
"$PYTHON" -m train.paper_table cells "$out" --experiment $experiment --ratios $ratios \
  "${extra_distill[@]}" > "$out/cells.txt"

failed=0
run=0
while read -r name overrides; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || failed=1; done
  read -r -a cell <<< "$overrides"
  echo "launch/paper_table.sh: run $name" >&2
  MASTER_PORT=$(( 29500 + run % 500 )) bash launch/distill.sh experiment=$experiment "${cell[@]}" \
    "hydra.run.dir=$out/runs/$name" "${extra_distill[@]}" > "$out/runs/$name.log" 2>&1 &
  run=$(( run + 1 ))
done < "$out/cells.txt"
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
if [ "$failed" != 0 ]; then
  echo "launch/paper_table.sh: a run failed; see the logs under $out/runs (the table lists the runs that finished)" >&2
fi

"$PYTHON" -m train.paper_table summarize "$out" --ratios $ratios --prefill-len "${PREFILL_LEN:-8192}" \
  "${eval_args[@]}" "${probe[@]}" "${extra_probe[@]}"
exit $failed
