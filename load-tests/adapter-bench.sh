#!/usr/bin/env bash
# Adapter benchmarks for issue 3: base vs one adapter, one adapter vs 8 different adapters,
# cold load and promote-to-first-token, and 100 alias moves under a 16-stream load.
# Starts its own gateway on loopback; writes markdown reports into OUT (default: bench-out/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release"
model="${SWITCHYARD_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
port="${PORT:-18090}"
url="http://127.0.0.1:$port"
export SWITCHYARD_ADMIN_TOKEN=bench-token
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin/switchyard-load" --make-adapters "$work/imports" --adapter-count 8 >/dev/null
"$bin/switchyard" serve --port "$port" --model "$model" --max-concurrent 64 --auth off \
  --data-dir "$work/data" --import-root "$work/imports" >"$work/stdout" 2>"$work/stderr" &
server=$!
for _ in $(seq 120); do grep -q '^switchyard ready' "$work/stdout" 2>/dev/null && break; sleep 0.5; done

admin() { curl -sf -X "$1" -H "authorization: Bearer $SWITCHYARD_ADMIN_TOKEN" -H 'content-type: application/json' "$url$2" ${3:+-d "$3"} >/dev/null; }
for i in $(seq 0 7); do
  admin POST "/admin/adapters/a$i/versions" "{\"path\": \"a$i\"}"
  admin PUT "/admin/adapters/a$i/aliases/prod" '{"version": 1}'
done
# `flip` has two versions whose alias the flip run moves back and forth.
admin POST /admin/adapters/flip/versions '{"path": "a0"}'
admin POST /admin/adapters/flip/versions '{"path": "a1"}'
admin PUT /admin/adapters/flip/aliases/prod '{"version": 1}'

load() { "$bin/switchyard-load" --url "$url" --max-tokens 128 "$@"; }
load --model smollm2-135m-instruct --concurrency 1,16 --requests-per-stream 1 --out "$out/base.md"
load --model a0 --concurrency 1,16 --requests-per-stream 1 --out "$out/one-adapter.md"
load --model a0,a1,a2,a3,a4,a5,a6,a7 --concurrency 16 --requests-per-stream 1 --out "$out/eight-adapters.md"
load --model flip --concurrency 1 --requests-per-stream 1 --adapter-timings flip --out "$out/timings.md"
load --model flip --concurrency 16 --requests-per-stream 2 --flip-adapter flip --flips 100 --out "$out/flips.md"
# Cold loads as the server measured them (10 adapter versions were loaded above).
curl -s "$url/metrics" | grep -E '^switchyard_adapter_(load_seconds_(sum|count)|cache_total)' | tee "$out/adapter-metrics.txt"
