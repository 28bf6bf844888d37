#!/usr/bin/env bash
# Reproduce a reference DSA model from scratch on one GPU. RECIPE picks which (default reference):
#   reference  models/reference (MODEL_CARD.md): 12 layers, 1024 tokens, top-64; conf/pretrain.yaml, data=stdlib
#   deep       models/reference_deep (shipped; its card says how it was made): 24 layers, 8192 tokens, top-256;
#              data=packages (the .py sources of installed packages, joined per package directory); two phases,
#              conf/pretrain_deep.yaml at 2048 tokens, then conf/pretrain_deep_8k.yaml at 8192 from its model
# Stages:
#   1. dense pretraining: python -m train.pretrain, once per phase (trains the BPE tokenizer first if tokenizer.path
#      has none)
#   2. indexer warm-up: the distillation job at pattern all-F, dense stage then sparse stage (launch/distill.sh)
#   3. evaluation (python -m train.evaluate): held-out LM loss with dense attention, DSA all-F and DSA at
#      retention 1/8 (uniform pattern, untrained sharing), per-layer top-k recall; also before the warm-up;
#      deep: the retrieval probe too
#   4. $MODEL_DIR: the warmed-up model, held-out tokens and sources, stage records, reference_outputs.json (CPU fp32)
# Extra Hydra overrides (whitespace-separated): DATA_ARGS for every stage, PRETRAIN_ARGS (train.pretrain, both stages),
# WARMUP_ARGS, EVAL_ARGS.
#   bash launch/pretrain.sh                                   # corpus: this interpreter's standard library
#   PRETRAIN_ARGS="train.time_budget_s=300" bash launch/pretrain.sh
#   RECIPE=deep PRETRAIN_ARGS="data.num_proc=16" bash launch/pretrain.sh
# The shipped reference model's corpus, Python 3.11.7's standard library, pinned as jsonl (made on Python 3.11.7
# with `python -m train.pretrain stage=corpus corpus_dir=.cache/corpus`):
#   DATA_ARGS="data=text data.files=.cache/corpus/train.jsonl data.validation_files=.cache/corpus/validation.jsonl" \
#     bash launch/pretrain.sh
# PRETRAINED=<dir>: skip dense pretraining and start at the indexer warm-up from that pretrained backbone (a phase's
# <run dir>/model, with its pretrain_record.json, heldout.safetensors and heldout_sources.txt).
# Run directories: $RUNS/{<each phase's config name>,warmup,evaluate_pretrained,evaluate} (default runs/<model>).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${RECIPE:-reference}" in
  reference) phases=(pretrain) model=reference seq_len=1024 micro_batch=8 warmup_steps=(400 200)
             eval_rows=(8 16) recipe_data=(data=stdlib) probe=();;
  deep) phases=(pretrain_deep pretrain_deep_8k) model=reference_deep seq_len=8192 micro_batch=1
        warmup_steps=(800 200) eval_rows=(2 8) recipe_data=(data=packages)
        probe=(probe.enabled=true "probe.lengths=[2048,8192]" "probe.depths=[0.1,0.5,0.9]");;
  *) echo "launch/pretrain.sh: RECIPE=$RECIPE is neither reference nor deep" >&2; exit 2;;
esac
seq_len=${SEQ_LEN:-$seq_len}  # a smaller one only to try the recipe out (PRETRAIN_ARGS then sets train.seq_len)
MODEL_DIR=${MODEL_DIR:-models/$model}
RUNS=${RUNS:-runs/$model}
export PYTHON=${PYTHON:-python}  # launch/distill.sh uses it too
read -r -a data_args <<< "${DATA_ARGS:-}"
read -r -a pretrain_args <<< "${PRETRAIN_ARGS:-}"
read -r -a warmup_args <<< "${WARMUP_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
data_args=("${recipe_data[@]}" "${data_args[@]}")
evaluation=(batches.seq_len=$seq_len batches.batch_size=${eval_rows[0]} batches.max_batches=${eval_rows[1]}
            logger=disabled "${data_args[@]}")

if [ -n "${PRETRAINED:-}" ]; then
  pretrained=$PRETRAINED
  for f in model.safetensors pretrain_record.json heldout.safetensors heldout_sources.txt; do
    [ -f "$pretrained/$f" ] || { echo "launch/pretrain.sh: PRETRAINED=$pretrained has no $f: point it at a" \
                                      "pretraining phase's <run dir>/model" >&2; exit 2; }
  done
else
  pretrained=""
  for phase in "${phases[@]}"; do  # each phase starts from the model of the one before
    "$PYTHON" -m train.pretrain --config-name $phase hydra.run.dir="$RUNS/$phase" ${pretrained:+model.path=$pretrained} \
      "${data_args[@]}" "${pretrain_args[@]}"
    pretrained=$RUNS/$phase/model
  done
fi

bash launch/distill.sh model=$model model.path="$pretrained" model.dtype=bfloat16 \
  name=$model-indexer-warmup hydra.run.dir="$RUNS/warmup" resume=never \
  distill.retention=1.0 distill.seq_len=$seq_len distill.micro_batch_size=$micro_batch \
  distill.dense_steps=${warmup_steps[0]} distill.sparse_steps=${warmup_steps[1]} distill.lr=3e-3 distill.warmup_steps=20 \
  distill.eval_every=100 distill.eval_batches=4 distill.save_every=100000 \
  export.enabled=true export.full_model=true "${data_args[@]}" "${warmup_args[@]}"

"$PYTHON" -m train.evaluate model=$model model.path="$pretrained" 'anchors=[]' \
  hydra.run.dir="$RUNS/evaluate_pretrained" "${evaluation[@]}" "${eval_args[@]}"
"$PYTHON" -m train.evaluate model=$model model.path="$RUNS/warmup/export/model" freq=8 'anchors=[dense,full]' \
  hydra.run.dir="$RUNS/evaluate" "${evaluation[@]}" "${probe[@]}" "${eval_args[@]}"

mkdir -p "$MODEL_DIR"
cp "$RUNS"/warmup/export/model/* "$MODEL_DIR"/
cp "$pretrained"/{heldout.safetensors,heldout_sources.txt,pretrain_record.json} "$MODEL_DIR"/
cp "$RUNS/warmup/export/manifest.json" "$MODEL_DIR/indexer_warmup_manifest.json"
cp "$RUNS/evaluate_pretrained/metrics.json" "$MODEL_DIR/evaluation_before_warmup.json"
cp "$RUNS/evaluate/metrics.json" "$MODEL_DIR/evaluation.json"
"$PYTHON" -m train.pretrain --config-name "${phases[-1]}" stage=reference reference.model_dir="$MODEL_DIR" \
  hydra.run.dir="$RUNS/reference" "${pretrain_args[@]}"
echo "wrote $MODEL_DIR"
