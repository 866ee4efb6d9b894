#!/usr/bin/env bash
# Regenerates benchmarks/results/tasks/*.json and the README's results table on the embedded tasks:
# pretrain with the README command (make demo's job), zero-shot evaluation of the pretrained
# weights, then a fixed small CPU fine-tuning budget per task, each evaluated on the i.i.d.
# (test) and compositional (test_comp) held-out splits. Two jobs at a time, one thread each.
# Usage: bash train/reproduce_results.sh [RUNS_DIR]   (about 4 minutes on a 2-core CPU after
# the pretraining run, which takes about 4.5)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${1:-runs}
OUT=benchmarks/results/tasks
STEPS=${FINETUNE_STEPS:-400}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
PRE="$RUNS/demo/vl/final"
[ -f "$PRE/DONE" ] || $PY -m vlmo_fast.demo
evaluate() {  # task checkpoint name
  for split in test test_comp; do
    $PY train/evaluate.py --task "$1" --checkpoint "$2" --split "$split" --no-progress \
        --out "$OUT/$3-$split.json" > /dev/null
  done
}
finetune() {  # task
  $PY train/finetune.py --task "$1" --init "$PRE" --output-dir "$RUNS/ft-$1" --steps "$STEPS" \
      --batch-size 32 --lr 1e-3 --no-eval --no-progress --resume never > "$RUNS/ft-$1.log" 2>&1
}
evaluate retrieval "$PRE" zeroshot-retrieval & evaluate zeroshot "$PRE" zeroshot-classification & wait
finetune retrieval & finetune vqa & wait
evaluate retrieval "$RUNS/ft-retrieval/final" finetuned-retrieval & evaluate vqa "$RUNS/ft-vqa/final" finetuned-vqa & wait
finetune nlvr2
evaluate nlvr2 "$RUNS/ft-nlvr2/final" finetuned-nlvr2
$PY train/results_table.py "$OUT"/*.json | tee "$OUT/table.md"
