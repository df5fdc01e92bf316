#!/bin/bash
# Muon vs AdamW at equal wall time on the recipe's data and shape, ranked by held-out bits per byte.
# Each arm's throughput is probed first (12 steps, the first 4 discarded), so each arm gets the steps that fit
# SECONDS_EACH; every run is warmup + stable + a 20% decay that ends it (WSD), so each arm finishes its schedule.
# Arms: adamw at the recipe's lr; muon at the same lr (Muon's update RMS is matched to AdamW's, so the lr carries
# over); muon at 3x (its first steps are smaller than AdamW's). Run on a quiet machine, after
# `minicoder recipe small --out runs/model --stop-after pack`:
#   benchmarks/muon_ab.sh runs/model/data runs/muon_ab [SECONDS]      # default 1200 s per arm
# A probe already in OUT is reused (measure on a quiet machine once). Results: OUT/ARM/eval/loss_summary.json,
# and one line per arm at the end. Smoke test at tiny sizes: SHAPE="--hidden-size 64 ..." BATCH=4 SEQ=32.
set -euo pipefail
DATA=${1:?DATA}; OUT=${2:?OUT}; SECONDS_EACH=${3:-1200}
PY=${PY:-.venv/bin/python}
BATCH=${BATCH:-16}; SEQ=${SEQ:-512}; LR=${LR:-2e-3}
SHAPE=${SHAPE:---hidden-size 320 --intermediate-size 864 --num-hidden-layers 6 --num-attention-heads 5 --num-key-value-heads 5}
LR3=$($PY -c "print(3 * $LR)")
declare -A ARMS=([adamw]="--optimizer adamw --lr $LR" [muon]="--optimizer muon --lr $LR" [muon_lr3x]="--optimizer muon --lr $LR3")
mkdir -p "$OUT"
for arm in adamw muon muon_lr3x; do
  common="--config configs/small.toml --data $DATA --batch-size $BATCH --grad-accum 1 --seq-len $SEQ --quiet $SHAPE ${ARMS[$arm]}"
  [ -f "$OUT/$arm-probe/log.jsonl" ] || $PY -m minicoder pretrain $common --out "$OUT/$arm-probe" --max-steps 12 \
      --eval-interval 1000 --save-interval 1000 >/dev/null
  tok_s=$($PY -c "import json; r=[x for x in map(json.loads, open('$OUT/$arm-probe/log.jsonl'))][4:]; print(sum(x['tokens_per_s'] for x in r)/len(r))")
  steps=$($PY -c "print(max(20, int($SECONDS_EACH * $tok_s / ($BATCH * $SEQ))))")
  echo "== $arm: $tok_s tokens/s -> $steps steps in ${SECONDS_EACH}s"
  [ -d "$OUT/$arm/final" ] || $PY -m minicoder pretrain $common --out "$OUT/$arm" --max-steps "$steps" --schedule wsd \
      --decay-fraction 0.2 --warmup-steps $(( steps / 20 + 1 )) --eval-interval 100000 --save-interval 250 $( [ -d "$OUT/$arm/checkpoints" ] && echo --resume )
  $PY -m minicoder eval loss "$OUT/$arm/final" --data "$DATA" --out "$OUT/$arm/eval" >/dev/null
done
for arm in adamw muon muon_lr3x; do
  $PY -c "import json; s=json.load(open('$OUT/$arm/eval/loss_summary.json'))['scores']; print(f'$arm: held-out {s[\"bits_per_byte\"]:.4f} bits/byte, loss {s[\"loss\"]:.4f}')"
done
