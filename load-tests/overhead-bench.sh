#!/usr/bin/env bash
# Gateway overhead (issue 4): the echo engine answers instantly, so what a chat completion
# costs over a bare `GET /health` round trip is the gateway's own work: JWT auth, rate limits,
# routing, validation, JSON, metrics. Runs with in-process limits, then with limits shared in
# Redis. Usage: load-tests/overhead-bench.sh [OUT_DIR] (Redis at SWITCHYARD_TEST_REDIS or
# 127.0.0.1:6379 for the second run). Logs at the default level (one line per request).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/overhead}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release"
port="${PORT:-18092}"
url="http://127.0.0.1:$port"
redis="${SWITCHYARD_TEST_REDIS:-redis://127.0.0.1:6379}"
rates="${RATES:-1000,5000}"
secret=overhead-bench-secret-0123456789
work=$(mktemp -d)
server=""
trap '[ -n "$server" ] && kill $server 2>/dev/null; rm -rf "$work"' EXIT
report="$out/report.md"
: >"$report"
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($(nproc) cores); load generator and gateway share them." >>"$report"
echo >>"$report"

token=$("$bin/switchyard" mint-token --secret "$secret" --sub bench --tenant bench --ttl-seconds 3600)
run() {
  local label=$1; shift
  # Limits high enough never to refuse, so every request pays for the check.
  "$bin/switchyard" serve --port "$port" --engine echo --auth on --jwt-hs256-secret "$secret" \
    --rate-limit-rpm 100000000 --rate-limit-tpm 1000000000 --http-workers "${WORKERS:-2}" \
    --data-dir "$work/data-$label" "$@" >"$work/stdout" 2>"$work/stderr" &
  server=$!
  for _ in $(seq 100); do grep -q '^switchyard ready' "$work/stdout" 2>/dev/null && break; sleep 0.1; done
  "$bin/switchyard-overhead" --url "$url" --token "$token" --rate "$rates" --seconds "${SECONDS_PER_RATE:-10}" \
    --label "$label" --out "$report"
  kill $server; wait $server 2>/dev/null || true
  server=""
}
run embedded
run redis --redis-url "$redis"
cat "$report"
