#!/usr/bin/env bash
# Install lm-evaluation-harness (lm_eval 0.4.13 with its API-model extras) into its own virtual environment for
# benchmarks/lm_eval_check.py. Never a minicoder dependency: it lives in build/lmeval-venv (git-ignored).
# torch comes from the same CPU wheel minicoder uses (a plain `pip install lm_eval` would pull a CUDA build).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMEVAL_VENV:-$ROOT/build/lmeval-venv}"

if [[ -x "$VENV/bin/lm_eval" ]]; then
    echo "already installed: $("$VENV/bin/python" -c 'import lm_eval; print(lm_eval.__version__)') in $VENV"
    exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0  # the CPU wheel, as `make install` gets it
"$VENV/bin/pip" install -q --disable-pip-version-check "lm_eval[api]==0.4.13"
"$VENV/bin/python" -c "import lm_eval; print('lm_eval', lm_eval.__version__)"
