#!/usr/bin/env bash
# Runs the whole test suite in release (the model tests are too slow in a debug build).
# Models are fetched once into a cache outside the clone; so is cargo's target dir.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
models="$cache/models"

./scripts/fetch-models.sh "$models" >/dev/null
export SWITCHYARD_TEST_MODEL="$models/SmolLM2-135M-Instruct.Q4_1.gguf"
export SWITCHYARD_TEST_EMBED_MODEL="$models/all-MiniLM-L6-v2"

# Tests that need Redis use 127.0.0.1:6379 unless told otherwise.
export SWITCHYARD_TEST_REDIS="${SWITCHYARD_TEST_REDIS:-redis://127.0.0.1:6379}"

# Formatting and lints first: they fail fast and cost no test time.
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
./scripts/lint-deploy.sh

# The schema-driven fuzzer (gateway/tests/api_fuzz.rs) runs schemathesis from a venv in the cache,
# made once, never inside the clone.
fuzz_venv="$cache/schemathesis-venv"
if [ ! -x "$fuzz_venv/bin/st" ]; then
  python3 -m venv "$fuzz_venv" && "$fuzz_venv/bin/pip" install -q schemathesis==4.32.5
fi
export SWITCHYARD_TEST_SCHEMATHESIS="$fuzz_venv/bin/st"

# The official OpenAI Python client, for gateway/tests/responses_api.rs (a venv in the cache).
openai_venv="$cache/openai-venv"
if [ ! -x "$openai_venv/bin/python" ] || ! "$openai_venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$openai_venv" && "$openai_venv/bin/pip" install -q openai==3.63.0
fi
export SWITCHYARD_TEST_OPENAI_PYTHON="$openai_venv/bin/python"

# Unit and integration tests of every crate (there are no doc tests), then one summary line.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set -o pipefail
cargo test --release --workspace --lib --bins --tests "$@" 2>&1 | tee "$log"
# The committed OpenAPI spec must validate as OpenAPI 3 with an external validator (a venv in
# the cache, made once).
venv="$cache/openapi-venv"
if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
  python3 -m venv "$venv" && "$venv/bin/pip" install -q openapi-spec-validator==0.9.0
fi
"$venv/bin/openapi-spec-validator" openapi/openapi.json | tee -a "$log"
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
