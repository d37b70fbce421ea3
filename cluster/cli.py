"""The `baton` command line.

    baton up [--prefill N --decode M --colocated K --prefill-tp T --model M --redis-url U --address A
              --config F --set K=V]
    baton status [--json]          pools, workers, load, KV usage, cache hit rate
    baton scale prefill|decode|colocated N
    baton drain WORKER
    baton down
    baton generate [--chat] "prompt"   one engine in this process, no cluster
    baton bench [benchmarks/serve.py flags]

`baton up` runs in the foreground until Ctrl-C (or `baton down`) and writes a
state file (``$BATON_STATE_DIR`` or ``~/.cache/baton``, ``cluster.json``: pid,
Ray address, namespace, store URL, router URL) that the other commands read
to find the cluster. They reach the controller through Ray; `status` falls
back to the registry in the store when Ray is unreachable.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time

from cluster.config import ROLES
from cluster.ray_errors import remote_cause
from cluster.state_file import drop_state, pid_alive, read_state, state_path, write_json_atomic, write_state
from cluster.status_view import console as _console, render_status, router_health, state_from_registry
from cluster.store import is_memory_url

log = logging.getLogger("baton")


# -- reaching a running cluster -------------------------------------------------

class NoCluster(RuntimeError):
    pass


def connect_controller(args):
    """(ray-connected) controller handle of the running cluster."""
    import ray

    from cluster.controller import get_controller

    st = read_state() or {}
    address = getattr(args, "address", None) or st.get("ray_address")
    namespace = st.get("namespace", "baton")
    if not address:
        raise NoCluster("no running cluster found (start one with `baton up`, or pass --address)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        try:
            ray.init(address=address, namespace=namespace, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:
            raise NoCluster(f"cannot reach Ray at {address}: {e}") from None
    try:
        return get_controller(namespace)
    except ValueError:
        raise NoCluster(f"no controller in Ray namespace {namespace!r} at {address}") from None


# -- commands -------------------------------------------------------------------

def _config_from_args(args):
    from cluster.config import load_config

    overrides = {"pools.prefill": args.prefill, "pools.decode": args.decode, "pools.colocated": args.colocated,
                 "pools.prefill_tp": args.prefill_tp,
                 "engine.model": args.model, "redis.url": args.redis_url, "ray.address": args.address,
                 "router.host": args.host, "router.port": args.port, "router.grpc_port": args.grpc_port,
                 "ray.num_cpus": args.num_cpus}
    cfg = load_config(args.config, overrides)
    return cfg.replace(args.set or [])


def cmd_up(args) -> int:
    from rich.console import Console

    from cluster.launcher import launch

    console = Console()
    cfg = _config_from_args(args)
    st = read_state()
    if st and pid_alive(int(st.get("pid", 0))) and st.get("pid") != os.getpid():
        console.print(f"[red]a cluster is already up (pid {st['pid']}, {st.get('http_url')}); "
                      "`baton down` first[/red]")
        return 1
    stop = {"flag": False}

    def on_signal(signum, frame):
        stop["flag"] = True

    tp = f" (TP={cfg.pools.prefill_tp})" if cfg.pools.prefill_tp > 1 else ""
    console.print(f"[bold]baton up[/bold]: {cfg.pools.prefill} prefill{tp}, {cfg.pools.decode} decode, "
                  f"{cfg.pools.colocated} colocated worker(s) of [cyan]{cfg.engine.model}[/cyan] …")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)   # `baton down` while starting: launch() cleans up
    write_state({"pid": os.getpid(), "starting": True, "namespace": cfg.ray.namespace})
    t0 = time.monotonic()
    try:
        handle = launch(cfg)
    except BaseException:
        drop_state()
        raise
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        write_state({"pid": os.getpid(), "ray_address": handle.ray_address, "namespace": cfg.ray.namespace,
                     "store_url": handle.store_url, "store_kind": handle.store_kind,
                     "http_url": handle.http_url, "grpc_address": handle.grpc_address, "model": cfg.engine.model,
                     "started_at": time.time()})
        state = handle.state()
        console.print(f"ready in {time.monotonic() - t0:.1f}s")
        console.print(f"  OpenAI API   [green]{handle.http_url}/v1[/green]")
        console.print(f"  health       {handle.http_url}/health   metrics {handle.http_url}/metrics")
        if handle.grpc_address:
            console.print(f"  gRPC API     [green]{handle.grpc_address}[/green]")
        console.print(f"  store        {handle.store_url} ({handle.store_kind})")
        for w in state["workers"]:
            console.print(f"  {w['worker_id']:<14} {w['address']}")
        console.print("Ctrl-C (or `baton down`) to stop.")
        last_sd = 0.0
        while not stop["flag"]:
            time.sleep(0.2)
            if args.prometheus_sd and time.monotonic() - last_sd > 5.0:
                last_sd = time.monotonic()
                _write_prometheus_sd(args.prometheus_sd, handle)
    finally:
        console.print("stopping …")
        handle.shutdown()
        drop_state()
        console.print("stopped.")
    return 0


def _write_prometheus_sd(path: str, handle) -> None:
    try:
        state = handle.state()
    except Exception as e:
        log.warning("prometheus targets not updated: %s", e)
        return
    groups = []
    for w in state["workers"]:
        port = w.get("stats", {}).get("metrics_port")
        if port and w["address"]:
            host = w["address"].rsplit(":", 1)[0]
            groups.append({"targets": [f"{host}:{port}"], "labels": {"worker": w["worker_id"], "role": w["role"]}})
    write_json_atomic(path, groups)


def cmd_status(args) -> int:
    console = _console()
    st = read_state() or {}
    try:
        import ray

        state = ray.get(connect_controller(args).state.remote(), timeout=30)
        source = "controller"
    except Exception as e:
        store_url = args.redis_url or st.get("store_url")
        if not store_url or is_memory_url(store_url):
            console.print(f"[red]{e}[/red]")
            return 1
        state = state_from_registry(store_url, st.get("namespace", "baton"))
        source = f"registry (controller unreachable: {e})"
    if args.json:
        print(json.dumps(state, indent=2))
        return 0
    console.print(render_status(state, st))
    if st.get("http_url"):
        console.print(f"router: {router_health(st['http_url'])}")
    if source != "controller":
        console.print(f"[yellow]from the {source}[/yellow]")
    for ev in state.get("events", [])[-5:]:
        console.print(f"  [dim]{ev}[/dim]")
    return 0


def cmd_scale(args) -> int:
    import ray

    if args.n < 0:
        raise ValueError("N must be >= 0")
    state = ray.get(connect_controller(args).scale.remote(args.role, args.n, not args.no_wait, args.timeout))
    _console().print(render_status(state, read_state() or {}))
    return 0


def cmd_drain(args) -> int:
    import ray

    state = ray.get(connect_controller(args).drain.remote(args.worker, not args.no_wait))
    _console().print(render_status(state, read_state() or {}))
    return 0


def cmd_down(args) -> int:
    st = read_state()
    pid = int(st.get("pid", 0)) if st else 0
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + args.timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            print(f"baton up (pid {pid}) did not stop within {args.timeout}s", file=sys.stderr)
            return 1
        print(f"stopped the cluster of pid {pid}")
        return 0
    # no foreground process (detached controller on a remote Ray, or a stale file)
    try:
        import ray

        controller = connect_controller(args)
        ray.get(controller.shutdown.remote(), timeout=args.timeout)
        ray.kill(controller)
        print("stopped the detached cluster")
    except NoCluster as e:
        print(str(e), file=sys.stderr)
    state_path().unlink(missing_ok=True)
    return 0


def cmd_generate(args) -> int:
    from cluster import generate

    return generate.run(args)


def cmd_bench(args) -> int:
    import asyncio

    try:
        from benchmarks import serve
    except ImportError:
        print("baton bench needs the repository's benchmarks/ folder on the path (run it from the checkout)",
              file=sys.stderr)
        return 1
    if args.base_url is None:
        st = read_state() or {}
        args.base_url = st.get("http_url") or "http://127.0.0.1:8000"
    serve.validate(args)
    report = asyncio.run(serve.run(args))
    serve.print_report(report)
    if not args.no_save:
        print(f"saved {serve.save_report(report, args.result_dir, args.result_filename)}")
    return 0 if report["completed"] else 1


# -- parser ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated prefill/decode LLM serving")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a cluster and serve in the foreground")
    up.add_argument("--config", help="YAML file (sections router, pools, engine, redis, ray)")
    up.add_argument("--model", help="model (default smollm2-135m)")
    up.add_argument("--prefill", type=int, help="prefill workers (default 1)")
    up.add_argument("--decode", type=int, help="decode workers (default 1)")
    up.add_argument("--colocated", type=int, help="colocated workers (default 0)")
    up.add_argument("--prefill-tp", type=int, metavar="T",
                    help="tensor-parallel ranks per prefill worker, one Ray placement-group bundle each "
                         "(default 1; decode workers run TP=1)")
    up.add_argument("--redis-url", help="use this Redis (default: a private redis-server, else in-process)")
    up.add_argument("--address", help="join a Ray cluster (default: start a local one)")
    up.add_argument("--host", help="router bind address (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="OpenAI HTTP port (default 8000)")
    up.add_argument("--grpc-port", type=int, help="public gRPC port (default 50051; 0 = off)")
    up.add_argument("--num-cpus", type=int, help="CPUs of a local Ray")
    up.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="any config field (repeatable)")
    up.add_argument("--prometheus-sd", metavar="FILE", help="keep a Prometheus file-discovery list of workers")
    up.set_defaults(fn=cmd_up)

    status = sub.add_parser("status", help="pools, workers, load, KV usage, cache hit rate")
    status.add_argument("--address", help="Ray address (default: from `baton up`'s state file)")
    status.add_argument("--redis-url", help="read the registry here if the controller is unreachable")
    status.add_argument("--json", action="store_true")
    status.set_defaults(fn=cmd_status)

    scale = sub.add_parser("scale", help="resize a pool (removed workers drain first)")
    scale.add_argument("role", choices=ROLES)
    scale.add_argument("n", type=int)
    scale.add_argument("--no-wait", action="store_true", help="return before the pool reached N")
    scale.add_argument("--timeout", type=float, default=600.0)
    scale.add_argument("--address")
    scale.set_defaults(fn=cmd_scale)

    drain = sub.add_parser("drain", help="remove one worker without dropping its requests")
    drain.add_argument("worker")
    drain.add_argument("--no-wait", action="store_true")
    drain.add_argument("--address")
    drain.set_defaults(fn=cmd_drain)

    down = sub.add_parser("down", help="stop the cluster")
    down.add_argument("--timeout", type=float, default=120.0)
    down.add_argument("--address")
    down.set_defaults(fn=cmd_down)

    gen = sub.add_parser("generate", help="generate with one in-process engine (no cluster)")
    gen.add_argument("prompt", help="the prompt, or - for stdin")
    gen.add_argument("--model", default="smollm2-135m")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32")
    gen.add_argument("--num-kv-blocks", type=int, default=None)
    gen.set_defaults(fn=cmd_generate)

    bench = sub.add_parser("bench", help="online serving benchmark against the running router")
    try:
        from benchmarks.serve import add_arguments
    except ImportError:
        add_arguments = None
    if add_arguments is not None:
        add_arguments(bench)
        bench.set_defaults(base_url=None)
    bench.set_defaults(fn=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except (ValueError, NoCluster, TimeoutError, RuntimeError) as e:
        e = remote_cause(e)                   # a RayTaskError: report its cause only
        print(f"baton {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
