"""Validates a compose file against the Compose Specification's JSON schema.

Usage: validate-compose.py SCHEMA.json COMPOSE.yaml. Prints each violation with its path and
exits 1 if there is any. scripts/lint-deploy.sh runs it with the schema docker-compose's wheel
ships (the wheel is only downloaded and read, never installed)."""

import json
import sys

import jsonschema
import yaml

schema = json.load(open(sys.argv[1]))
with open(sys.argv[2]) as f:
    document = yaml.safe_load(f)
# The schema names draft 2019-09 with a trailing "#" that jsonschema does not look up.
validator = jsonschema.Draft201909Validator(schema)
errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
for error in errors:
    print(f"{sys.argv[2]}: {'/'.join(map(str, error.path)) or '(top)'}: {error.message}")
sys.exit(1 if errors else 0)
