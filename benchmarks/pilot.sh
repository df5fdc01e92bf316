#!/bin/bash
# Pilot runs that choose the shipped model's shape: each shape trains for the same wall time (default 20 min)
# on the recipe's packed data, with a WSD schedule whose decay ends the run, then is ranked by held-out bits per
# byte, single-line infilling on the first 20 HumanEval problems, and the true-middle loss.
# Run on a quiet machine, after `minicoder recipe small --out runs/model --stop-after pack`:
#   benchmarks/pilot.sh runs/model/data runs/pilot [SECONDS]
set -euo pipefail
DATA=${1:?DATA}; OUT=${2:?OUT}; SECONDS_EACH=${3:-1200}
PY=${PY:-.venv/bin/python}
BATCH=16; SEQ=512
declare -A SHAPES=(
  [h256x4]="--hidden-size 256 --intermediate-size 688 --num-hidden-layers 4 --num-attention-heads 4 --num-key-value-heads 4"
  [h320x6]="--hidden-size 320 --intermediate-size 864 --num-hidden-layers 6 --num-attention-heads 5 --num-key-value-heads 5"
  [h384x6]="--hidden-size 384 --intermediate-size 1024 --num-hidden-layers 6 --num-attention-heads 6 --num-key-value-heads 6"
)
mkdir -p "$OUT"
for name in h256x4 h320x6 h384x6; do
  shape=${SHAPES[$name]}
  # 1. measure this shape's throughput (12 steps, the first 4 discarded as warm-up). A probe already in OUT is
  #    reused: measure on a quiet machine once, then the timed runs are equal-compute even if the machine is busy later.
  [ -f "$OUT/$name-probe/log.jsonl" ] || $PY -m minicoder pretrain --config configs/small.toml --data "$DATA" --out "$OUT/$name-probe" --max-steps 12 \
      --batch-size $BATCH --grad-accum 1 --seq-len $SEQ --eval-interval 1000 --save-interval 1000 --quiet $shape >/dev/null
  tok_s=$($PY -c "import json,sys; r=[x for x in map(json.loads, open('$OUT/$name-probe/log.jsonl')) if 'tokens_per_s' in x][4:]; print(sum(x['tokens_per_s'] for x in r)/len(r))")
  steps=$($PY -c "print(max(20, int($SECONDS_EACH * $tok_s / ($BATCH * $SEQ))))")
  echo "== $name: $tok_s tokens/s -> $steps steps in ${SECONDS_EACH}s"
  # 2. the timed run: warmup, stable, and a 20% decay that ends it
  [ -d "$OUT/$name/final" ] || $PY -m minicoder pretrain --config configs/small.toml --data "$DATA" --out "$OUT/$name" \
      --max-steps "$steps" --batch-size $BATCH --grad-accum 1 --seq-len $SEQ --schedule wsd --decay-fraction 0.2 \
      --warmup-steps $(( steps / 20 + 1 )) --lr 2e-3 --eval-interval 100000 --save-interval 250 --quiet $shape
  $PY -m minicoder eval loss "$OUT/$name/final" --data "$DATA" --out "$OUT/$name/eval"
  $PY -m minicoder eval infill "$OUT/$name/final" --limit 20 --out "$OUT/$name/eval"
  $PY benchmarks/infill_loss.py "$OUT/$name/final" --limit 20
done
