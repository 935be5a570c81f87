#!/usr/bin/env bash
# Create .venv and install rtmanager with its test extras, when not done yet
# (re-installs when pyproject.toml changed).
set -euo pipefail
cd "$(dirname "$0")/../.."
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c 'import controller, desired, observed, asyncpg, docker, redis, hiredis' \
    || { echo "venv.sh: installing rtmanager failed" >&2; exit 1; }
  rm -f .venv/.installed-*
  touch "$stamp"
fi
