#!/usr/bin/env bash
# Export check (issue 22): does llama.cpp decode what Switchyard serves, once an adapter is merged
# into the base with `finetune export`? Writes a rank-8 test adapter, takes Switchyard's greedy
# ids for 20 chat prompts from its serving runtime (base + adapter, in process), exports the
# merged model as f32 and Q8_0 GGUF, and decodes the same prompt ids greedily in llama.cpp
# (llama-cpp-python in a throwaway venv, built as engine-bench.sh builds it). The base GGUF is
# decoded too, against Switchyard without the adapter: the two engines' own agreement.
# Build first: cargo build --release -p finetune -p load-tests
# Usage: load-tests/export-llamacpp.sh [OUT_DIR]
# Env: LLAMACPP_VENV (reuse a venv that has llama-cpp-python), SWITCHYARD_MODEL (the base GGUF),
# TOKENS (greedy tokens per prompt, default 16).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/export-llamacpp}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release"
model="${SWITCHYARD_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
tokens="${TOKENS:-16}"
threads=$(nproc)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

venv="${LLAMACPP_VENV:-}"
if [ -z "$venv" ]; then
  venv="$work/venv"
  python3 -m venv "$venv"
  # As engine-bench.sh: the native build's AMX path crashes on these machines, and AVX-512 is
  # turned off on a CPU without it.
  avx512=ON
  grep -qw avx512f /proc/cpuinfo || avx512=OFF
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$avx512 -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
    "$venv/bin/pip" install -q llama-cpp-python==0.3.36 numpy
fi

"$bin/switchyard-export-check" --base "$model" --adapter "$work/adapter" --make-adapter \
  --tokens "$tokens" --json "$out/switchyard.json" >/dev/null
"$bin/finetune" export --base "$model" --adapter "$work/adapter" --out "$work/export" \
  --format gguf-f32 --format gguf-q8_0 --adapter-name export-check | tee "$out/export.txt"
cp "$work/export/manifest.json" "$out/manifest.json"
"$venv/bin/python" load-tests/llamacpp_export.py "$out/switchyard.json" "$threads" "base=$model" \
  "merged f32=$work/export/model-f32.gguf" "merged q8_0=$work/export/model-q8_0.gguf" | tee "$out/report.md"
