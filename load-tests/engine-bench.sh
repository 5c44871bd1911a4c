#!/usr/bin/env bash
# Engine benchmark (issue 5): llama.cpp (llama-cpp-python, installed into a throwaway venv)
# and Switchyard's candle engine on the same GGUF, in one run, on this machine; prints every
# target as a ratio. Switchyard is measured through its HTTP API (streaming, greedy, EOS
# ignored); llama.cpp in process. Usage: load-tests/engine-bench.sh [OUT_DIR]
# Env: LLAMACPP_VENV (reuse a venv that has llama-cpp-python), SOAK_SECONDS (a 16-stream run
# of this length with the resident set sampled every 10 s; 0 skips it), ROUNDS (interleaved
# repetitions of the compared loads, default 3), LORA_DTYPE (f32 or bf16: the precision adapters
# are served in, default bf16 like the gateway).
# Two servers run side by side (an idle one costs nothing): the default one, with its prompt
# prefix cache, and one started with --prefix-cache-mb 0. Everything llama.cpp is compared
# with on a single stream (decode, time to first token, prefill) is measured cold, on the
# second: llama.cpp resets its context before each measurement. The 16-stream loads run on
# the default server, and the base load once more without the cache. A third server runs
# with --activations q8 (8-bit activations, not exact: reported beside the exact figures).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out/engine}"
mkdir -p "$out"
bin="${CARGO_TARGET_DIR:-target}/release"
model="${SWITCHYARD_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
port="${PORT:-18091}"
url="http://127.0.0.1:$port"
cold_url="http://127.0.0.1:$((port + 1))"
threads=$(nproc)
soak="${SOAK_SECONDS:-0}"
rounds="${ROUNDS:-3}"
lora_dtype="${LORA_DTYPE:-bf16}"
work=$(mktemp -d)
server=""
cold_server=""
q8_server=""
trap 'kill $server $cold_server $q8_server 2>/dev/null; rm -rf "$work"' EXIT

venv="${LLAMACPP_VENV:-}"
if [ -z "$venv" ]; then
  venv="$work/venv"
  python3 -m venv "$venv"
  # The native build's AMX path crashes on these machines; this is the build the issue names,
  # except that AVX-512 is turned off on a CPU without it (an AVX2-only EPYC would die of SIGILL).
  avx512=ON
  grep -qw avx512f /proc/cpuinfo || avx512=OFF
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=$avx512 -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF" \
    "$venv/bin/pip" install -q llama-cpp-python==0.3.36 numpy
fi

chat=$'<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a message in a bottle.<|im_end|>\n<|im_start|>assistant\n'
# A long prompt of ordinary prose; both sides use its first 600 tokens.
long=$(python3 -c '
import itertools
s = ["The harbour town woke slowly under a grey sky.", "Fishermen checked their nets and argued about the weather.",
     "A bell rang twice from the old chapel on the hill.", "Children ran along the sea wall, counting the boats that came in.",
     "In the market, prices for mackerel had doubled since the storm.", "Nobody could remember a winter as long as this one.",
     "The lighthouse keeper wrote every ship he saw into a leather book.", "By noon the fog had lifted and the islands were visible again."]
print(" ".join(f"{x} ({i})" for i, x in zip(range(120), itertools.cycle(s))))')
"$venv/bin/python" - "$model" "$long" >"$work/long600.txt" <<'PY'
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, vocab_only=True, verbose=False)
print(llm.detokenize(llm.tokenize(sys.argv[2].encode(), add_bos=False)[:600]).decode(), end="")
PY
echo "llama.cpp ($threads threads)..." >&2
"$venv/bin/python" load-tests/llamacpp_bench.py "$model" "$chat" "$(cat "$work/long600.txt")" "$threads" | tee "$out/llamacpp.json"

"$bin/switchyard-load" --make-adapters "$work/imports" --adapter-count 8 >/dev/null
# serve PORT DIR [ARGS...]: starts a gateway in the background; its pid goes to $started.
serve() {
  local p=$1 dir=$2
  shift 2
  mkdir -p "$dir"
  "$bin/switchyard" serve --port "$p" --model "$model" --max-concurrent 64 --auth off --threads "$threads" --lora-dtype "$lora_dtype" \
    --data-dir "$dir/data" --import-root "$work/imports" --admin-token bench-token "$@" >"$dir/stdout" 2>"$dir/stderr" &
  started=$!
  for _ in $(seq 240); do grep -q '^switchyard ready' "$dir/stdout" 2>/dev/null && break; sleep 0.5; done
  for i in $(seq 0 7); do
    curl -sf -X POST -H 'authorization: Bearer bench-token' -H 'content-type: application/json' \
      "http://127.0.0.1:$p/admin/adapters/a$i/versions" -d "{\"path\": \"a$i\"}" >/dev/null
    curl -sf -X PUT -H 'authorization: Bearer bench-token' -H 'content-type: application/json' \
      "http://127.0.0.1:$p/admin/adapters/a$i/aliases/prod" -d '{"version": 1}' >/dev/null
  done
}
serve "$port" "$work/warm"
server=$started
rss() { awk -v k="$1" '$1 == k":" { print $2 }' "/proc/$server/status"; }
echo "{\"rss_kb_loaded\": $(rss VmRSS)}" >"$out/rss-loaded.json"
serve "$((port + 1))" "$work/cold" --prefix-cache-mb 0
cold_server=$started
serve "$((port + 2))" "$work/q8" --activations q8
q8_server=$started

load() { "$bin/switchyard-load" --url "$url" --completions "$@"; }
cold() { "$bin/switchyard-load" --url "$cold_url" --completions "$@"; }
q8() { "$bin/switchyard-load" --url "http://127.0.0.1:$((port + 2))" --completions "$@"; }
base=smollm2-135m-instruct
# The loads that are compared with each other run interleaved, ROUNDS times, and the report
# takes each one's median: on a shared machine, drift then hits every load alike.
for r in $(seq "$rounds"); do
  cold --model "$base" --prompt "$chat" --max-tokens 128 --concurrency 1 --requests-per-stream 2 --json "$out/single-$r.json" >/dev/null
  cold --model a0 --prompt "$chat" --max-tokens 128 --concurrency 1 --requests-per-stream 2 --json "$out/single-lora-$r.json" >/dev/null
  load --model "$base" --prompt "$chat" --max-tokens 128 --concurrency 1 --requests-per-stream 2 --json "$out/single-warm-$r.json" >/dev/null
  load --model "$base" --prompt "$chat" --max-tokens 128 --concurrency 16 --requests-per-stream 1 --json "$out/sixteen-$r.json" >/dev/null
  cold --model "$base" --prompt "$chat" --max-tokens 128 --concurrency 16 --requests-per-stream 1 --json "$out/sixteen-cold-$r.json" >/dev/null
  load --model a0 --prompt "$chat" --max-tokens 128 --concurrency 16 --requests-per-stream 1 --json "$out/sixteen-one-$r.json" >/dev/null
  load --model a0,a1,a2,a3,a4,a5,a6,a7 --prompt "$chat" --max-tokens 128 --concurrency 16 --requests-per-stream 1 --json "$out/sixteen-eight-$r.json" >/dev/null
  q8 --model "$base" --prompt "$chat" --max-tokens 128 --concurrency 16 --requests-per-stream 1 --json "$out/sixteen-q8-$r.json" >/dev/null
  q8 --model "$base" --prompt "$chat" --max-tokens 128 --concurrency 1 --requests-per-stream 2 --json "$out/single-q8-$r.json" >/dev/null
done
kill "$q8_server" 2>/dev/null || true
cold --model "$base" --prompt "$(cat "$work/long600.txt")" --max-tokens 2 --concurrency 1 --requests-per-stream 3 --json "$out/prefill.json" >/dev/null
# Memory: 16 streams that each fill a 2,048-token context (600 prompt + 1,448 generated).
load --model "$base" --prompt "$(cat "$work/long600.txt")" --max-tokens 1448 --concurrency 16 --requests-per-stream 1 --json "$out/context-2048.json" >/dev/null
echo "{\"rss_kb_now\": $(rss VmRSS), \"rss_kb_peak\": $(rss VmHWM)}" >"$out/rss-2048.json"

if [ "$soak" -gt 0 ]; then
  : >"$out/soak-rss.tsv"
  end=$((SECONDS + soak))
  ( while [ $SECONDS -lt $end ]; do echo -e "$SECONDS\t$(rss VmRSS)" >>"$out/soak-rss.tsv"; sleep 10; done ) &
  sampler=$!
  while [ $SECONDS -lt $end ]; do
    load --model a0,a1,a2,a3,"$base" --prompt "$chat" --max-tokens 256 --concurrency 16 --requests-per-stream 1 >/dev/null
  done
  wait $sampler
fi

python3 - "$out" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs) ($threads cores)" "$rounds" "$lora_dtype" <<'PY' | tee "$out/report.md"
import json, sys, os, statistics
out, cpu, rounds, lora_dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
j = lambda n: json.load(open(os.path.join(out, n)))
lc = j("llamacpp.json")
lvl = lambda n: j(n)["levels"][0]
def med(name):
    """Each measure's median over the interleaved rounds."""
    runs = [lvl(f"{name}-{r}.json") for r in range(1, rounds + 1)]
    return {k: statistics.median(run[k] for run in runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
single, lora1, prefill = med("single"), med("single-lora"), j("prefill.json")
s16, s16one, s16eight, ctx = med("sixteen"), med("sixteen-one"), med("sixteen-eight"), lvl("context-2048.json")
s16cold, warm = med("sixteen-cold"), med("single-warm")
s16q8, single_q8 = med("sixteen-q8"), med("single-q8")
pre_tok = prefill["prompt_tokens"] / (prefill["levels"][0]["ttft_ms_p50"] / 1e3)
rows = [
    ("single-stream decode tok/s", single["per_stream_decode_tok_s_mean"], f'llama.cpp {lc["decode_tok_s"]:.1f}', single["per_stream_decode_tok_s_mean"] / lc["decode_tok_s"], ">= 1.0"),
    (f'time to first token, {j("single-1.json")["prompt_tokens"]}-token prompt (ms)', single["ttft_ms_p50"], f'llama.cpp {lc["ttft_ms"]:.0f} ({lc["chat_prompt_tokens"]} tokens)', lc["ttft_ms"] / single["ttft_ms_p50"], ">= 1.0 (llama.cpp / ours)"),
    (f'prefill tok/s, {prefill["prompt_tokens"]}-token prompt', pre_tok, f'llama.cpp {lc["prefill_tok_s"]:.0f} ({lc["long_prompt_tokens"]} tokens)', pre_tok / lc["prefill_tok_s"], ">= 1.0"),
    ("16 streams aggregate tok/s", s16["aggregate_tok_s"], "300", s16["aggregate_tok_s"] / 300, ">= 1.0"),
    ("16 streams aggregate tok/s, prefix cache off", s16cold["aggregate_tok_s"], "300", s16cold["aggregate_tok_s"] / 300, "reported"),
    ("16 streams aggregate tok/s, `--activations q8` (not exact)", s16q8["aggregate_tok_s"], "300", s16q8["aggregate_tok_s"] / 300, "reported"),
    ("single-stream decode tok/s, `--activations q8` (not exact)", single_q8["per_stream_decode_tok_s_mean"], f'llama.cpp {lc["decode_tok_s"]:.1f}', single_q8["per_stream_decode_tok_s_mean"] / lc["decode_tok_s"], "reported"),
    ("16 streams slowest stream tok/s", s16["per_stream_decode_tok_s_min"], f'mean {s16["per_stream_decode_tok_s_mean"]:.1f}', s16["per_stream_decode_tok_s_min"] / s16["per_stream_decode_tok_s_mean"], "> 0 (no starvation)"),
    ("16 streams inter-token latency p99 (ms)", s16["itl_ms_p99"], f'p50 {s16["itl_ms_p50"]:.1f}', None, "reported"),
    ("time to first token, prompt in the prefix cache (ms)", warm["ttft_ms_p50"], f'cold {single["ttft_ms_p50"]:.1f}', None, "reported"),
    ("one adapter vs base, 1 stream (tok/s)", lora1["per_stream_decode_tok_s_mean"], f'base {single["per_stream_decode_tok_s_mean"]:.1f}', lora1["per_stream_decode_tok_s_mean"] / single["per_stream_decode_tok_s_mean"], ">= 0.9"),
    ("one adapter vs base, 16 streams (aggregate tok/s)", s16one["aggregate_tok_s"], f'base {s16["aggregate_tok_s"]:.1f}', s16one["aggregate_tok_s"] / s16["aggregate_tok_s"], ">= 0.9"),
    ("8 adapters vs 1 adapter, 16 streams (aggregate tok/s)", s16eight["aggregate_tok_s"], f'one adapter {s16one["aggregate_tok_s"]:.1f}', s16eight["aggregate_tok_s"] / s16one["aggregate_tok_s"], ">= 0.85"),
]
print(f"CPU: {cpu}. llama.cpp: llama-cpp-python 0.3.36, {lc['threads']} threads, in process. Switchyard: candle engine over HTTP, greedy, 128 generated tokens, EOS ignored; its figures are medians of {rounds} interleaved rounds; adapters (rank 8, all seven modules) served in {lora_dtype}. Single-stream loads, time to first token and prefill ran with the prefix cache off (llama.cpp resets its context for each); 16-stream loads ran with the default prefix cache (the 16 streams share their prompt) and once more without it.\n")
print("| measure | Switchyard | compared with | ratio | target |\n|---|---:|---|---:|---|")
for name, ours, other, ratio, target in rows:
    r = "" if ratio is None else f"{ratio:.2f}"
    print(f"| {name} | {ours:.1f} | {other} | {r} | {target} |")
loaded, full = j("rss-loaded.json"), j("rss-2048.json")
print(f"\nResident set: {loaded['rss_kb_loaded']/1024:.0f} MiB with the model loaded; {full['rss_kb_now']/1024:.0f} MiB now and {full['rss_kb_peak']/1024:.0f} MiB peak after 16 streams of 2,048-token context ({ctx['aggregate_tok_s']:.1f} tok/s aggregate for that run).")
soak = os.path.join(out, "soak-rss.tsv")
if os.path.exists(soak) and os.path.getsize(soak) > 0:
    pts = [tuple(map(int, l.split())) for l in open(soak) if l.strip()]
    if len(pts) > 2:
        first, last, top = pts[1][1], pts[-1][1], max(p[1] for p in pts[1:])
        print(f"Soak: {pts[-1][0]-pts[0][0]} s of 16 streams over 5 models; resident set {first/1024:.0f} MiB after the first sample, {last/1024:.0f} MiB at the end, {top/1024:.0f} MiB at most.")
PY
