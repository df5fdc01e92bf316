#!/usr/bin/env bash
# Build llama.cpp's native `llama-server` and `llama-bench` for the serving benchmark, from the llama.cpp
# sources vendored in the llama-cpp-python sdist (so the version matches the in-process `llama_cpp` tests).
#
#   benchmarks/setup_llamacpp.sh            # -> build/llamacpp/bin/{llama-server,llama-bench}
#   JOBS=8 benchmarks/setup_llamacpp.sh     # more compile jobs (default 2)
#
# Everything lands under build/llamacpp/ (git-ignored): binaries are built here, never committed.
# Needs cmake and a C++ compiler; no network at run time beyond pip fetching the sdist. ~5 min on 2 cores.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/build/llamacpp"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"  # e.g. 0.3.36; empty = latest

if [[ -x "$DEST/bin/llama-server" && -x "$DEST/bin/llama-bench" ]]; then
    echo "already built: $DEST/bin (delete $DEST to rebuild)"
    exit 0
fi
command -v cmake >/dev/null || { echo "error: cmake not found (apt-get install cmake, or pip install cmake)" >&2; exit 2; }

mkdir -p "$DEST/sdist"
if ! ls "$DEST"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PIP" download --no-binary :all: --no-deps "llama-cpp-python${VERSION:+==$VERSION}" -d "$DEST/sdist"
fi
SDIST="$(ls "$DEST"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"
SRC="$DEST/src"
if [[ ! -d "$SRC/vendor/llama.cpp" ]]; then
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar -xzf "$SDIST" -C "$SRC" --strip-components=1
fi

# Offline and self-contained: no HTTPS client, no web-UI download at build time, static binaries (no .so
# next to them); otherwise llama.cpp's default CPU build (-march=native).
cmake -S "$SRC/vendor/llama.cpp" -B "$DEST/cmake" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
      -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
cmake --build "$DEST/cmake" --target llama-server llama-bench -j "$JOBS"

mkdir -p "$DEST/bin"
for tool in llama-server llama-bench; do
    cp "$DEST/cmake/bin/$tool" "$DEST/bin/$tool"
done
echo "built: $DEST/bin/llama-server, $DEST/bin/llama-bench ($(basename "$SDIST" .tar.gz))"
