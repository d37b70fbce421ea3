"""Steady-state decode step time of the whole engine (scheduler + runner + output
processing), async scheduling on vs off, against the HBM roofline (GPU).

    python benchmarks/decode_steady.py --out benchmarks/results/decode_steady_h100.json \
        [--batch 128] [--context 1024] [--steps 64]

``benchmarks/roofline.py`` times the model runner on a synthetic batch; this
times ``LLMEngine.step()`` itself. ``--batch`` requests of ``--context - 1``
random prompt tokens (``dummy:llama3-8b``, bf16, CUDA graphs, ignore_eos) are
prefilled; once every request is decoding, ``--steps`` engine steps are timed
(wall clock; each step ends waiting for a step's sampled ids, so the device
cannot run ahead by more than one step); ``host_wait_ms`` is the time per step
the host spends waiting for those ids (near 0: the host is the bottleneck),
``host_ms_per_step`` the host time of each phase of ``step()``,
``device_ms_per_step`` the median device time from a step's first queued
kernel to its last (CUDA events around ``runner.launch``). The context grows by one token per
step, so the roofline is taken at the mean context of the timed steps:
``(weight bytes without the embedding + B * L_mean * kv_bytes_per_token) /
nominal bandwidth``. Each mode runs in a process of its own, one after the other.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment, write_result  # noqa: E402
from benchmarks.roofline import weight_bytes  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


def measure(args, async_scheduling: bool) -> dict:
    cfg = EngineConfig(model=f"dummy:{args.preset}", dtype=args.dtype, device=args.device, block_size=16,
                       max_num_seqs=args.batch, max_num_batched_tokens=8192,
                       max_model_len=args.context + args.steps + 256, gpu_memory_utilization=0.85,
                       num_kv_blocks=None if args.device == "cuda" else args.batch * (args.context + args.steps + 256) // 16 + 8,
                       async_scheduling=async_scheduling)
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.steps + 200)   # early requests decode during later prefills
    for b in range(args.batch):
        eng.add_request(f"r{b}", torch.randint(100, 30000, (args.context - 1,), generator=gen).tolist(), params)
    t0 = time.perf_counter()
    while len(eng.scheduler.running) < args.batch or any(r.num_output_tokens < 2 for r in eng.scheduler.running):
        eng.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(5):                                    # warm: graphs captured, pipeline full
        eng.step()
    ctx0 = sum(r.num_tokens for r in eng.scheduler.running) / args.batch
    host = {}                                          # phase → host seconds over the timed steps
    current = {}                                       # phase → host seconds of the current step
    per_step = []
    marks = []

    def wrap(obj, name, phase, mark=False):
        fn = getattr(obj, name)

        def timed(*a, **kw):
            if mark:                                   # device span of the step's queued work
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t = time.perf_counter()
            out = fn(*a, **kw)
            dt = time.perf_counter() - t
            host[phase] = host.get(phase, 0.0) + dt
            current[phase] = current.get(phase, 0.0) + dt
            if mark:
                end.record()
                marks.append((start, end))
            return out
        setattr(obj, name, timed)

    wrap(eng.scheduler, "schedule", "schedule")
    wrap(eng.runner, "launch", "launch", mark=args.device == "cuda")
    wrap(eng.runner, "collect", "collect (waits for the device)")
    wrap(eng.scheduler, "update", "update")
    wrap(eng, "_process", "process outputs")
    prof = cProfile.Profile() if args.profile else None
    sync()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    walls = []
    for _ in range(args.steps):
        current.clear()
        gc_before = gc.get_stats()[2]["collections"]
        t = time.perf_counter()
        eng.step()
        walls.append(1e3 * (time.perf_counter() - t))
        per_step.append(dict(step=len(walls) - 1, wall_ms=round(walls[-1], 3),
                             gen2_gc=gc.get_stats()[2]["collections"] - gc_before,
                             **{k: round(1e3 * v, 3) for k, v in current.items()}))
    if prof:
        prof.disable()
    sync()
    step_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    host_ms = {k: round(1e3 * v / args.steps, 3) for k, v in host.items()}
    wait_ms = host_ms["collect (waits for the device)"]
    device_ms = statistics.median(a.elapsed_time(b) for a, b in marks[1:]) if len(marks) > 2 else float("nan")
    ctx1 = sum(r.num_tokens for r in eng.scheduler.running) / args.batch
    assert len(eng.scheduler.running) == args.batch, "a request finished during the timed steps"
    wbytes, _ = weight_bytes(eng.model)
    mean_ctx = (ctx0 + ctx1) / 2
    roof_ms = (wbytes + args.batch * mean_ctx * eng.kv_spec.bytes_per_token) / (args.nominal_gbs * 1e6)
    row = dict(async_scheduling=async_scheduling, batch=args.batch, mean_context=round(mean_ctx, 1),
               step_ms=round(step_ms, 3), step_ms_p50=round(statistics.median(walls), 3),
               step_ms_max=round(max(walls), 3), slowest_steps=sorted(per_step, key=lambda r: -r["wall_ms"])[:3],
               host_wait_ms=round(wait_ms, 3),
               device_ms_per_step=round(device_ms, 3), host_ms_per_step=host_ms, roofline_ms=round(roof_ms, 3), pct_roofline=round(100 * roof_ms / step_ms, 1),
               kv_blocks=eng.block_manager.num_blocks, engine_build_s=round(build_s, 1), prefill_s=round(prefill_s, 1))
    print(f"async={async_scheduling!s:5}  B={args.batch} L~{mean_ctx:.0f}  {step_ms:7.3f} ms/step "
          f"(p50 {row['step_ms_p50']:.3f}, max {row['step_ms_max']:.3f}) "
          f"(device {device_ms:.3f}, host waits {wait_ms:.3f})  roofline {roof_ms:.3f} ms  {row['pct_roofline']:.1f}%\n"
          f"    host ms/step: {host_ms}\n    slowest: {row['slowest_steps']}", flush=True)
    if prof:
        stats = pstats.Stats(prof)
        stats.sort_stats("tottime").print_stats(18)
        stats.sort_stats("cumtime").print_stats(25)
    eng.close()
    del eng
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--nominal-gbs", type=float, default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script (the figures mean nothing)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", action="store_true", help="cProfile the timed steps (slows them)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--modes", type=lambda s: s == "async", nargs="+", default=[True, False],
                    help="async and/or sync, in that order")
    args = ap.parse_args()
    env = environment(args.device)
    args.nominal_gbs = args.nominal_gbs or (4800.0 if "H200" in env.get("gpu", "") else 3350.0)
    if args.child:                                      # one engine per process: nothing lingers
        print("ROW " + json.dumps(measure(args, args.modes[0])), flush=True)
        return
    rows = []
    for mode in args.modes:
        argv = [a for a in sys.argv[1:] if a != "--profile" or mode]
        cmd = [sys.executable, __file__, *argv, "--child", "--modes", "async" if mode else "sync"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout.splitlines():
            if line.startswith("ROW "):
                rows.append(json.loads(line[4:]))
            else:
                print(line, flush=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode})")
    path = write_result("decode_steady", dict(env=env, model=f"dummy:{args.preset}", nominal_hbm_gbs=args.nominal_gbs,
                                              rows=rows), args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
