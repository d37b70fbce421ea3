#!/usr/bin/env bash
# Wheels the lent GPU machines lack (no Ray, Redis, FastAPI/uvicorn, pydantic, openai there),
# for benchmarks/local_cluster.py + benchmarks/serve.py: cp312 manylinux x86_64, --no-deps,
# pinned to the versions of this checkout's venv (so the device runs what the tests here ran).
# grpcio/protobuf/grpcio-health-checking travel too: protos/gen needs grpcio>=1.85.1 and
# protobuf 7.x at run time, newer than the device image may hold; anyio/h11/idna for the
# minimums httpx2/httpcore2 ask.
#   benchmarks/device_wheels.sh [DIR]      (default .whl, ignored by git; carry it)
# On the device: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
#   --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PY:-.venv/bin/python}
PKGS="fastapi starlette pydantic pydantic_core annotated-types annotated-doc typing-inspection typing_extensions
opentelemetry-api uvicorn h11 anyio idna openai httpx2 httpcore2 truststore jiter sniffio grpcio grpcio-health-checking protobuf"
PINS=()
for p in $PKGS; do
  v=$("$PY" -m pip show "$p" 2>/dev/null | awk '/^Version:/{print $2}')
  [ -n "$v" ] || { echo "$p is not installed in $PY's environment" >&2; exit 1; }
  PINS+=("$p==$v")
done
mkdir -p "$DIR"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR" "${PINS[@]}"
ls -la "$DIR"; du -sh "$DIR"
