#!/usr/bin/env bash
# Shadow-traffic cost (issue 22): the served latency of `bot` (prod = version 1) with no shadow
# rule and with every request mirrored to version 2 (share 1.0), in alternating rounds on one
# gateway. Starts its own gateway on loopback; writes switchyard-load's reports and a summary
# into OUT (default: bench-out/shadow).
# Env: SWITCHYARD_MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf), ROUNDS (3),
# CONCURRENCY (1,4), REQUESTS (8 per stream), MAX_TOKENS (64).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/shadow}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release"
model="${SWITCHYARD_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
port="${PORT:-18093}"
url="http://127.0.0.1:$port"
export SWITCHYARD_ADMIN_TOKEN=bench-token
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

"$bin/switchyard-load" --make-adapters "$work/imports" --adapter-count 2 >/dev/null
"$bin/switchyard" serve --port "$port" --model "$model" --max-concurrent 32 --auth off \
  --data-dir "$work/data" --import-root "$work/imports" >"$work/stdout" 2>"$work/stderr" &
server=$!
for _ in $(seq 120); do grep -q '^switchyard ready' "$work/stdout" 2>/dev/null && break; sleep 0.5; done

admin() { curl -sf -X "$1" -H "authorization: Bearer $SWITCHYARD_ADMIN_TOKEN" -H 'content-type: application/json' "$url$2" ${3:+-d "$3"} >/dev/null; }
admin POST /admin/adapters/bot/versions '{"path": "a0"}'
admin POST /admin/adapters/bot/versions '{"path": "a1"}'
admin PUT /admin/adapters/bot/aliases/prod '{"version": 1}'

load() {
  "$bin/switchyard-load" --url "$url" --model bot --concurrency "${CONCURRENCY:-1,4}" \
    --requests-per-stream "${REQUESTS:-8}" --max-tokens "${MAX_TOKENS:-64}" "$@" >/dev/null
}
load --out "$work/warm.md"
for r in $(seq "${ROUNDS:-3}"); do
  admin DELETE /admin/adapters/bot/aliases/prod/shadow
  load --out "$out/plain-$r.md" --json "$out/plain-$r.json"
  admin PUT /admin/adapters/bot/aliases/prod/shadow '{"version": 2, "share": 1.0}'
  load --out "$out/shadow-$r.md" --json "$out/shadow-$r.json"
done
# Shadow rows run only in engine steps with no served work, so under this closed-loop load most
# wait: let the last ones finish (the count of ended shadows stops moving) before reporting.
ended() { curl -sf "$url/metrics" | awk '/^switchyard_shadow_requests_total\{outcome="(compared|dropped|failed)"\}/ { n += $2 } END { print n + 0 }'; }
last=-1
for _ in $(seq 60); do now=$(ended); [ "$now" = "$last" ] && break; last=$now; sleep 3; done
curl -sf -H "authorization: Bearer $SWITCHYARD_ADMIN_TOKEN" "$url/admin/adapters/bot/shadow" >"$out/shadow-report.json"
curl -sf "$url/metrics" | grep '^switchyard_shadow_requests_total' >"$out/shadow-counts.txt" || true
python3 - "$out" "${ROUNDS:-3}" <<'PY'
import json, sys, statistics as st
out, rounds = sys.argv[1], int(sys.argv[2])
def levels(kind):
    by = {}
    for r in range(1, rounds + 1):
        for lvl in json.load(open(f"{out}/{kind}-{r}.json"))["levels"]:
            by.setdefault(lvl["concurrency"], []).append(lvl)
    return by
plain, shadow = levels("plain"), levels("shadow")
rep = json.load(open(f"{out}/shadow-report.json"))
med = lambda ls, k: st.median(l[k] for l in ls)
print("| streams | TTFT p50 plain / mirrored (ms) | ITL p50 plain / mirrored (ms) | per-stream tok/s plain / mirrored | ratio (mirrored / plain tok/s) |")
print("|---:|---:|---:|---:|---:|")
for c in sorted(plain):
    p, s = plain[c], shadow[c]
    rate_p, rate_s = med(p, "per_stream_decode_tok_s_mean"), med(s, "per_stream_decode_tok_s_mean")
    print(f"| {c} | {med(p, 'ttft_ms_p50'):.1f} / {med(s, 'ttft_ms_p50'):.1f} | {med(p, 'itl_ms_p50'):.2f} / {med(s, 'itl_ms_p50'):.2f} "
          f"| {rate_p:.1f} / {rate_s:.1f} | {rate_s / rate_p:.3f} |")
for rule in rep["rules"]:
    print(f"shadow report: {rule['compared']} compared, exact {rule['exact_match_rate']:.3f}, errors {rule['errors']}")
print(open(f"{out}/shadow-counts.txt").read().strip())
PY
