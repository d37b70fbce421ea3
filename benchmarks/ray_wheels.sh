#!/usr/bin/env bash
# Ray for the lent GPU machines (their image has no Ray), in two carry folders small enough for
# the device tool (64 MiB a call, the working tree included): benchmarks/ray_tp_gpu.sh runs them.
#   benchmarks/ray_wheels.sh [DIR]      (default .raywhl, ignored by git)
# What it fetches (cp312 manylinux x86_64, --no-deps, pinned to this venv's versions):
#   - ray==<.venv's version> (~76 MiB: too big for one call, so it is split in two byte ranges);
#   - every runtime dependency of Ray, and of redis-py, that the device image lacks: the closure of
#     their Requires-Dist (extras skipped, markers for CPython 3.12 on Linux), not descending into
#     packages the image already holds (IMAGE below, from .library/device/KINDS.md);
#   - redis (redis-py): cluster/memory_store.py imports redis.exceptions; the in-process store actor
#     stands in for a redis-server (none on the device, and `baton up` falls back to it by itself).
# Out:
#   DIR/a/<ray wheel>.part1                      call a carries DIR/a
#   DIR/b/<ray wheel>.part2, ray.sha256,         call b carries DIR/b and .whl (benchmarks/device_wheels.sh:
#   DIR/b/*.whl, DIR/b/image-requires.txt          FastAPI, uvicorn, openai, grpcio, protobuf, ...)
#   DIR/image-packages.txt                       (not carried: SMOKE=1 ray_tp_gpu.sh hides the rest)
# The split point balances the two calls. image-requires.txt lists what Ray needs from the image
# (e.g. packaging>=24.2) for ray_tp_gpu.sh to check there.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.raywhl}
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS:-.whl}           # rides with call b
LIMIT_MIB=${LIMIT_MIB:-60}       # per call, tracked tree included (the tool's limit is 64)
# The device image's Python packages (KINDS.md, read 2026-11-17).
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham
simplejson six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore
threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"

# name==version of what the image lacks (stdout), and the image's part of the requirements (image-requires.txt)
mkdir -p "$DIR/dl" "$DIR/a" "$DIR/b"
echo "$IMAGE" | tr ' ' '\n' > "$DIR/image-packages.txt"       # for ray_tp_gpu.sh's SMOKE=1 (not carried)
PINS=$(IMAGE="$IMAGE" "$PY" - "$DIR/b/image-requires.txt" <<'EOF'
import importlib.metadata as md, os, re, sys
from packaging.requirements import Requirement

canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
image = {canon(n) for n in os.environ["IMAGE"].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
need, from_image, todo, seen = {"ray": md.version("ray"), "redis": md.version("redis")}, [], ["ray", "redis"], set()
while todo:
    for r in md.requires(todo.pop()) or []:
        req = Requirement(r)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canon(req.name)
        if name in image:
            from_image.append(f"{name}{req.specifier}")
        elif name not in seen and name not in need:
            need[name] = md.version(name)      # installed here, so this venv's version is the one tested
            todo.append(name)
        seen.add(name)
open(sys.argv[1], "w").write("\n".join(sorted(set(from_image))) + "\n")
print(" ".join(f"{n}=={v}" for n, v in sorted(need.items())))
EOF
)
echo "downloading: $PINS"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR/dl" $PINS

# keep exactly the pinned wheels (an older download of another version would be a second copy)
rm -f "$DIR"/a/* "$DIR"/b/*.whl "$DIR"/b/*.part2 "$DIR"/b/ray.sha256
for pin in $PINS; do
  name=${pin%%==*}; ver=${pin#*==}
  f=$(ls "$DIR"/dl/ | grep -iE "^${name//-/[-_.]}-${ver//./\\.}-" | head -1)
  [ -n "$f" ] || { echo "no wheel for $pin in $DIR/dl" >&2; exit 1; }
  if [ "$name" = ray ]; then RAY="$DIR/dl/$f"; else cp "$DIR/dl/$f" "$DIR/b/"; fi
done
mib() { awk -v b="$1" 'BEGIN{printf "%.1f MiB", b/1048576}'; }
bytes() { du -sb "$@" 2>/dev/null | awk '{s+=$1} END{print s+0}'; }
ray_b=$(stat -c %s "$RAY")
deps_b=$(bytes "$DIR"/b/*.whl)
whl_b=0
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then whl_b=$(bytes "$WHEELS"); else
  echo "warning: $WHEELS has no wheels: run benchmarks/device_wheels.sh first (call b carries it)" >&2; fi
tree_b=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | awk 'END{print $1+0}')
part1=$(( (ray_b + deps_b + whl_b + 1) / 2 ))
[ "$part1" -le "$ray_b" ] || part1=$ray_b
name=$(basename "$RAY")
head -c "$part1" "$RAY" > "$DIR/a/$name.part1"
tail -c +"$((part1 + 1))" "$RAY" > "$DIR/b/$name.part2"
(cd "$DIR/dl" && sha256sum "$name") > "$DIR/b/ray.sha256"
a_b=$(bytes "$DIR/a"); b_b=$(bytes "$DIR/b")
echo
echo "ray wheel      $name $(mib "$ray_b") (split at byte $part1)"
echo "ray deps       $(ls "$DIR"/b/*.whl | xargs -n1 basename | tr '\n' ' ')($(mib "$deps_b"))"
echo "from the image $(tr '\n' ' ' < "$DIR/b/image-requires.txt")"
echo "working tree   $(mib "$tree_b") (tracked + untracked-not-ignored: travels with every call)"
echo "call a carry   $DIR/a                 $(mib "$a_b")  -> $(mib $((a_b + tree_b))) with the tree"
echo "call b carry   $DIR/b $WHEELS    $(mib "$b_b") + $(mib "$whl_b")  -> $(mib $((b_b + whl_b + tree_b))) with the tree"
for total in $((a_b + tree_b)) $((b_b + whl_b + tree_b)); do
  [ "$total" -le $((LIMIT_MIB * 1048576)) ] || { echo "over ${LIMIT_MIB} MiB: $(mib "$total")" >&2; exit 1; }
done
