"""Scheduler + block manager overhead per step, model excluded.

  python -m benchmarks.scheduler_overhead --running 256

Fills the engine's scheduler with ``--running`` decoding requests (prompt
``--prompt-len`` tokens, prefix caching on) and times ``schedule()`` +
``update()`` per step, the runner's part played by a RunnerOutput with one
token per request — what the engine's CPU pays around every forward.
Goal: under 2 ms per step at 256 running requests.
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks.common import environment, write_result
from engine.block_manager import BlockManager
from engine.outputs import RunnerOutput, SampledToken
from engine.request import Request, SamplingParams
from engine.scheduler import Scheduler


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    n, bs = args.running, args.block_size
    blocks = n * ((args.prompt_len + args.steps + 64) // bs + 2)
    s = Scheduler(BlockManager(blocks, bs), max_num_seqs=n, max_num_batched_tokens=n * args.prompt_len,
                  max_model_len=args.prompt_len + args.steps + 64)
    for i in range(n):
        s.add(Request(f"r{i}", [(i * 31 + j) % 32000 for j in range(args.prompt_len)],
                      SamplingParams(max_tokens=args.steps + 10, ignore_eos=True)))
    first = s.schedule()                                   # the prefill step (not timed)
    s.update(first, RunnerOutput({r.request_id: SampledToken(1) for r in first.requests if r.sample}))
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        out = s.schedule()
        s.update(out, RunnerOutput({r.request_id: SampledToken(step % 1000) for r in out.requests}))
        times.append((time.perf_counter() - t0) * 1e3)
        assert len(out.requests) == n
    row = {"running": n, "block_size": bs, "prompt_len": args.prompt_len, "steps": args.steps,
           "mean_ms": round(statistics.mean(times), 3), "p50_ms": round(statistics.median(times), 3),
           "p99_ms": round(sorted(times)[int(0.99 * len(times)) - 1], 3)}
    print(row)
    write_result(f"scheduler_overhead_{n}", {"benchmark": "scheduler_overhead", "env": environment(), **row})


if __name__ == "__main__":
    main()
