"""Decode-step and prefill speed of the engine's model runner vs the hardware roofline (GPU).

    python benchmarks/roofline.py --out benchmarks/results/roofline_h100.json [--profile]

Drives ``engine.model_runner.ModelRunner`` directly with synthetic batches
(``dummy:llama3-8b`` shapes, random bf16 weights, Triton attention), so the
numbers are the step itself, not scheduling:

- decode, B in {1, 8, 32, 128} x context L in {1024, 4096}: every request has
  L tokens of context after the step (L-1 cached + 1 new). ``step_ms`` is the
  wall time of ``runner.execute`` (host prepare + forward + LM head + greedy
  sampling, which ends in a host sync), median of 20; ``pipelined_step_ms``
  the mean step time with one step in flight (``launch`` N+1, then ``collect``
  N: the engine's async scheduling, host prepare hidden behind the device);
  ``forward_ms`` the device
  time of forward + LM head alone (CUDA events). Both eager and with CUDA graphs
  (``engine.cuda_graphs``, captured on first use; capture time reported).
  Roofline: ``(weight bytes + B*L*kv_bytes_per_token) / nominal bandwidth``
  (3.35 TB/s H100 SXM, 4.8 TB/s H200); weight bytes exclude the embedding
  table, of which a step reads only B rows.
- prefill of one fresh prompt of 1k/2k/4k tokens: ``runner.execute`` time and
  MFU = (2 * linear params * T + 2 * lm_head params + causal attention FLOPs)
  / time / peak (989 TFLOP/s dense bf16 for H100/H200 SXM).

KV memory: B=128 x L=4096 needs 64 GiB of KV for 32 layers, more than fits
next to 15 GB of weights on an 80 GB card. The cache therefore holds
``distinct`` layer slabs within ``--kv-pool-gib`` (each big enough for the
largest batch, every request on its own shuffled blocks) and layer i uses slab
``i % distinct``. Every layer still reads its full B*L context from HBM: a
slab is reused only ``distinct`` layers later (20 on H100 at 40 GiB: gigabytes of
traffic in between, far beyond the 50 MB L2). Sharing blocks *between requests*
instead would not be faithful: requests of one KV head run concurrently and
would hit in L2. ``--profile`` adds the top CUDA kernels of one eager step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment  # noqa: E402
from engine.attention.triton_backend import TritonAttention  # noqa: E402
from engine.attention.triton_ops import attention_flops  # noqa: E402
from engine.cuda_graphs import CUDAGraphRunner  # noqa: E402
from engine.kv_cache import KVCache, KVCacheSpec  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models.llama import ModelConfig  # noqa: E402
from engine.models.loader import build_model, init_dummy_weights  # noqa: E402
from engine.models.presets import get_preset  # noqa: E402
from engine.outputs import ScheduledRequest, SchedulerOutput  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402

PEAK_BF16_TFLOPS = 989.0


def env_info(preset: str) -> dict:
    return dict(environment("cuda"), device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                model=f"dummy:{preset}")


class CyclicKVCache(KVCache):
    """A KVCache whose ``layer(i)`` is slab ``i % distinct`` (see module docstring)."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device, distinct: int):
        self.spec, self.num_blocks, self.device, self.distinct = spec, num_blocks, device, distinct
        self.tensor = torch.empty(distinct, 2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                  dtype=spec.dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        slab = self.tensor[i % self.distinct]
        return slab[0], slab[1]


def weight_bytes(model) -> tuple[int, int]:
    """(bytes a decode step reads: all parameters but the embedding table, embedding bytes)."""
    params = dict(model.named_parameters())        # shared (tied) parameters once
    emb = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in params.values())
    tied = model.lm_head.weight is emb
    emb_bytes = emb.numel() * emb.element_size()
    return (total if tied else total - emb_bytes), emb_bytes


def linear_params(model) -> tuple[int, int]:
    """(parameters of the decoder layers' linears, of the LM head)."""
    layers = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Module) and n.startswith("model.layers.")
                 and hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
    return layers, model.lm_head.weight.numel()


def decode_batch(B: int, L: int, bs: int, num_blocks: int, gen: torch.Generator):
    nb = -(-L // bs)
    if B * nb > num_blocks:
        raise ValueError(f"B={B} x L={L} needs {B * nb} blocks per layer, the cache has {num_blocks}")
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    sched, reqs = SchedulerOutput(), {}
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    for b in range(B):
        blocks = perm[b * nb:(b + 1) * nb]
        rid = f"d{b}"
        sched.requests.append(ScheduledRequest(rid, [int(torch.randint(100, 30000, (1,), generator=gen))],
                                               L - 1, blocks, True))
        reqs[rid] = Request(rid, [1], params)
    sched.num_batched_tokens = B
    return sched, reqs


def prefill_batch(T: int, bs: int, num_blocks: int, gen: torch.Generator):
    nb = -(-T // bs)
    blocks = torch.randperm(num_blocks, generator=gen)[:nb].tolist()
    tokens = torch.randint(100, 30000, (T,), generator=gen).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    sched = SchedulerOutput([ScheduledRequest("p", tokens, 0, blocks, True)], T)
    return sched, {"p": Request("p", tokens, params)}


def wall_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def event_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def top_kernels(fn, steps: int = 3, top: int = 15) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append(dict(name=e.key[:90], us_per_step=round(t / steps, 1), calls_per_step=e.count // steps))
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return [dict(total_kernel_us_per_step=round(total, 1),
                 kernel_launches_per_step=sum(r["calls_per_step"] for r in rows))] + rows[:top]


def host_profile(runner, sched, reqs, steps: int = 10, top: int = 12) -> dict:
    """Where the host time of ``runner.execute`` goes (cProfile, ms per step), plus ``prepare`` alone."""
    import cProfile
    import pstats
    prep = wall_ms(lambda: runner.prepare(sched), reps=steps)
    runner.execute(sched, reqs)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runner.execute(sched, reqs)
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(((v[2], v[3], k) for k, v in st.stats.items()), reverse=True)[:top]   # (tottime, cumtime, func)
    return dict(prepare_ms=round(prep, 3), top_tottime=[
        dict(func=f"{Path(k[0]).name}:{k[1]}({k[2]})", tottime_ms=round(1e3 * t / steps, 3),
             cumtime_ms=round(1e3 * c / steps, 3)) for t, c, k in rows])


def pipelined_ms(runner, sched, reqs, steps: int, warmup: int = 3) -> float:
    """Per-step wall time with one step in flight, the engine's async pattern:
    launch step N+1 (host prepare + queued device work), then collect step N."""
    prev = runner.launch(sched, reqs)
    for _ in range(warmup):
        prev, done = runner.launch(sched, reqs, prev), prev
        runner.collect(done)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        prev, done = runner.launch(sched, reqs, prev), prev
        runner.collect(done)
    runner.collect(prev)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / (steps + 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama3-8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--prefill", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--kv-pool-gib", type=float, default=40.0)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-eager", action="store_true", help="skip the eager (no CUDA graph) decode runs")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--host-profile", action="store_true", help="cProfile of runner.execute (graph mode)")
    ap.add_argument("--nominal-gbs", type=float, default=None)
    args = ap.parse_args()

    dev = torch.device("cuda")
    info = env_info(args.preset)
    nominal = args.nominal_gbs or (4800.0 if "H200" in info["device"] else 3350.0)
    t0 = time.perf_counter()
    config = ModelConfig.from_hf_dict(get_preset(args.preset))
    model = build_model(config, torch.bfloat16, dev)
    init_dummy_weights(model, seed=0)
    load_s = time.perf_counter() - t0
    spec = KVCacheSpec(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                       args.block_size, torch.bfloat16)
    bs = args.block_size
    num_blocks = max([B * -(-L // bs) for B in args.batches for L in args.contexts]
                     + [-(-T // bs) for T in args.prefill])
    slab_bytes = spec.bytes_per_block // spec.num_layers * num_blocks
    distinct = min(spec.num_layers, int(args.kv_pool_gib * 2**30 // slab_bytes))
    if distinct < 8:
        raise ValueError(f"--kv-pool-gib {args.kv_pool_gib} holds only {distinct} layer slabs; need >= 8")
    kv = CyclicKVCache(spec, num_blocks, dev, distinct)
    kv.tensor.normal_()                                # never time on zeros
    max_len = max(max(args.contexts), max(args.prefill))
    runner = ModelRunner(model, kv, TritonAttention(), dev, max_model_len=max_len)
    graphs = CUDAGraphRunner(runner, max(args.batches))
    wbytes, emb_bytes = weight_bytes(model)
    p_layers, p_head = linear_params(model)
    res = dict(env=info, nominal_hbm_gbs=nominal, peak_bf16_tflops=PEAK_BF16_TFLOPS,
               weight_bytes=wbytes, embedding_bytes_excluded=emb_bytes, kv_bytes_per_token=spec.bytes_per_token,
               kv_blocks_per_layer=num_blocks, kv_distinct_layer_slabs=distinct,
               block_size=args.block_size, model_build_s=round(load_s, 1),
               graph_buckets=graphs.buckets)
    print(f"{info['device']}: weights {wbytes / 1e9:.2f} GB (+{emb_bytes / 1e9:.2f} GB embedding), "
          f"KV {spec.bytes_per_token} B/token, {num_blocks} blocks/layer in {distinct} slabs, "
          f"built in {load_s:.1f}s", flush=True)
    gen = torch.Generator().manual_seed(0)

    rows = []
    for L in args.contexts:
        for B in args.batches:
            sched, reqs = decode_batch(B, L, args.block_size, num_blocks, gen)
            roof_ms = (wbytes + B * L * spec.bytes_per_token) / (nominal * 1e6)
            row = dict(batch=B, context=L, roofline_ms=round(roof_ms, 3))
            ids, pos, meta = runner.prepare(sched)
            rows_idx = torch.arange(B, device=dev)

            def fwd():
                h = runner.forward(ids, pos, meta)
                return runner.model.compute_logits(h[rows_idx]).argmax(-1)

            for mode in (["eager"] if not args.no_eager else []) + ["graph"]:
                runner.graphs = graphs if mode == "graph" else None
                step = wall_ms(lambda: runner.execute(sched, reqs), args.reps)
                fw = event_ms(fwd, args.reps)
                row[f"{mode}_step_ms"] = round(step, 3)
                row[f"{mode}_forward_ms"] = round(fw, 3)
                row[f"{mode}_pct_roofline"] = round(100 * roof_ms / step, 1)
                if mode == "graph":
                    pipe = pipelined_ms(runner, sched, reqs, 4 * args.reps)
                    row["graph_pipelined_step_ms"] = round(pipe, 3)
                    row["graph_pipelined_pct_roofline"] = round(100 * roof_ms / pipe, 1)
            bucket = graphs.bucket_for(B)
            row["graph_bucket"] = bucket
            row["graph_capture_s"] = round(graphs.capture_seconds.get(bucket, float("nan")), 3)
            rows.append(row)
            print(f"decode B={B:4d} L={L:5d}  roofline {roof_ms:7.2f} ms  "
                  + (f"eager {row.get('eager_step_ms', float('nan')):7.2f} ms  " if not args.no_eager else "")
                  + f"graph {row['graph_step_ms']:7.2f} ms (fwd {row['graph_forward_ms']:7.2f})  "
                  f"{row['graph_pct_roofline']:5.1f}% of roofline; pipelined {row['graph_pipelined_step_ms']:7.2f} ms "
                  f"{row['graph_pipelined_pct_roofline']:5.1f}%", flush=True)
    res["decode"] = rows
    runner.graphs = graphs

    prows = []
    for T in args.prefill:
        sched, reqs = prefill_batch(T, args.block_size, num_blocks, gen)
        ms = wall_ms(lambda: runner.execute(sched, reqs), reps=5, warmup=2)
        flops = (2 * p_layers * T + 2 * p_head
                 + config.num_hidden_layers * attention_flops([T], [T], config.num_attention_heads, config.head_dim))
        mfu = flops / (ms * 1e-3) / (PEAK_BF16_TFLOPS * 1e12)
        prows.append(dict(tokens=T, step_ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1),
                          mfu_pct=round(100 * mfu, 1), flops=flops))
        print(f"prefill T={T:5d}  {ms:8.2f} ms  {flops / ms / 1e9:6.1f} TFLOP/s  MFU {100 * mfu:5.1f}%", flush=True)
    res["prefill"] = prows

    if args.profile:
        runner.graphs = None
        prof = {}
        for B, L in [(1, 1024), (128, 1024)]:
            sched, reqs = decode_batch(B, L, args.block_size, num_blocks, gen)
            prof[f"decode_B{B}_L{L}_eager"] = top_kernels(lambda: runner.execute(sched, reqs))
        sched, reqs = prefill_batch(2048, args.block_size, num_blocks, gen)
        prof["prefill_2048"] = top_kernels(lambda: runner.execute(sched, reqs), steps=2)
        res["profile"] = prof
        for k, v in prof.items():
            print(f"\n{k}: {v[0]}")
            for r in v[1:9]:
                print(f"   {r['us_per_step']:9.1f} us  x{r['calls_per_step']:4d}  {r['name']}")
        runner.graphs = graphs

    if args.host_profile:
        runner.graphs = graphs
        hp = {}
        for B in args.batches:
            for L in args.contexts:
                sched, reqs = decode_batch(B, L, args.block_size, num_blocks, gen)
                hp[f"decode_B{B}_L{L}_graph"] = h = host_profile(runner, sched, reqs)
                print(f"\nhost B={B} L={L}: prepare {h['prepare_ms']} ms")
                for r in h["top_tottime"][:8]:
                    print(f"   {r['tottime_ms']:7.3f} ms self  {r['cumtime_ms']:7.3f} ms cum  {r['func']}")
        res["host_profile"] = hp

    res["graph_capture_seconds"] = {str(k): round(v, 3) for k, v in graphs.capture_seconds.items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("\nsummary (graph mode):")
    for r in rows:
        print(f"  B={r['batch']:4d} L={r['context']:5d}  {r['graph_step_ms']:7.2f} ms/step "
              f"(roofline {r['roofline_ms']:.2f})  {r['graph_pct_roofline']:5.1f}%  "
              f"pipelined {r['graph_pipelined_step_ms']:7.2f} ms {r['graph_pipelined_pct_roofline']:5.1f}%")
    for r in prows:
        print(f"  prefill {r['tokens']:5d} tok  {r['step_ms']:7.2f} ms  MFU {r['mfu_pct']:.1f}%")


if __name__ == "__main__":
    main()
