"""1P+1D vs 2 colocated replicas on 2 GPUs at rising request rates (issue #5): the table DistServe draws.

    python benchmarks/serve_2gpu.py --out "$OUT"                 # nvidia-h200-x2, dummy:llama3-8b bf16
    python benchmarks/serve_2gpu.py --cpu-smoke --out /tmp/s2    # same steps, tiny model on the CPU
    bash benchmarks/serve_2gpu.sh                                # on the device: wheels from .whl first

For each topology (``1p1d``: prefill on GPU 0, decode on GPU 1, KV over NCCL;
``2x-colocated``: one whole-request worker per GPU): start
``benchmarks/local_cluster.py`` (a subprocess in its own session: worker
processes + the router; no Ray, no Redis) → one warm-up burst (not counted:
Triton compiles, NCCL pair set-up) → ``benchmarks/serve.py`` at each rate
(Poisson arrivals, ``--dataset random-ids``, ``ignore_eos`` so every request
makes exactly ``--output-len`` tokens; ``rate × --seconds-per-rate`` prompts,
at least ``--min-prompts``) → stop the cluster (SIGTERM, then SIGKILL of its
session) so the GPUs are free for the next one.

Reported per (topology, rate): the offered rate the client achieved (requests
sent / send window: one asyncio client falls behind a high nominal rate),
completed requests, how many were prefilled on
the worker that decodes them (``local prefill``: all of them when colocated;
with a prefill worker, only when the router found it unusable — should be 0),
request throughput, TTFT and TPOT p50/p90, and for every ``--slo
TTFT_MS:TPOT_MS`` the goodput (requests/s meeting both) and the SLO attainment
(% of requests meeting both). The first SLO is the headline (default TTFT <=
400 ms, TPOT <= 40 ms); the second (100 ms / 20 ms) is a tighter one, for an
8B model on H200s where a 1k-token prefill takes ~25 ms. Per-request latencies
are kept in the JSON, so any other SLO can be computed later. After each
topology, every worker's counters (KV transfers and their GB/s, preemptions)
are printed and kept: NCCL moves tens of GB/s, a gRPC fallback about one.

Out (``--out``, three files: the device tool brings back at most 8):
``serve_2gpu.json`` (environment, config, every run's full serve report),
``serve_2gpu.md`` (the table, also printed last), ``serve_2gpu_logs.tar.gz``
(cluster, worker and router logs).

Time: ``--deadline-s`` bounds the whole script (builds included): each
topology gets an equal share of what is left when it starts, and a rate whose
run would overrun it is skipped (and listed as skipped). Set
``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1``
(this script sets them for its children when unset).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import serve  # noqa: E402
from benchmarks.local_cluster import free_port, model_vocab  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DRAIN_S = 5.0           # allowance per run for the last requests to finish


def parse_slo(text: str) -> tuple[float, float]:
    ttft, tpot = text.split(":")
    return float(ttft), float(tpot)


def slo_name(slo: tuple[float, float]) -> str:
    return f"ttft<={slo[0]:g}ms,tpot<={slo[1]:g}ms"


def goodput(report: dict, slo: tuple[float, float]) -> tuple[float, float]:
    """(good requests / s, % of completed requests) under ``slo``, from the per-request latencies."""
    reqs = report.get("requests", [])
    good = sum(1 for r in reqs if r["ttft_ms"] <= slo[0] and (r["tpot_ms"] or 0.0) <= slo[1])
    total = report["completed"] + report["failed"]
    return good / report["duration_s"] if report["duration_s"] else 0.0, 100.0 * good / total if total else 0.0


def _offered(report: dict) -> str:
    """The offered rate the client achieved (requests sent / send window; serve.py), '-' when unknown."""
    rate = report.get("offered_rate")
    return "-" if rate is None else f"{rate:.1f}"


class Cluster:
    """``python -m benchmarks.local_cluster`` as a subprocess in its own session."""

    def __init__(self, topology: str, args, log_dir: Path):
        self.topology = topology
        self.log_dir = log_dir / topology
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.ready_file = self.log_dir / "ready.json"
        self.ready_file.unlink(missing_ok=True)
        self.port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.local_cluster", "--topology", topology, "--model", args.model,
               "--dtype", args.dtype, "--device", args.device, "--http-port", str(self.port),
               "--ready-file", str(self.ready_file), "--log-dir", str(self.log_dir),
               "--max-model-len", str(args.max_model_len or args.input_len + args.output_len + 64)]
        if args.gpus:
            cmd += ["--gpus", args.gpus]
        cmd += args.cluster_args.split()
        env = {**NO_MULTICAST, **os.environ, "PYTHONUNBUFFERED": "1"}
        self.t0 = time.monotonic()
        with open(self.log_dir / "cluster.log", "w") as log:     # the child keeps its own fd
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.is_file():
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster {self.topology} exited with {self.proc.returncode}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {self.topology} not ready after {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)
        info = json.loads(self.ready_file.read_text())
        info["start_s"] = round(time.monotonic() - self.t0, 1)
        return info

    def tail(self, lines: int = 30) -> str:
        out = []
        for f in sorted(self.log_dir.glob("*.log")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                print(f"cluster {self.topology} did not stop in {timeout_s:.0f} s: killing its session", flush=True)
        try:                               # workers left behind (a crashed parent) go with the session
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def serve_args(args, base_url: str, rate: float, num_prompts: int, seed: int, label: str) -> argparse.Namespace:
    argv = ["--base-url", base_url, "--dataset", "random-ids", "--random-ids-vocab", str(args.vocab),
            "--num-prompts", str(num_prompts), "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--request-rate", str(rate), "--ignore-eos",
            "--goodput-ttft-ms", str(args.slos[0][0]), "--goodput-tpot-ms", str(args.slos[0][1]),
            "--timeout", str(args.request_timeout), "--seed", str(seed), "--label", label, "--save-detailed",
            "--no-save"]
    a = serve.add_arguments(argparse.ArgumentParser()).parse_args(argv)
    serve.validate(a)
    return a


def run_rate(args, base_url: str, rate: float, num_prompts: int, seed: int, label: str) -> dict:
    a = serve_args(args, base_url, rate, num_prompts, seed, label)
    before = serve.scrape_phases(base_url)
    report = asyncio.run(serve.run(a))
    report["router_ttft_phases"] = serve.phase_summary(before, serve.scrape_phases(base_url))
    return report


async def _worker_stats(addresses: list[str]) -> list[dict]:
    from workers.client import WorkerClient
    out = []
    for address in addresses:
        async with WorkerClient(address, timeout_s=5.0) as client:
            s = await client.stats()
        out.append({k: getattr(s, k) for k in ("worker_id", "role", "num_total_blocks", "num_preemptions",
                                               "kv_transfers", "kv_transfer_bytes", "kv_transfer_seconds",
                                               "kv_transfer_failures", "num_expired_holds")})
    return out


def worker_stats(cluster: Cluster, info: dict) -> list[dict]:
    """Each worker's counters (KV blocks, preemptions, KV transfers) and how many pulls fell
    fell back to gRPC after a failed NCCL rendezvous (the decode workers log it; a holder that
    advertises no NCCL store, ``kv_transport_address`` empty in the ready info, is not logged: the
    GB/s says it — NCCL moves tens of GB/s, gRPC about one)."""
    stats = asyncio.run(_worker_stats([w["address"] for w in info["workers"]]))
    for s in stats:
        text = (cluster.log_dir / f"{s['worker_id']}.log").read_text(errors="replace")
        s["nccl_rendezvous_failures_logged"] = text.count("no NCCL path")
        if s["kv_transfer_seconds"]:
            s["kv_transfer_gbps"] = round(s["kv_transfer_bytes"] / s["kv_transfer_seconds"] / 1e9, 2)
    return stats


def run_topology(out: dict, args, log_dir: Path, budget_s: float, save) -> None:
    """Fill ``out`` (``{"topology": ...}``) with the topology's runs; ``save()`` after each."""
    t_start = time.monotonic()
    topology = out["topology"]
    out.update(runs=[], skipped_rates=[])
    cluster = Cluster(topology, args, log_dir)
    try:
        out["cluster"] = cluster.wait_ready(min(args.start_timeout, budget_s))
        print(f"[{topology}] ready in {out['cluster']['start_s']} s: "
              + ", ".join(f"{w['worker_id']}@gpu{w['gpu']} built {w['build_s']} s"
                          + (f" (graphs {w['graph_capture_s']} s)" if w.get("graph_capture_s") else "")
                          + (f" (KV store {w['kv_transport_address'] or 'none: gRPC only'})"
                             if w["role"] == "prefill" else "") for w in out["cluster"]["workers"]),
              flush=True)
        t0 = time.monotonic()
        warm = run_rate(args, cluster.base_url, float("inf"), args.warmup, 10_000, f"{topology}-warmup")
        print(f"[{topology}] warm-up: {warm['completed']}/{args.warmup} in {time.monotonic() - t0:.1f} s"
              + (f" errors {warm['errors']}" if warm["errors"] else ""), flush=True)
        for i, rate in enumerate(args.rates):
            n = max(args.min_prompts, math.ceil(rate * args.seconds_per_rate))
            estimate = n / rate + DRAIN_S
            left = budget_s - (time.monotonic() - t_start)
            if estimate > left:
                out["skipped_rates"].append(rate)
                print(f"[{topology}] rate {rate:g}: skipped ({estimate:.0f} s needed, {left:.0f} s left)", flush=True)
                continue
            report = run_rate(args, cluster.base_url, rate, n, args.seed + i, f"{topology}-rate{rate:g}")
            report["topology"], report["rate"] = topology, rate
            out["runs"].append(report)
            save()
            g, att = goodput(report, args.slos[0])
            print(f"[{topology}] rate {rate:>5g}: {report['completed']}/{n} ok in {report['duration_s']:.1f} s, "
                  f"offered {_offered(report)} req/s, TTFT p90 {report['p90_ttft_ms']:.1f} ms, TPOT p90 {report['p90_tpot_ms']:.2f} ms, "
                  f"goodput {g:.2f} req/s ({att:.0f}% in SLO)"
                  + (f" errors {report['errors']}" if report["errors"] else ""), flush=True)
        out["workers"] = worker_stats(cluster, out["cluster"])
        for s in out["workers"]:
            if s["kv_transfers"] or s["nccl_rendezvous_failures_logged"] or s["num_preemptions"]:
                print(f"[{topology}] {s['worker_id']}: {s['kv_transfers']} KV transfers "
                      f"({s['kv_transfer_bytes'] / 2**30:.1f} GiB, {s.get('kv_transfer_gbps', 0)} GB/s), "
                      f"{s['nccl_rendezvous_failures_logged']} NCCL rendezvous failures, "
                      f"{s['num_preemptions']} preemptions",
                      flush=True)
    except Exception as e:   # one topology failing still leaves the other's results
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"[{topology}] FAILED: {out['error']}", flush=True)
    finally:
        cluster.stop()
        out["wall_s"] = round(time.monotonic() - t_start, 1)


def table(results: list[dict], slos: list[tuple[float, float]]) -> str:
    head = ["rate (req/s)", "offered (req/s)", "topology", "done", "local prefill", "req/s", "TTFT p50", "TTFT p90",
            "TPOT p50", "TPOT p90"]
    for s in slos:
        head += [f"goodput {s[0]:g}/{s[1]:g}", f"in SLO {s[0]:g}/{s[1]:g}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = sorted(((r["rate"], t["topology"], r) for t in results for r in t["runs"]), key=lambda x: (x[0], x[1]))
    for rate, topo, r in rows:
        local = r["router_ttft_phases"].get("local_first_token", {}).get("count", 0)
        cells = [f"{rate:g}", _offered(r), topo, f"{r['completed']}/{r['completed'] + r['failed']}", str(local),
                 f"{r['request_throughput']:.2f}", f"{r['median_ttft_ms']:.1f}", f"{r['p90_ttft_ms']:.1f}",
                 f"{r['median_tpot_ms']:.2f}", f"{r['p90_tpot_ms']:.2f}"]
        for s in slos:
            g, att = goodput(r, s)
            cells += [f"{g:.2f}", f"{att:.0f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "serve_2gpu"))
    ap.add_argument("--topologies", nargs="+", default=["1p1d", "2x-colocated"])
    ap.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 24, 32, 40, 48])
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--seconds-per-rate", type=float, default=10.0, help="prompts per rate = rate × this")
    ap.add_argument("--min-prompts", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=16, help="requests sent at once (not counted) after start")
    ap.add_argument("--slo", action="append", default=None, help="TTFT_MS:TPOT_MS (repeatable; first = headline)")
    ap.add_argument("--model", default="dummy:llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--gpus", default=None, help="GPU indices in worker order (default 0,1)")
    ap.add_argument("--max-model-len", type=int, default=None, help="default input + output + 64")
    ap.add_argument("--cluster-args", default="", help="more benchmarks.local_cluster flags, one string")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--start-timeout", type=float, default=300.0)
    ap.add_argument("--deadline-s", type=float, default=450.0, help="the whole script, builds included")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, short runs")
    args = ap.parse_args(argv)
    if args.cpu_smoke:      # smoke values for every flag left at its default
        smoke = {"model": "dummy:llama-tiny", "dtype": "float32", "device": "cpu", "rates": [2, 4],
                 "input_len": 128, "output_len": 16, "seconds_per_rate": 3.0, "min_prompts": 6, "warmup": 4,
                 "deadline_s": 240.0}
        for k, v in smoke.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
    args.slos = [parse_slo(s) for s in (args.slo or ["400:40", "100:20"])]
    args.vocab = model_vocab(args.model)[0] or 32000
    for k, v in NO_MULTICAST.items():
        os.environ.setdefault(k, v)

    t0 = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_2gpu_logs_{os.getpid()}"
    from benchmarks.common import environment
    env = environment("cpu")     # no CUDA context in this process: the GPUs are the workers'
    if args.device == "cuda":
        env["device"] = "cuda"
        try:
            env["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            env["gpu"] = "unknown"
    results: list[dict] = []

    def save(final: bool = False) -> str:
        """Write what exists so far (a run killed at its time limit still leaves its results)."""
        config = {k: v for k, v in vars(args).items() if k != "slos"}
        config["slos"] = [slo_name(s) for s in args.slos]
        text = table(results, args.slos)
        payload = {"benchmark": "serve_2gpu", "env": env, "config": config, "table": text, "complete": final,
                   "wall_s": round(time.monotonic() - t0, 1), "topologies": results}
        (out / "serve_2gpu.json").write_text(json.dumps(payload, indent=1) + "\n")
        header = (f"{args.model} {args.dtype}, input {args.input_len} / output {args.output_len} tokens, "
                  f"Poisson arrivals; TTFT/TPOT in ms, goodput in req/s; SLOs "
                  + ", ".join(slo_name(s) for s in args.slos) + f". Wall {payload['wall_s']} s.")
        notes = [f"{t['topology']}: rates {t['skipped_rates']} skipped (deadline)"
                 for t in results if t.get("skipped_rates")]
        notes += [f"{t['topology']}: {t['error']}" for t in results if t.get("error")]
        md = "\n".join([header, "", text, *([""] + notes if notes else [])])
        (out / "serve_2gpu.md").write_text(md + "\n")
        return md

    def on_sigterm(*_):     # e.g. `timeout`: unwind, so clusters stop and results are written
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        for i, topology in enumerate(args.topologies):
            left = args.deadline_s - (time.monotonic() - t0)
            results.append({"topology": topology})
            run_topology(results[-1], args, log_dir, left / (len(args.topologies) - i), save)
    finally:
        with tarfile.open(out / "serve_2gpu_logs.tar.gz", "w:gz") as tar:
            if log_dir.is_dir():
                tar.add(log_dir, arcname="logs")
        print("\n" + save(final=True), flush=True)
    return 0 if results and all(t.get("runs") and not t.get("error") for t in results) else 1


if __name__ == "__main__":
    sys.exit(main())
