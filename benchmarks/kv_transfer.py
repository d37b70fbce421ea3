"""KV transfer microbenchmark: the ``nccl`` transport vs raw NCCL send/recv, GPU0 → GPU1.

    python benchmarks/kv_transfer.py --out benchmarks/results/kv_transfer_h200x2.json
    python benchmarks/kv_transfer.py --cpu-smoke          # gloo on CPU, tiny sizes: checks the script

A holder process on cuda:0 holds requests of 1 MB … 1 GB of ``dummy:llama3-8b``
KV (128 KiB per token, bf16, blocks of 8 tokens = 1 MiB, scattered block ids)
in a ``KVCache`` and serves them through a ``PairHost``; this process pulls them
on cuda:1 with ``NcclKVReceiver`` (pair built on the first pull, outside the
timings), in the same run as a raw baseline on a second pair group.

Per size (median of ``--iters`` pulls after warm-ups):
- ``ours_e2e``: receiver ``start()`` → DONE (``stats.seconds``): asyncio hops,
  the PULL message, the holder's export (index_select into one buffer), one
  send/recv, the re-layout check;
- ``ours_wire``: the same pull seen from the pair thread (PULL sent → bytes
  landed), i.e. without the event-loop hops;
- ``raw``: ``--iters`` back-to-back ``send``/``recv`` of a preallocated buffer of
  the same bytes on its own NCCL pair group (after one warm-up message), the
  best of 3 — the sustained rate, launch latency overlapped, so a strict baseline;
- ``raw_pull``: request/response on raw NCCL (4-byte request, then the bytes
  from a preallocated buffer), median — what any pull over NCCL pays at least.
Each size's first pull is checked bit-exactly against the holder's checksum.
``receiver_phases_ms`` / ``holder_phases_ms``: medians of where a pull's time
goes (``PullResult.phases``, ``PairHost.timings``).

Many pulls (how a decode worker pulls under load: many requests' KV from one
prefill worker), each mode with the holder exporting on demand and ``_staged``
with every export made beforehand (as a GPU prefill worker stages held KV,
kvtransfer/staging.py); the pair batches queued pulls into one send
(kvtransfer/nccl_pairs.py), ``batch_sizes`` says how they went out:
- ``burst``: ``--burst-mb`` of pulls of one size started together (2 … 32
  pulls), median of ``--iters`` bursts, GB/s = bytes / (first start → last DONE),
  against ``raw_stream`` (below);
- ``stream``: ``--stream-mb`` of pulls of one size (at least 4), at most 1 GiB
  of them in flight (a new pull starts as one ends), GB/s = bytes / (first
  start → last DONE), median of 3 streams, against ``raw_stream``: the same
  number of back-to-back raw sends of the same size (sustained).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_result  # noqa: E402

MB = 1 << 20


def kv_spec(block_size: int, dtype: torch.dtype):
    from engine.kv_cache import KVCacheSpec
    from engine.models.llama import ModelConfig
    from engine.models.presets import get_preset
    mc = ModelConfig.from_hf_dict(get_preset("llama3-8b"))
    return KVCacheSpec(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, block_size, dtype)


def plans(nbytes: int, cfg: dict) -> dict:
    """mode → (pulls, most in flight): a burst of ``burst_bytes`` (2 … 32 pulls);
    a stream of ``stream_bytes`` (at least 4 pulls), at most 1 GiB in flight."""
    burst = max(2, min(32, cfg["burst_bytes"] // nbytes))
    stream = max(4, cfg["stream_bytes"] // nbytes)
    return {"burst": (burst, burst), "stream": (stream, max(2, min(stream, (1 << 30) // nbytes)))}


def checksum(t: torch.Tensor) -> int:
    return int(t.contiguous().view(-1).view(torch.int16).to(torch.int64).sum().item())


def raw_group(address: str, rank: int, device: torch.device):
    from torch.distributed import PrefixStore, TCPStore
    from engine.distributed import make_backend
    host, _, port = address.rpartition(":")
    store = TCPStore(host, int(port), None, False, timeout=datetime.timedelta(seconds=60))
    return make_backend(PrefixStore("raw/", store), rank, 2, device, datetime.timedelta(seconds=120), "raw")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- holder process ------------------------------------------------------------------

def holder_main(cfg: dict, commands, replies) -> None:
    from engine.kv_cache import KVCache
    from kvtransfer.nccl_pairs import PairHost
    from kvtransfer.sources import CacheKVSource
    from kvtransfer.staging import StagedExports

    class StagingSource(CacheKVSource):
        """Exports made ahead of the pulls on command, taken by the pair thread
        first (the worker source's ``take_staged``, workers/kv_source.py)."""
        staged = StagedExports(8 << 30)

        def take_staged(self, handle, start_block):
            return self.staged.take(handle, start_block)

    dev = torch.device(cfg["holder_device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    spec = kv_spec(cfg["block_size"], cfg["dtype"])
    cache = KVCache(spec, cfg["num_blocks"], dev)
    cache.tensor.normal_(generator=torch.Generator(dev).manual_seed(0))
    source = StagingSource(cache)
    gen = torch.Generator().manual_seed(1)
    holds = {}
    for n in cfg["blocks"]:
        ids = torch.randperm(cfg["num_blocks"], generator=gen)[:n].tolist()
        source.hold(f"r{n}", ids)
        for j in range(max(count for count, _ in plans(n * cfg["block_bytes"], cfg).values())):
            source.hold(f"r{n}.{j}", ids)              # the same blocks under other request ids
        holds[n] = (ids, checksum(cache.export_blocks(ids)))
    host = PairHost(source.export_sync, dev, take_staged=source.take_staged)
    replies.put((host.store_address, holds))
    raw = raw_group(cfg["raw_address"], 0, dev)
    bufs = {}
    while True:
        cmd = commands.get()
        if cmd[0] == "exit":
            host.close()
            return
        if cmd[0] == "timings":                        # the holder's side of the pulls so far
            replies.put(list(host.timings))
            host.timings.clear()
            continue
        if cmd[0] == "stage":                          # ("stage", blocks, k): exports for the next pulls
            _, n, k = cmd
            for j in range(k):
                source.staged.put(f"r{n}.{j}", holds[n][0], cache.export_blocks(holds[n][0]))
            _sync(dev)
            replies.put("staged")
            continue
        kind, nbytes, iters = cmd                      # ("raw" | "raw_pull", nbytes, iters)
        buf = bufs.setdefault(nbytes, torch.empty(nbytes, dtype=torch.uint8, device=dev))
        if kind == "raw":
            works = [raw.send([buf], 1, 0) for _ in range(iters + 1)]
            for w in works:
                w.wait()
        else:
            ping = torch.empty(1, dtype=torch.int32, device=dev)
            for _ in range(iters + 1):
                raw.recv([ping], 1, 0).wait()
                _sync(dev)                             # the request arrived
                raw.send([buf], 1, 0).wait()
        _sync(dev)
        replies.put("sent")


# ---- receiver (this process) ------------------------------------------------------------

async def measure(cfg, store_address, holds, commands, replies, raw) -> list[dict]:
    from kvtransfer import KVHandle, KVLayout
    from kvtransfer.base import TransferState
    from kvtransfer.nccl import NcclKVReceiver
    from kvtransfer.nccl_pairs import PairClient

    dev = torch.device(cfg["receiver_device"])
    spec = kv_spec(cfg["block_size"], cfg["dtype"])
    layout = KVLayout.from_spec(spec)
    endpoint = PairClient(dev, "bench-receiver")
    gloo = dev.type != "cuda"
    rows = []
    try:
        for n in cfg["blocks"]:
            ids, expected = holds[n]
            handle = KVHandle(f"r{n}", "holder", "", ids, n * spec.block_size, 0, layout,
                              transport="nccl", transport_address=store_address)
            e2e, wire, phases = [], [], []
            for i in range(cfg["warmup"] + cfg["iters"]):
                rx = NcclKVReceiver(layout, nccl_endpoint=endpoint, allow_gloo=gloo)
                rx.start(handle)
                if await rx.wait(timeout=120) is not TransferState.DONE:
                    raise RuntimeError(f"pull of {n} blocks failed: {rx.error}")
                if i == 0:
                    got = checksum(rx.result())
                    if got != expected or rx.stats.transport != "nccl":
                        raise RuntimeError(f"{n} blocks: checksum {got} != {expected} "
                                           f"(transport {rx.stats.transport})")
                if i >= cfg["warmup"]:
                    e2e.append(rx.stats.seconds)
                    wire.append(rx.wire_seconds)
                    phases.append(rx.wire_phases)
            commands.put(("timings",))
            held = replies.get(timeout=60)[-cfg["iters"]:]
            nbytes = n * spec.bytes_per_block
            raw_s = raw_transfer(raw, dev, nbytes, cfg["iters"], commands, replies)
            pull_s = raw_pull(raw, dev, nbytes, cfg["iters"], commands, replies)
            many = {f"{mode}{'_staged' if staged else ''}": await pull_many(
                        cfg, endpoint, handle, layout, n, *plan, staged, commands, replies, gloo)
                    for mode, plan in plans(nbytes, cfg).items() for staged in (False, True)}
            raw_stream_s = raw_transfer(raw, dev, nbytes, plans(nbytes, cfg)["stream"][0], commands, replies)
            row = {"mbytes": nbytes / MB, "bytes": nbytes, "blocks": n,
                   "ours_e2e_ms": statistics.median(e2e) * 1e3, "ours_wire_ms": statistics.median(wire) * 1e3,
                   "raw_ms": raw_s * 1e3, "raw_pull_ms": pull_s * 1e3, "raw_stream_ms": raw_stream_s * 1e3,
                   "receiver_phases_ms": {k: round(statistics.median(p[k] for p in phases), 4) for k in phases[0]},
                   "holder_phases_ms": {k: round(statistics.median(t[k] for t in held), 4)
                                        for k in held[0] if k != "nbytes"},
                   "many": many}
            for key in ("ours_e2e", "ours_wire", "raw", "raw_pull", "raw_stream"):
                row[f"{key}_gbps"] = nbytes / (row[f"{key}_ms"] / 1e3) / 1e9
            for mode, m in many.items():
                row[f"ours_{mode}_gbps"] = m["pulls"] * nbytes / (m["ms"] / 1e3) / 1e9
                row[f"ratio_{mode}"] = row[f"ours_{mode}_gbps"] / row["raw_stream_gbps"]
            for key in ("e2e", "wire"):
                row[f"ratio_{key}"] = row[f"ours_{key}_gbps"] / row["raw_gbps"]
                row[f"ratio_{key}_vs_raw_pull"] = row[f"ours_{key}_gbps"] / row["raw_pull_gbps"]
            rows.append(row)
            print(f"{row['mbytes']:8.0f} MB  ours e2e {row['ours_e2e_gbps']:7.1f} GB/s  wire "
                  f"{row['ours_wire_gbps']:7.1f} GB/s  raw {row['raw_gbps']:7.1f} GB/s  raw pull "
                  f"{row['raw_pull_gbps']:7.1f} GB/s  ratio e2e {row['ratio_e2e']:.2f} wire "
                  f"{row['ratio_wire']:.2f} (vs raw pull {row['ratio_e2e_vs_raw_pull']:.2f} / "
                  f"{row['ratio_wire_vs_raw_pull']:.2f})\n    receiver {row['receiver_phases_ms']}  holder "
                  f"{row['holder_phases_ms']}\n    raw stream {row['raw_stream_gbps']:7.1f} GB/s; " + "; ".join(
                      f"{mode} ({m['pulls']} pulls) {row[f'ours_{mode}_gbps']:.1f} GB/s ratio "
                      f"{row[f'ratio_{mode}']:.2f} batches {m['batch_sizes']}" for mode, m in many.items()),
                  flush=True)
    finally:
        endpoint.close()
    return rows


async def pull_many(cfg, endpoint, handle, layout, n: int, count: int, window: int, staged: bool,
                    commands, replies, gloo: bool) -> dict:
    """``count`` pulls of ``n`` blocks, at most ``window`` in flight (a new one starts
    as one ends); a burst (count == window) is repeated ``--iters`` times, a stream 3
    times, after one warm-up: the median's ms, how the pulls were batched, the
    holder's phases."""
    import asyncio
    from dataclasses import replace
    from kvtransfer.base import TransferState
    from kvtransfer.nccl import NcclKVReceiver

    async def one(j: int) -> None:
        rx = NcclKVReceiver(layout, nccl_endpoint=endpoint, allow_gloo=gloo)
        rx.start(replace(handle, request_id=f"r{n}.{j}"))
        if await rx.wait(timeout=120) is not TransferState.DONE:
            raise RuntimeError(f"pull {j} of {n} blocks failed: {rx.error}")
        batches.append(rx.wire_phases["batch"])
        phases.append(rx.wire_phases)

    async def run() -> float:
        slots = asyncio.Semaphore(window)

        async def gated(j):
            async with slots:
                await one(j)
        t0 = time.perf_counter()
        await asyncio.gather(*(gated(j) for j in range(count)))
        return time.perf_counter() - t0

    times, batches, phases = [], [], []
    for i in range(1 + (cfg["iters"] if count == window else 3)):
        if staged:
            commands.put(("stage", n, count))
            assert replies.get(timeout=120) == "staged"
        if not i:
            await run()
            batches.clear()
            phases.clear()
            continue
        times.append(await run())
    commands.put(("timings",))
    held = replies.get(timeout=60)
    return {"pulls": count, "window": window, "ms": statistics.median(times) * 1e3,
            "batch_sizes": {str(b): batches.count(b) // b for b in sorted(set(batches))},
            "holder_ms": {key: round(statistics.median(t[key] for t in held), 4)
                          for key in held[0] if key != "nbytes"},
            "receiver_ms": {key: round(statistics.median(p[key] for p in phases), 4) for key in phases[0]}}


def raw_transfer(raw, dev, nbytes: int, iters: int, commands, replies, repeats: int = 3) -> float:
    """Seconds per message of ``iters`` back-to-back raw sends, the best of ``repeats``
    (the strictest baseline: one slow repetition must not flatter ours)."""
    return min(_raw_once(raw, dev, nbytes, iters, commands, replies) for _ in range(repeats))


def _raw_once(raw, dev, nbytes: int, iters: int, commands, replies) -> float:
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    commands.put(("raw", nbytes, iters))
    raw.recv([buf], 0, 0).wait()                     # warm-up message: both sides are in step
    _sync(dev)
    t0 = time.perf_counter()
    works = [raw.recv([buf], 0, 0) for _ in range(iters)]
    for w in works:
        w.wait()
    _sync(dev)
    seconds = (time.perf_counter() - t0) / iters
    assert replies.get(timeout=120) == "sent"
    return seconds


def raw_pull(raw, dev, nbytes: int, iters: int, commands, replies) -> float:
    """Median of request/response transfers on raw NCCL: a 4-byte request, then the
    bytes — the least a pull over NCCL can cost."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    ping = torch.zeros(1, dtype=torch.int32, device=dev)
    commands.put(("raw_pull", nbytes, iters))
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        sent = raw.send([ping], 0, 0)
        raw.recv([buf], 0, 0).wait()
        sent.wait()
        _sync(dev)
        if i:
            times.append(time.perf_counter() - t0)
    assert replies.get(timeout=120) == "sent"
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--sizes-mb", default="1,4,16,64,256,1024")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--burst-mb", type=int, default=512, help="MB of pulls started together")
    ap.add_argument("--stream-mb", type=int, default=4096, help="MB of pulls in one stream")
    ap.add_argument("--cpu-smoke", action="store_true", help="gloo between two CPU processes, small sizes")
    args = ap.parse_args()
    from torch.distributed import TCPStore

    smoke = args.cpu_smoke
    block_size = 8                                  # 8 tokens x 128 KiB = 1 MiB per block
    sizes = [1, 4] if smoke else [int(s) for s in args.sizes_mb.split(",")]
    raw_store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    cfg = {"block_size": block_size, "dtype": torch.bfloat16, "blocks": sizes, "num_blocks": max(sizes) + 8,
           "holder_device": "cpu" if smoke else "cuda:0", "receiver_device": "cpu" if smoke else "cuda:1",
           "raw_address": f"127.0.0.1:{raw_store.port}", "iters": 3 if smoke else args.iters,
           "warmup": 1 if smoke else args.warmup, "block_bytes": kv_spec(block_size, torch.bfloat16).bytes_per_block,
           "burst_bytes": (8 if smoke else args.burst_mb) * MB, "stream_bytes": (16 if smoke else args.stream_mb) * MB}
    ctx = mp.get_context("spawn")
    commands, replies = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=holder_main, args=(cfg, commands, replies), daemon=True)
    proc.start()
    try:
        store_address, holds = replies.get(timeout=300)
        dev = torch.device(cfg["receiver_device"])
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        raw = raw_group(cfg["raw_address"], 1, dev)
        rows = asyncio.run(measure(cfg, store_address, holds, commands, replies, raw))
    finally:
        commands.put(("exit",))
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
    env = environment(cfg["receiver_device"])
    if not smoke:
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["p2p_access_0_to_1"] = torch.cuda.can_device_access_peer(0, 1)
    big = [r for r in rows if r["mbytes"] >= 16]
    payload = {
        "benchmark": "kv_transfer", "env": env,
        "config": {"model": "dummy:llama3-8b", "bytes_per_token": kv_spec(block_size, torch.bfloat16).bytes_per_token,
                   "block_size": block_size, "dtype": "bfloat16", "iters": cfg["iters"], "warmup": cfg["warmup"],
                   "burst_mb": cfg["burst_bytes"] // MB,
                   "stream_mb": cfg["stream_bytes"] // MB, "holder": cfg["holder_device"], "receiver": cfg["receiver_device"]},
        "results": rows,
        "goal": {"ratio_at_least": 0.8, "from_mbytes": 16, "baseline": "raw (sustained)",
                 "met_e2e": bool(big) and all(r["ratio_e2e"] >= 0.8 for r in big),
                 "met_wire": bool(big) and all(r["ratio_wire"] >= 0.8 for r in big),
                 "met_e2e_vs_raw_pull": bool(big) and all(r["ratio_e2e_vs_raw_pull"] >= 0.8 for r in big),
                 **{f"met_{mode}": bool(big) and all(r[f"ratio_{mode}"] >= 0.8 for r in big)
                    for mode in ("burst", "burst_staged", "stream", "stream_staged")}},
    }
    if args.out or not smoke:
        print(f"wrote {write_result('kv_transfer', payload, args.out)}")


if __name__ == "__main__":
    main()
