"""`baton up --prefill-tp 2` on GPUs: the Ray placement-group TP launcher end to end, checked against
the engine run directly.

    bash benchmarks/ray_tp_gpu.sh a; bash benchmarks/ray_tp_gpu.sh b     # device: two calls (Ray travels in two parts)
    python benchmarks/ray_tp_gpu.py --out DIR                            # wherever Ray is installed, >= 3 GPUs
    python benchmarks/ray_tp_gpu.py --cpu-smoke --out /tmp/rtp           # the same steps on the CPU (gloo)

Lifecycle:
1. Model: by default a small random Llama *checkpoint* written with transformers
   (``tests/helpers/tiny_models.make_tiny_model``). A ``dummy:`` preset cannot be
   checked against TP=1: its weights are drawn per shard, so TP=2 is another
   model (engine/models/loader.py). ``--model dummy:llama3-8b --no-compare`` runs
   real shapes for TTFT only. The router gets a word-level tokenizer ``t<id>``
   (``t5 t6``) over the model's vocabulary — the device lacks SmolLM2's GGUF —
   so prompts go as token ids and the streamed text gives the ids back.
2. Reference (``--reference``, a subprocess started first, on the last GPU): the
   engine run directly (``LLMEngine``, TP=1, same engine settings), each prompt
   alone, greedy, ``ignore_eos``.
3. Cluster: ``python -m cluster.cli up --prefill-tp 2 ...`` — the CLI itself, in
   its own session: a local Ray with the machine's GPUs, the in-process store
   actor (``redis.embedded_server=false``: the device has no redis-server, and
   the same path runs here), one TP=2 prefill worker (placement group of two
   ``{CPU, GPU: 1}`` bundles, STRICT_PACK), one TP=1 decode worker (one more GPU),
   the router on a free port with ``local_prefill_threshold=0`` (every request is
   disaggregated). Ready when the state file names the router.
4. Placement: this script joins the Ray cluster as a second driver, reads the
   controller's state and every worker's ``placement()`` (each rank's pid, node,
   Ray GPU ids, ``CUDA_VISIBLE_DEVICES``, the CUDA devices it sees), the
   placement groups' table, and ``nvidia-smi``'s GPU of each pid.
5. Requests through the router's OpenAI HTTP API (streamed ``/v1/completions``,
   temperature 0, ``ignore_eos``): one warm-up, then each prompt alone (TTFT
   per request, the router's TTFT phases), then all at once; every completion's
   ids compared with the reference's.
6. Stop: SIGTERM to `baton up` (it shuts the cluster and Ray down), its session
   killed after a grace period; NCCL's transport lines (``NCCL_DEBUG=INFO`` on
   GPU: P2P/NVLink or SHM between the TP ranks) and the logs are kept.

Out (``--out``): ``<name>.json`` (environment, the `baton up` command, placement,
requests, TTFT, the check, worker stats, NCCL's transports) and
``<name>_logs.tar.gz`` (`baton up`'s log, the reference's, Ray's session logs).
Exit 0 when every request completed with all its tokens, every request was
prefilled on the TP worker (the router's TTFT phases: no local prefill), the
placement holds (TP ranks in distinct processes, on GPU one distinct GPU each)
and, unless ``--no-compare``, each prompt's ids equal the reference's when sent
alone (all at once is recorded too). SIGTERM (``timeout``) still stops the
cluster and writes what exists.

GPUs: TP=2 prefill + TP=1 decode is 3 GPUs (``pools.num_gpus`` is per process and a
TP>1 rank needs a whole GPU), so ask for ``nvidia-h200-x4``; the 4th GPU runs the
reference. On 2 GPUs the script stops at once and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# the checkpoint's shape: a small Llama (GQA, head_dim 64) that TP=2 shards
GPU_SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                 num_attention_heads=16, num_kv_heads=8, max_position_embeddings=4096)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_kv_heads=2, max_position_embeddings=512)


# -- model and tokenizer -------------------------------------------------------

def make_checkpoint(folder: Path, shape: dict) -> Path:
    from tests.helpers.tiny_models import make_tiny_model

    if (folder / "config.json").is_file():
        return folder
    shape = dict(shape)
    return make_tiny_model(folder, "llama", vocab_size=shape.pop("vocab_size"),
                           num_kv_heads=shape.pop("num_kv_heads"), **shape)


def write_id_tokenizer(folder: Path, vocab_size: int, eos_id: int | None) -> Path:
    """A word-level tokenizer whose token i is ``t<i>`` (whitespace-split): ids in, ids out."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if eos_id is not None:
        cfg["eos_token"] = f"t{eos_id}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def text_ids(text: str) -> list[int]:
    return [int(t) for t in re.findall(r"t(\d+)", text)]


def make_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


# -- the reference: the engine run directly ------------------------------------

def reference_main(spec_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s reference %(name)s: %(message)s")
    from engine import EngineConfig, LLMEngine, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(**spec["engine"]))
    build_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    tokens = [engine.generate([p], params)[0].token_ids for p in spec["prompts"]]     # each prompt alone
    out = {"tokens": [list(t) for t in tokens], "build_s": round(build_s, 2),
           "wall_s": round(time.perf_counter() - t0, 2), "device": str(engine.device)}
    if engine.device.type == "cuda":
        import torch
        out["gpu"] = torch.cuda.get_device_name(engine.device)
    Path(spec["out"]).write_text(json.dumps(out))
    engine.close()
    return 0


# -- the cluster: `baton up` ---------------------------------------------------

def baton_up_argv(args, model: str, tokenizer: Path, port: int, ray_dir: str) -> list[str]:
    """The `baton up` command line (also printed and recorded: it is what a user would type)."""
    router_options = {"tokenizer": str(tokenizer), "local_prefill_threshold": 0, "worker_stats_timeout_s": 2.0}
    sets = {"pools.num_gpus": 1 if args.device == "cuda" else 0, "pools.num_cpus": args.num_cpus_per_rank,
            "engine.device": args.device, "engine.dtype": args.dtype, "engine.block_size": 16,
            "engine.num_kv_blocks": args.num_kv_blocks, "engine.max_model_len": args.max_model_len,
            "engine.max_num_batched_tokens": args.max_num_batched_tokens,
            "engine.extra": {"attention_backend": args.attention, "enforce_eager": args.enforce_eager},
            "redis.embedded_server": False, "ray.temp_dir": ray_dir, "router.options": router_options}
    argv = ["up", "--prefill", "1", "--decode", "1", "--colocated", "0", "--prefill-tp", str(args.tp),
            "--model", model, "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0"]
    if args.ray_num_cpus:
        argv += ["--num-cpus", str(args.ray_num_cpus)]
    for k, v in sets.items():
        if v is not None:
            argv += ["--set", f"{k}={json.dumps(v)}"]       # JSON is YAML: --set parses it back
    return argv


def engine_fields(args, model: str) -> dict:
    """The EngineConfig the cluster's workers get (less TP and mode), for the reference."""
    from cluster.cli import build_parser, _config_from_args

    cfg = _config_from_args(build_parser().parse_args(baton_up_argv(args, model, Path("/x"), 1, "/tmp/x")))
    e = cfg.engine.to_engine_config()
    keys = ("model", "dtype", "device", "block_size", "num_kv_blocks", "max_model_len", "max_num_batched_tokens",
            "max_num_seqs", "attention_backend", "enforce_eager", "seed", "enable_prefix_caching")
    return {k: getattr(e, k) for k in keys if hasattr(e, k)}


class BatonUp:
    """`python -m cluster.cli up ...` in its own session, with its own state dir."""

    def __init__(self, argv: list[str], log_path: Path, env: dict):
        self.state_dir = Path(tempfile.mkdtemp(prefix="baton-state-"))
        self.log_path = log_path
        env = {**env, "BATON_STATE_DIR": str(self.state_dir)}
        self.t0 = time.monotonic()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], cwd=ROOT, env=env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout_s: float) -> dict:
        path = self.state_dir / "cluster.json"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                st = json.loads(path.read_text())
                if st.get("http_url"):
                    st["ready_s"] = round(time.monotonic() - self.t0, 1)
                    return st
            except (OSError, ValueError):
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"baton up exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"baton up not ready after {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_s: float = 90.0, hurry=lambda: False) -> int | None:
        """SIGTERM (what `baton down` sends), up to ``grace_s`` to shut down (10 s once ``hurry()``),
        then SIGKILL to its whole session: Ray's processes are in it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                if hurry():
                    deadline = min(deadline, time.monotonic() + 10.0)
                time.sleep(0.2)
            if self.proc.poll() is None:
                print(f"baton up did not stop in time: killing its session", flush=True)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)
        import shutil
        shutil.rmtree(self.state_dir, ignore_errors=True)
        return self.proc.returncode


# -- what Ray and the GPUs say ----------------------------------------------------

def gpu_of_pids() -> dict[int, dict]:
    """pid → {gpu index, uuid, MiB used} from nvidia-smi (empty without one)."""
    def query(what: str, fields: str) -> list[list[str]]:
        try:
            out = subprocess.run(["nvidia-smi", f"--query-{what}={fields}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]

    index = {uuid: int(i) for i, uuid in query("gpu", "index,uuid")}
    return {int(pid): {"gpu": index.get(uuid), "uuid": uuid, "used_mib": int(mem) if mem.isdigit() else mem}
            for pid, uuid, mem in query("compute-apps", "pid,gpu_uuid,used_memory") if pid.isdigit()}


def cluster_view(state: dict) -> dict:
    """Controller state, each worker's ranks (placement()) and placement group, GPUs by pid."""
    import ray

    from cluster.controller import get_controller

    controller = get_controller(state.get("namespace", "baton"))
    cstate = ray.get(controller.state.remote(), timeout=60)
    table = ray.util.placement_group_table()
    by_pid = gpu_of_pids()
    workers = []
    for w in cstate["workers"]:
        actor = ray.get(controller.worker_actor.remote(w["worker_id"]), timeout=30)
        ranks = ray.get(actor.placement.remote(), timeout=60)
        stats = ray.get(actor.stats.remote(), timeout=30)          # now, not the controller's last poll
        for r in ranks:
            r["nvidia_smi"] = by_pid.get(r["pid"])
        pg = table.get(w["placement_group"], {})
        workers.append({"worker_id": w["worker_id"], "role": w["role"], "status": w["status"], "tp": w["tp"],
                        "address": w["address"], "ranks": ranks,
                        "placement_group": {"id": w["placement_group"], "state": pg.get("state"),
                                            "strategy": pg.get("strategy"), "bundles": pg.get("bundles"),
                                            "bundles_to_node_id": pg.get("bundles_to_node_id")},
                        "stats": stats})
    return {"workers": workers, "events": cstate.get("events", []),
            "cluster_resources": ray.cluster_resources(), "available_resources": ray.available_resources()}


def placement_checks(view: dict, device: str, tp: int) -> list[str]:
    """What must hold of the placement (empty: all good)."""
    problems = []
    prefill = [w for w in view["workers"] if w["role"] == "prefill"]
    if not prefill:
        return ["no prefill worker"]
    p = prefill[0]
    if p["placement_group"]["state"] != "CREATED":
        problems.append(f"prefill placement group is {p['placement_group']['state']}")
    if [r["rank"] for r in p["ranks"]] != list(range(tp)):
        problems.append(f"prefill ranks {[r['rank'] for r in p['ranks']]}, expected 0..{tp - 1}")
    if len({r["pid"] for r in p["ranks"]}) != tp:
        problems.append("prefill ranks share a process")
    if device == "cuda":
        every = [r for w in view["workers"] for r in w["ranks"]]
        for r in every:
            if len(r["ray_gpu_ids"]) != 1 or len(r["cuda_devices"]) != 1:
                problems.append(f"pid {r['pid']} sees Ray GPU ids {r['ray_gpu_ids']} and "
                                f"{len(r['cuda_devices'])} CUDA devices (expected one)")
        uuids = [r["cuda_devices"][0]["uuid"] for r in every if r["cuda_devices"]]
        if len(set(uuids)) != len(uuids):
            problems.append(f"two processes on one GPU: {uuids}")
    return problems


def nccl_summary(paths: list[Path], limit: int = 30) -> dict:
    """What NCCL's INFO logs say about how processes connect: each transport (``via P2P/...``, ``via
    SHM``, NET) counted over channel lines, plus the version, ``Init COMPLETE`` (rank, cudaDev, nvmlDev,
    busId) and WARN lines (first ``limit``)."""
    transports: dict[str, int] = {}
    lines: list[str] = []
    keep = re.compile(r"NCCL (WARN|INFO (NCCL version|.*Init COMPLETE|.*comm .* rank .* nranks))")
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if "NCCL" not in line:
                continue
            m = re.search(r"NCCL INFO Channel .* via (\S+)", line)
            if m:
                transports[m.group(1)] = transports.get(m.group(1), 0) + 1
            elif keep.search(line) and len(lines) < limit:
                line = line.strip()[:260]
                if line not in lines:
                    lines.append(line)
    return {"transports": transports, "lines": lines}


# -- requests through the router ------------------------------------------------

async def complete(client, model: str, ids: list[int], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    out = {"prompt_len": len(ids), "ok": False, "text": "", "ttft_ms": None}
    try:
        stream = await client.completions.create(model=model, prompt=ids, max_tokens=max_tokens, temperature=0.0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if out["ttft_ms"] is None:
                    out["ttft_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
                out["text"] += chunk.choices[0].text
            if chunk.usage is not None:
                out["usage"] = {"prompt_tokens": chunk.usage.prompt_tokens,
                                "completion_tokens": chunk.usage.completion_tokens}
        out["ok"] = True
    except Exception as e:  # recorded, the run goes on
        out["error"] = f"{type(e).__name__}: {e}"
    out["e2e_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
    out["token_ids"] = text_ids(out["text"])
    return out


async def send_all(base_url: str, model: str, prompts: list[list[int]], max_tokens: int, warmup: list[int]) -> dict:
    import openai

    from benchmarks.serve import phase_summary, scrape_phases

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", timeout=120.0, max_retries=0)
    try:
        warm = await complete(client, model, warmup, max_tokens)
        before = await asyncio.to_thread(scrape_phases, base_url)
        alone = [await complete(client, model, p, max_tokens) for p in prompts]
        phases = phase_summary(before, await asyncio.to_thread(scrape_phases, base_url))
        together = await asyncio.gather(*(complete(client, model, p, max_tokens) for p in prompts))
    finally:
        await client.close()
    return {"warmup": warm, "alone": alone, "alone_ttft_phases": phases, "together": list(together)}


def compare(results: list[dict], reference: list[list[int]]) -> list[dict]:
    rows = []
    for i, (r, ref) in enumerate(zip(results, reference)):
        got = r["token_ids"]
        first = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), None)
        if first is None and len(got) != len(ref):
            first = min(len(got), len(ref))
        rows.append({"prompt": i, "prompt_len": r["prompt_len"], "identical": got == ref,
                     "first_mismatch": first, "got": got, "reference": ref})
    return rows


# -- main ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/baton-ray-tp-gpu")
    ap.add_argument("--name", default="ray_tp_gpu", help="output file stem")
    ap.add_argument("--model", default=None, help="default: a random Llama checkpoint written here (GPU_SHAPE)")
    ap.add_argument("--no-compare", action="store_true", help="skip the reference engine (e.g. dummy: presets)")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--attention", default="torch", help="engine attention_backend (torch: the fp32 oracle)")
    ap.add_argument("--enforce-eager", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                    help="true|false (decode CUDA graphs off by default: the fp32 torch reference path)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[32, 200, 500, 1000, 1500])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--num-kv-blocks", type=int, default=1024, help="0: size the KV cache from memory")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-cpus-per-rank", type=float, default=1.0)
    ap.add_argument("--ray-num-cpus", type=int, default=8,
                    help="CPUs of the local Ray (baton up --num-cpus; 0: all — Ray prestarts a worker per CPU)")
    ap.add_argument("--min-gpus", type=int, default=None, help="default tp + 1 (the decode worker)")
    ap.add_argument("--start-timeout", type=float, default=360.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny checkpoint on the CPU, gloo, this venv's Ray")
    ap.add_argument("--reference", metavar="SPEC", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reference:
        return reference_main(args.reference)
    if args.cpu_smoke:     # smoke values for every flag left at its default
        smoke = {"device": "cpu", "prompt_lens": [5, 13, 40], "max_tokens": 8, "num_kv_blocks": 64,
                 "max_model_len": 256, "max_num_batched_tokens": 32, "num_cpus_per_rank": 0.5, "ray_num_cpus": 4,
                 "start_timeout": 240.0}
        for k, v in smoke.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.num_kv_blocks = args.num_kv_blocks or None
    args.ray_num_cpus = args.ray_num_cpus or None
    for k, v in NO_MULTICAST.items():
        os.environ.setdefault(k, v)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="baton-ray-tp-"))
    ray_dir = f"/tmp/bt-ray-{os.getpid()}"          # Ray's socket paths must stay short
    t0 = time.monotonic()
    from benchmarks.common import environment
    result: dict = {"benchmark": "ray_tp_gpu", "env": environment("cpu"), "ok": False,
                    "config": {k: v for k, v in vars(args).items() if k != "reference"}}
    try:
        import ray
        result["env"]["ray"] = ray.__version__
    except ImportError:
        result["env"]["ray"] = None
    gpus = []
    if args.device == "cuda":
        try:
            gpus = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            gpus = []
        result["env"]["gpus"] = gpus
    logs = [work / "baton_up.log", work / "reference.log"]

    def save() -> Path:
        result["wall_s"] = round(time.monotonic() - t0, 1)
        path = out_dir / f"{args.name}.json"
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        return path

    terminated, cleaning = [], []

    def on_sigterm(*_):        # `timeout`: unwind so the cluster stops and the results are written
        terminated.append(time.monotonic())
        if not cleaning:       # already cleaning up: finish it, faster (BatonUp.stop's hurry)
            raise SystemExit(143)

    def ray_shutdown() -> None:
        """``ray.shutdown()``, then our SIGTERM handler again: Ray's core worker leaves SIGTERM at its
        default (die at once) underneath Python's handler, so the cluster would outlive us."""
        import ray
        if ray.is_initialized():
            ray.shutdown()
        signal.signal(signal.SIGTERM, on_sigterm)

    signal.signal(signal.SIGTERM, on_sigterm)
    up = None
    ref_proc = None
    try:
        need = args.min_gpus if args.min_gpus is not None else args.tp + 1
        if args.device == "cuda" and len(gpus) < need:
            raise RuntimeError(f"{len(gpus)} GPU(s): TP={args.tp} prefill + a TP=1 decode worker need {need} "
                               "(one whole GPU per process); ask for nvidia-h200-x4")
        # 1. model, tokenizer, prompts
        if args.model is None:
            shape = SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE
            model = str(make_checkpoint(work / "model", shape))
        else:
            model = args.model
        from benchmarks.local_cluster import free_port, model_vocab
        vocab, eos = model_vocab(model)
        tokenizer = write_id_tokenizer(work / "tokenizer", vocab, eos[0] if eos else None)
        prompts = make_prompts(args.prompt_lens, vocab, args.seed)
        warmup = make_prompts([min(args.prompt_lens)], vocab, args.seed + 1)[0]
        result["model"] = {"name": model, "vocab_size": vocab,
                           "shape": None if args.model else (SMOKE_SHAPE if args.cpu_smoke else GPU_SHAPE)}

        # 2. the reference, in the background (the last GPU: the cluster's processes take the first ones)
        env = {**os.environ, **NO_MULTICAST, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        if not args.no_compare:
            spec = {"engine": engine_fields(args, model), "prompts": prompts, "max_tokens": args.max_tokens,
                    "out": str(work / "reference.json")}
            (work / "reference_spec.json").write_text(json.dumps(spec))
            ref_env = dict(env)
            if args.device == "cuda":
                ref_env["CUDA_VISIBLE_DEVICES"] = gpus[-1].split(",")[0].strip()
            with open(work / "reference.log", "w") as log:
                ref_proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--reference",
                                             str(work / "reference_spec.json")], cwd=ROOT, env=ref_env,
                                            stdout=log, stderr=subprocess.STDOUT)
            result["reference_engine"] = spec["engine"]

        # 3. the cluster
        port = free_port()
        argv_up = baton_up_argv(args, model, tokenizer, port, ray_dir)
        result["baton_up"] = "baton " + " ".join(a if re.fullmatch(r"[\w./:=,-]+", a) else f"'{a}'"
                                                 for a in argv_up)
        print(result["baton_up"], flush=True)
        up_env = dict(env)
        if args.device == "cuda":
            up_env.setdefault("NCCL_DEBUG", "INFO")              # how the TP ranks connect: P2P/NVLink or SHM
            up_env.setdefault("NCCL_DEBUG_SUBSYS", "INIT")
            up_env.setdefault("RAY_memory_monitor_refresh_ms", "0")   # MemTotal reads low on these VMs at first
        up = BatonUp(argv_up, work / "baton_up.log", up_env)
        state = up.wait_ready(args.start_timeout)
        result["ready_s"] = state["ready_s"]
        print(f"cluster ready in {state['ready_s']} s at {state['http_url']} (Ray {state['ray_address']})", flush=True)

        # 4. placement, seen from a second driver
        import ray
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=state["ray_address"], namespace=state.get("namespace", "baton"),
                 logging_level=logging.ERROR, log_to_driver=False)
        signal.signal(signal.SIGTERM, on_sigterm)       # ray.init put its own (sys.exit) in place
        view = cluster_view(state)
        result["placement"] = view
        result["placement_problems"] = placement_checks(view, args.device, args.tp)
        for w in view["workers"]:
            for r in w["ranks"]:
                dev = r["cuda_devices"][0]["name"] if r["cuda_devices"] else "cpu"
                smi = r.get("nvidia_smi") or {}
                print(f"  {w['worker_id']} rank {r['rank']}: pid {r['pid']} Ray GPU ids {r['ray_gpu_ids']} "
                      f"CUDA_VISIBLE_DEVICES={r['cuda_visible_devices']} {dev} (nvidia-smi: GPU {smi.get('gpu')})",
                      flush=True)
            print(f"  {w['worker_id']} placement group {w['placement_group']['state']} "
                  f"{w['placement_group']['strategy']} bundles {w['placement_group']['bundles']}", flush=True)
        save()

        # 5. requests; the reference is done by now (or we wait for it)
        reference = None
        if ref_proc is not None:
            rc = ref_proc.wait(max(10.0, args.start_timeout - (time.monotonic() - t0)))
            if rc != 0:
                raise RuntimeError(f"the reference engine failed ({rc}):\n"
                                   + "\n".join((work / "reference.log").read_text().splitlines()[-30:]))
            ref = json.loads((work / "reference.json").read_text())
            reference = ref["tokens"]
            result["reference"] = {k: v for k, v in ref.items() if k != "tokens"}
        runs = asyncio.run(send_all(state["http_url"], model, prompts, args.max_tokens, warmup))
        result["requests"] = runs
        alone, together = runs["alone"], runs["together"]
        ok = all(r["ok"] and len(r["token_ids"]) == args.max_tokens for r in [runs["warmup"], *alone, *together])
        ttfts = [r["ttft_ms"] for r in alone if r["ttft_ms"] is not None]
        result["ttft_ms_alone"] = {f"{r['prompt_len']}": r["ttft_ms"] for r in alone}
        result["ttft_phases_alone"] = runs["alone_ttft_phases"]
        print("TTFT alone (ms): " + ", ".join(f"{r['prompt_len']} tok {r['ttft_ms']}" for r in alone), flush=True)
        if reference is not None:
            result["check_alone"] = compare(alone, reference)
            result["check_together"] = compare(together, reference)
            result["identical_alone"] = all(c["identical"] for c in result["check_alone"])
            result["identical_together"] = all(c["identical"] for c in result["check_together"])
            print(f"token-identical to the engine run directly: alone {result['identical_alone']}, "
                  f"all at once {result['identical_together']}", flush=True)
        phases = runs["alone_ttft_phases"]      # every request prefilled on the TP=2 worker, none locally
        result["disaggregated"] = (phases.get("prefill", {}).get("count", 0) == len(alone)
                                   and phases.get("local_first_token", {}).get("count", 0) == 0)
        view_after = cluster_view(state)
        result["worker_stats"] = {w["worker_id"]: w["stats"] for w in view_after["workers"]}
        ray_shutdown()
        result["ok"] = (ok and bool(ttfts) and not result["placement_problems"] and result["disaggregated"]
                        and (reference is None or result["identical_alone"]))
    except BaseException as e:   # SystemExit from SIGTERM too: the results so far are still written
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"FAILED: {result['error']}", flush=True)
        if not isinstance(e, Exception):
            raise
    finally:
        cleaning.append(True)
        try:
            ray_shutdown()
        except ImportError:
            pass
        if ref_proc is not None and ref_proc.poll() is None:
            ref_proc.kill()
        if up is not None:
            result["baton_up_rc"] = up.stop(90.0, hurry=lambda: bool(terminated))   # `timeout -k` kills us soon
            result["baton_up_tail"] = up.tail(25).splitlines()
        ray_logs = sorted(p for p in Path(ray_dir).glob("session_*/logs/*") if "session_latest" not in str(p))
        result["nccl"] = nccl_summary([p for p in ray_logs if p.suffix in (".out", ".err")] or logs)
        with tarfile.open(out_dir / f"{args.name}_logs.tar.gz", "w:gz") as tar:
            for p in [*logs, work / "reference_spec.json", *ray_logs]:
                if p.is_file() and p.stat().st_size < 8 << 20:
                    tar.add(p, arcname=f"ray/{p.name}" if p in ray_logs else p.name)
        print(f"saved {save()}", flush=True)
        if args.cpu_smoke:
            import shutil
            shutil.rmtree(ray_dir, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
