"""Microbenchmark of the Triton attention kernels (GPU only).

    python benchmarks/attention_kernels.py --out benchmarks/results/attention_h100.json [--sweep]

What is measured (Llama-3-8B attention shapes: 32 query heads, 8 KV heads,
head dim 128, bf16, block size 16, block tables shuffled over the pool):

- decode: ``paged_decode`` time per layer at B in {1, 8, 32, 128}, context in
  {1024, 4096}; bytes = K/V of every context + q + out, the least any kernel
  must move, so GB/s is against the HBM roofline. Timed as CUDA-graph replays
  of one launch per "layer" over enough layer caches to total >= 256 MiB, so
  small cases read HBM, not the 50 MB L2 (the engine's steps look like that);
- prefill: ``paged_prefill`` TFLOP/s (useful causal FLOPs) for fresh prompts
  and a chunk over a cached prefix, next to torch SDPA (flash, contiguous KV)
  on the same fresh prompts;
- store: ``store_kv`` GB/s;
- ceilings: device-to-device copy bandwidth (bytes read + written).

``--sweep`` also times the decode and prefill kernels over tile/warp/stage
configurations and decode split counts (how the defaults in
engine/attention/launch_config.py were chosen). Results: one JSON with
device, versions, commit and command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import environment  # noqa: E402
from engine.attention import triton_ops  # noqa: E402

H, KH, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16


def env_info() -> dict:
    p = torch.cuda.get_device_properties(0)
    return dict(environment("cuda"), device=torch.cuda.get_device_name(0), sms=p.multi_processor_count,
                l2_bytes=getattr(p, "L2_cache_size", None), cuda=torch.version.cuda)


def graph_time_ms(fn, reps: int = 30) -> float:
    """Median time of one replay of a CUDA graph holding ``fn()`` (compiled eagerly first)."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = graph_time_ms(lambda: y.copy_(x), reps=10)
    del x, y
    return 2 * (1 << 30) / ms / 1e6


def decode_setup(B: int, ctx: int, min_bytes: int = 256 << 20):
    blocks_per_seq = -(-ctx // BS)
    nb = B * blocks_per_seq
    layer_bytes = 2 * nb * BS * KH * D * 2
    layers = max(1, min(64, -(-min_bytes // layer_bytes)))
    kc = torch.randn(layers, nb, BS, KH, D, device="cuda", dtype=DTYPE)
    vc = torch.randn_like(kc)
    bt = torch.randperm(nb, device="cuda", dtype=torch.int64).to(torch.int32).view(B, blocks_per_seq)
    sl = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(B, H, D, device="cuda", dtype=DTYPE)
    out = torch.empty_like(q)
    kv_bytes = 2 * B * ctx * KH * D * 2
    bytes_min = kv_bytes + 2 * q.numel() * 2
    return dict(kc=kc, vc=vc, bt=bt, sl=sl, q=q, out=out, layers=layers, bytes=bytes_min)


def time_decode(st, num_splits=None, config=None) -> float:
    def fn():
        for i in range(st["layers"]):
            triton_ops.paged_decode(st["q"], st["kc"][i], st["vc"][i], st["bt"], st["sl"], D ** -0.5,
                                    out=st["out"], num_splits=num_splits, config=config)
    return graph_time_ms(fn) / st["layers"]


def prefill_setup(spec):
    """spec: list of (cached, query_len); one layer's cache, shuffled blocks."""
    seq = [c + n for c, n in spec]
    nbs = [-(-s // BS) for s in seq]
    nb = sum(nbs)
    kc = torch.randn(nb, BS, KH, D, device="cuda", dtype=DTYPE)
    vc = torch.randn_like(kc)
    perm = torch.randperm(nb, device="cuda", dtype=torch.int64).to(torch.int32)
    bt = torch.zeros(len(spec), max(nbs), dtype=torch.int32, device="cuda")
    pos = 0
    for b, n in enumerate(nbs):
        bt[b, :n] = perm[pos:pos + n]
        pos += n
    qlens = [n for _, n in spec]
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32, device="cuda")
    T = sum(qlens)
    q = torch.randn(T, H, D, device="cuda", dtype=DTYPE)
    return dict(kc=kc, vc=vc, bt=bt, sl=torch.tensor(seq, dtype=torch.int32, device="cuda"), qsl=qsl,
                qlens=qlens, q=q, out=torch.empty_like(q),
                flops=triton_ops.attention_flops(qlens, seq, H, D))


def time_prefill(st, config=None) -> float:
    return graph_time_ms(lambda: triton_ops.paged_prefill(
        st["q"], st["kc"], st["vc"], st["bt"], st["sl"], st["qsl"], st["qlens"], D ** -0.5,
        out=st["out"], config=config), reps=20)


def time_sdpa(T: int) -> float | None:
    import torch.nn.functional as F
    q = torch.randn(1, H, T, D, device="cuda", dtype=DTYPE)
    k = torch.randn(1, KH, T, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    try:
        return graph_time_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                             reps=20)
    except Exception as e:  # noqa: BLE001
        print("sdpa baseline failed:", e)
        return None


DECODE_SWEEP = [dict(BLOCK_N=n, num_warps=w, num_stages=s)
                for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)] + [
               dict(BLOCK_N=16, num_warps=2, num_stages=2), dict(BLOCK_N=32, num_warps=2, num_stages=3)]
PREFILL_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in [
    (128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3),
    (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--nominal-gbs", type=float, default=None,
                    help="datasheet HBM bandwidth; default 3350 for H100, 4800 for H200")
    args = ap.parse_args()
    torch.manual_seed(0)
    info = env_info()
    nominal = args.nominal_gbs or (4800.0 if "H200" in info["device"] else 3350.0)
    res = dict(env=info, shapes=dict(num_heads=H, num_kv_heads=KH, head_dim=D, block_size=BS, dtype="bfloat16"),
               nominal_hbm_gbs=nominal)
    res["copy_gbs"] = round(copy_bandwidth(), 1)
    print(f"{info['device']}  copy {res['copy_gbs']} GB/s (read+write), nominal {nominal} GB/s", flush=True)

    # ---- decode
    rows = []
    for ctx in (1024, 4096):
        for B in (1, 8, 32, 128):
            st = decode_setup(B, ctx)
            splits = triton_ops.decode_num_splits(B, KH, st["bt"].shape[1], BS,
                                                  triton_ops.decode_config(DTYPE, D)["BLOCK_N"], info["sms"])
            ms = time_decode(st)
            row = dict(batch=B, context=ctx, num_splits=splits, layers_rotated=st["layers"],
                       time_us=round(ms * 1e3, 2), bytes=st["bytes"], gbs=round(st["bytes"] / ms / 1e6, 1),
                       pct_nominal=round(100 * st["bytes"] / ms / 1e6 / nominal, 1))
            if args.sweep:
                row["splits_sweep_us"] = {}
                for f in (0.25, 0.5, 2, 4):
                    s = max(1, int(round(splits * f)))
                    if s != splits and str(s) not in row["splits_sweep_us"]:
                        row["splits_sweep_us"][str(s)] = round(time_decode(st, num_splits=s) * 1e3, 2)
                row["config_sweep_us"] = {}
                for cfg in DECODE_SWEEP:
                    key = "n{BLOCK_N}_w{num_warps}_s{num_stages}".format(**cfg)
                    try:
                        row["config_sweep_us"][key] = round(time_decode(st, config=cfg) * 1e3, 2)
                    except Exception as e:  # noqa: BLE001  (out of shared memory, ...)
                        row["config_sweep_us"][key] = f"error: {type(e).__name__}"
            rows.append(row)
            print(f"decode B={B:4d} ctx={ctx:5d} splits={splits:3d}  {row['time_us']:9.2f} us/layer  "
                  f"{row['gbs']:7.1f} GB/s  {row['pct_nominal']:5.1f}% of nominal", flush=True)
            del st
            torch.cuda.empty_cache()
    res["decode"] = rows

    # ---- prefill
    prow = []
    for name, spec in [("prompt_1024", [(0, 1024)]), ("prompt_2048", [(0, 2048)]), ("prompt_4096", [(0, 4096)]),
                       ("4x1024", [(0, 1024)] * 4), ("chunk_512_over_4096", [(4096, 512)]),
                       ("chunk_2048_over_8192", [(8192, 2048)])]:
        st = prefill_setup(spec)
        ms = time_prefill(st)
        row = dict(case=name, spec=spec, time_us=round(ms * 1e3, 1), tflops=round(st["flops"] / ms / 1e9, 1))
        if name.startswith("prompt_"):
            sd = time_sdpa(spec[0][1])
            if sd:
                row["sdpa_flash_time_us"] = round(sd * 1e3, 1)
                row["sdpa_flash_tflops"] = round(st["flops"] / sd / 1e9, 1)
        if args.sweep:
            row["config_sweep_us"] = {}
            for cfg in PREFILL_SWEEP:
                key = "m{BLOCK_M}_n{BLOCK_N}_w{num_warps}_s{num_stages}".format(**cfg)
                try:
                    row["config_sweep_us"][key] = round(time_prefill(st, config=cfg) * 1e3, 1)
                except Exception as e:  # noqa: BLE001
                    row["config_sweep_us"][key] = f"error: {type(e).__name__}"
        prow.append(row)
        print(f"prefill {name:22s} {row['time_us']:9.1f} us  {row['tflops']:6.1f} TFLOP/s"
              + (f"   (sdpa flash {row.get('sdpa_flash_tflops')} TFLOP/s)" if "sdpa_flash_tflops" in row else ""),
              flush=True)
        del st
    res["prefill"] = prow

    # ---- store
    srow = []
    for T in (128, 8192):
        nb = 4 * T // BS + 64
        kc = torch.randn(nb, BS, KH, D, device="cuda", dtype=DTYPE)
        vc = torch.randn_like(kc)
        k = torch.randn(T, KH, D, device="cuda", dtype=DTYPE)
        v = torch.randn_like(k)
        slots = torch.randperm(nb * BS, device="cuda")[:T]
        ms = graph_time_ms(lambda: triton_ops.store_kv(k, v, kc, vc, slots))
        nbytes = 4 * k.numel() * 2 + T * 8
        srow.append(dict(tokens=T, time_us=round(ms * 1e3, 2), gbs=round(nbytes / ms / 1e6, 1)))
        print(f"store T={T:5d} {srow[-1]['time_us']:8.2f} us  {srow[-1]['gbs']:7.1f} GB/s", flush=True)
    res["store"] = srow

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    if args.sweep:
        print("\nbest decode configs:")
        for r in rows:
            ok = {k: v for k, v in r["config_sweep_us"].items() if isinstance(v, float)}
            best = sorted(ok.items(), key=lambda kv: kv[1])[:3]
            print(f"  B={r['batch']:4d} ctx={r['context']:5d} default {r['time_us']:8.2f}  best {best}"
                  f"  splits {r['splits_sweep_us']}")
        print("best prefill configs:")
        for r in prow:
            ok = {k: v for k, v in r["config_sweep_us"].items() if isinstance(v, float)}
            best = sorted(ok.items(), key=lambda kv: kv[1])[:3]
            print(f"  {r['case']:22s} default {r['time_us']:9.1f}  best {best}")


if __name__ == "__main__":
    main()
