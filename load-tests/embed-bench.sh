#!/usr/bin/env bash
# Embedding benchmark (issue 20): Switchyard's /v1/embeddings over HTTP and sentence-transformers
# (PyTorch, in process) on the same texts, on this machine, in one run: sentences/s at batch 1
# and 64 and their ratio, with the CPU model. Usage: load-tests/embed-bench.sh [OUT_DIR]
# Env: ST_VENV (a venv with sentence-transformers; default: a throwaway one in a temp dir, which
# downloads PyTorch), SWITCHYARD_EMBED_MODEL (default models/all-MiniLM-L6-v2), SENTENCES (512),
# ROUNDS (3: the sides alternate and each keeps its best round), PORT (18095).
# Build first: cargo test --release --workspace --lib --bins --tests --no-run.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/embed}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release"
model="${SWITCHYARD_EMBED_MODEL:-models/all-MiniLM-L6-v2}"
port="${PORT:-18095}"
work=$(mktemp -d)
server=""
trap 'kill $server 2>/dev/null; rm -rf "$work"' EXIT

venv="${ST_VENV:-}"
if [ -z "$venv" ]; then
  venv="$work/venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q sentence-transformers
fi

"$bin/switchyard" serve --engine echo --embed-model "$model" --port "$port" --auth off \
  --data-dir "$work/data" >"$work/stdout" 2>"$work/stderr" &
server=$!
for _ in $(seq 120); do grep -q '^switchyard ready' "$work/stdout" 2>/dev/null && break; sleep 0.5; done
grep -q '^switchyard ready' "$work/stdout" || { cat "$work/stderr" >&2; exit 1; }

cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
echo "machine: $cpu, $(nproc) cores" | tee "$out/machine.txt"
"$venv/bin/python" load-tests/embed_bench.py "http://127.0.0.1:$port" "$model" "${SENTENCES:-512}" "${ROUNDS:-3}" | tee "$out/embed.json"
"$venv/bin/python" - "$out/embed.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("| batch | Switchyard (HTTP) sentences/s | sentence-transformers sentences/s | ratio |")
print("|---|---|---|---|")
for b in (1, 64):
    x = r[f"batch{b}"]
    print(f"| {b} | {x['switchyard_sentences_per_s']} | {x['sentence_transformers_sentences_per_s']} | {x['ratio']} |")
PY
