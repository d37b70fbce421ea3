#!/usr/bin/env bash
# Issue #5 on nvidia-h200-x2: carried wheels (.whl, from benchmarks/device_wheels.sh) →
# benchmarks/serve_2gpu.py (1P+1D vs 2 colocated, rising rates) → $OUT/serve_2gpu.{json,md,log}
# and serve_2gpu_logs.tar.gz. Extra arguments go to serve_2gpu.py. SMOKE=1 runs the same
# steps on the CPU (tiny model). The whole script stays under ~9 minutes (python's
# --deadline-s bounds the runs; `timeout` is the backstop, and SIGTERM still writes results).
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/baton-serve-2gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch, fastapi, openai, grpc, google.protobuf as pb; from protos.gen import worker_pb2_grpc
print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'grpc', grpc.__version__, 'protobuf', pb.__version__)" \
  || { echo "the environment lacks what benchmarks/local_cluster.py needs" >&2; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
SMOKE_ARGS=(); [ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS=(--cpu-smoke)
timeout -s TERM 540 "$PY" benchmarks/serve_2gpu.py --out "$OUT" "${SMOKE_ARGS[@]}" "$@" 2>&1 | tee "$OUT/serve_2gpu.log"
