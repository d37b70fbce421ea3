#!/usr/bin/env bash
# The one batched multi-GPU run (nvidia-h200-x2): environment, the `multigpu`
# tests, then benchmarks/kv_transfer.py and benchmarks/disagg_overhead.py.
# Logs and JSON go to $OUT. SMOKE=1 runs the same steps on CPU (gloo, tiny sizes);
# TESTS=... narrows the pytest step.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/baton-multigpu}; mkdir -p "$OUT"
PY=${PY:-python3}
SMOKE_ARGS=""; [ "${SMOKE:-0}" = 1 ] && SMOKE_ARGS="--cpu-smoke"
t0=$(date +%s)
{ nvidia-smi; nvidia-smi topo -m; "$PY" -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version() if torch.cuda.is_available() else None)"; } > "$OUT/env.log" 2>&1
TESTS=${TESTS:-tests/kvtransfer/test_kv_nccl_gpu.py tests/engine/test_tensor_parallel_gpu.py}
timeout 140 "$PY" -m pytest -p no:cacheprovider -q -rA -s -m multigpu $TESTS > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? at $(( $(date +%s) - t0 ))s"
timeout 90 "$PY" benchmarks/kv_transfer.py $SMOKE_ARGS --out "$OUT/kv_transfer_h200x2.json" > "$OUT/bench_kv.log" 2>&1
echo "kv_transfer rc=$? at $(( $(date +%s) - t0 ))s"
timeout 150 "$PY" benchmarks/disagg_overhead.py $SMOKE_ARGS --out "$OUT/disagg_overhead_h200x2.json" > "$OUT/bench_disagg.log" 2>&1
echo "disagg rc=$? at $(( $(date +%s) - t0 ))s"
for f in env pytest bench_kv bench_disagg; do echo "=== $f"; tail -n 30 "$OUT/$f.log"; done
