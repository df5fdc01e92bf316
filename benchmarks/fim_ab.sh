#!/bin/bash
# FIM before/after at the same budget: one corpus and tokenizer, packed twice -- by BEFORE_SRC's packer
# (a checkout of the code before per-chunk FIM: `git archive <commit> | tar -x -C /tmp/before`) and by this
# one -- then trained with the same trainer, preset and step count, then scored on single-line infilling
# (exact match, pass@1) and on the teacher-forced loss of the true middle.
#
#   benchmarks/fim_ab.sh OUT BEFORE_SRC [STEPS] [INFILL_LIMIT] [-- pretrain overrides...]
#   e.g. benchmarks/fim_ab.sh runs/fimab /tmp/before/src 400 164      # the demo's nano at 400 steps, all 1,033 lines
set -euo pipefail
OUT=${1:?OUT}; BEFORE_SRC=${2:?BEFORE_SRC}; STEPS=${3:-400}; LIMIT=${4:-164}
shift $(( $# < 4 ? $# : 4 )); [ "${1:-}" = "--" ] && shift
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
[ -d "$OUT/corpus" ] || $PY -m minicoder data corpus stdlib --out "$OUT/corpus"
[ -d "$OUT/tokenizer" ] || $PY -m minicoder tokenizer train --corpus "$OUT/corpus" --out "$OUT/tokenizer" --vocab-size 4096
[ -d "$OUT/data_before" ] || PYTHONPATH="$BEFORE_SRC" $PY -m minicoder data pack --corpus "$OUT/corpus" --tokenizer "$OUT/tokenizer" --out "$OUT/data_before"
[ -d "$OUT/data_after" ] || $PY -m minicoder data pack --corpus "$OUT/corpus" --tokenizer "$OUT/tokenizer" --out "$OUT/data_after" --seq-len 512
for arm in before after; do
  # Both arms train with the same (BEFORE_SRC) trainer, so only the data differs.
  [ -d "$OUT/$arm/final" ] || PYTHONPATH="$BEFORE_SRC" $PY -m minicoder pretrain --config configs/nano.toml \
      --data "$OUT/data_$arm" --out "$OUT/$arm" --max-steps "$STEPS" --quiet "$@"
done
for arm in before after; do
  echo "== $arm"
  $PY -m minicoder eval infill "$OUT/$arm/final" --limit "$LIMIT" --out "$OUT/${arm}_eval"
  $PY -m minicoder eval loss "$OUT/$arm/final" --data "$OUT/data_before" --out "$OUT/${arm}_eval"
done
$PY benchmarks/infill_loss.py "$OUT/before/final" "$OUT/after/final" --limit "$LIMIT"
