#!/usr/bin/env bash
# Reproduce the reference DSA model (models/reference/MODEL_CARD.md) from scratch on one GPU:
#   1. dense pretraining: python -m train.pretrain (trains the BPE tokenizer into $MODEL_DIR first if it has none)
#   2. indexer warm-up: the distillation job at pattern all-F, dense stage then sparse stage (launch/distill.sh)
#   3. evaluation (python -m train.evaluate): held-out LM loss with dense attention, DSA all-F and DSA at
#      retention 1/8 (uniform pattern, untrained sharing), per-layer top-k recall; also before the warm-up
#   4. $MODEL_DIR: the warmed-up model, held-out tokens, stage records, reference_outputs.json (CPU fp32)
# Extra Hydra overrides (whitespace-separated): DATA_ARGS for every stage, PRETRAIN_ARGS, WARMUP_ARGS, EVAL_ARGS.
#   bash launch/pretrain.sh                                   # corpus: this interpreter's standard library
#   PRETRAIN_ARGS="train.time_budget_s=300" bash launch/pretrain.sh
# The shipped model's corpus, Python 3.11.7's standard library, pinned as jsonl (made on Python 3.11.7 with
# `python -m train.pretrain stage=corpus corpus_dir=.cache/corpus`):
#   DATA_ARGS="data=text data.files=.cache/corpus/train.jsonl data.validation_files=.cache/corpus/validation.jsonl" \
#     bash launch/pretrain.sh
# Run directories: $RUNS/{pretrain,warmup,evaluate_pretrained,evaluate} (default runs/reference).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${MODEL_DIR:-models/reference}
RUNS=${RUNS:-runs/reference}
export PYTHON=${PYTHON:-python}  # launch/distill.sh uses it too
read -r -a data_args <<< "${DATA_ARGS:-}"
read -r -a pretrain_args <<< "${PRETRAIN_ARGS:-}"
read -r -a warmup_args <<< "${WARMUP_ARGS:-}"
read -r -a eval_args <<< "${EVAL_ARGS:-}"
seq_len=1024
evaluation=(data=stdlib batches.seq_len=$seq_len batches.batch_size=8 batches.max_batches=16 logger=disabled
            "${data_args[@]}")

"$PYTHON" -m train.pretrain tokenizer.path="$MODEL_DIR" hydra.run.dir="$RUNS/pretrain" train.seq_len=$seq_len \
  "${data_args[@]}" "${pretrain_args[@]}"

bash launch/distill.sh model=reference model.path="$RUNS/pretrain/model" model.dtype=bfloat16 \
  name=reference-indexer-warmup hydra.run.dir="$RUNS/warmup" resume=never \
  distill.retention=1.0 distill.seq_len=$seq_len distill.micro_batch_size=8 \
  distill.dense_steps=400 distill.sparse_steps=200 distill.lr=3e-3 distill.warmup_steps=20 \
  distill.eval_every=100 distill.eval_batches=4 distill.save_every=100000 \
  export.enabled=true export.full_model=true "${data_args[@]}" "${warmup_args[@]}"

"$PYTHON" -m train.evaluate model=reference model.path="$RUNS/pretrain/model" 'anchors=[]' \
  hydra.run.dir="$RUNS/evaluate_pretrained" "${evaluation[@]}" "${eval_args[@]}"
"$PYTHON" -m train.evaluate model=reference model.path="$RUNS/warmup/export/model" freq=8 'anchors=[dense,full]' \
  hydra.run.dir="$RUNS/evaluate" "${evaluation[@]}" "${eval_args[@]}"

mkdir -p "$MODEL_DIR"
cp "$RUNS"/warmup/export/model/* "$MODEL_DIR"/
cp "$RUNS/pretrain/model/heldout.safetensors" "$RUNS/pretrain/model/pretrain_record.json" "$MODEL_DIR"/
cp "$RUNS/warmup/export/manifest.json" "$MODEL_DIR/indexer_warmup_manifest.json"
cp "$RUNS/evaluate_pretrained/metrics.json" "$MODEL_DIR/evaluation_before_warmup.json"
cp "$RUNS/evaluate/metrics.json" "$MODEL_DIR/evaluation.json"
"$PYTHON" -m train.pretrain stage=reference reference.model_dir="$MODEL_DIR" hydra.run.dir="$RUNS/reference"
echo "wrote $MODEL_DIR"
