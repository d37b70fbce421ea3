"""Triton attention kernels vs the torch reference (``engine.attention.torch_ref``).

GPU tests (marker ``gpu``) sweep GQA ratios 1/4/8, head dims 64/128, block
sizes 16/32, contexts 1..16k, batches 1..256, ragged lengths, prefix-cached and
chunked prefill, mixed batches, bf16 and fp32. One CPU test runs all three
kernels under the Triton interpreter on tiny shapes in a subprocess (the
interpreter is chosen when ``triton`` is imported, so it needs a fresh process).

A case is a list of ``(cached_tokens, query_len)`` per request: the request's
context after the step is ``cached + query_len`` tokens, spread over shuffled
block ids; the cached part is random data already in the cache, the new
tokens' K/V are stored by the kernel under test.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import paged_attention_ref, store_kv_ref
from tests.helpers.gpu import needs_cuda_triton as gpu
from tests.helpers.gpu import needs_triton, run_under_interpreter


def make_case(spec, num_heads, num_kv_heads, head_dim, block_size, dtype, device, seed=0,
              spare_blocks=3):
    """Random paged cache + new q/k/v + metadata for ``spec = [(cached, query_len), ...]``."""
    g = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    seq_lens = [c + n for c, n in spec]
    nblocks = [-(-s // block_size) for s in seq_lens]
    total = sum(nblocks) + spare_blocks
    ids = list(range(total))
    rnd.shuffle(ids)
    tables, pos = [], 0
    for n in nblocks:
        tables.append(ids[pos:pos + n])
        pos += n
    width = max(nblocks) + 1
    bt = torch.zeros(len(spec), width, dtype=torch.int32)
    for b, t in enumerate(tables):
        bt[b, :len(t)] = torch.tensor(t, dtype=torch.int32)
    shape = (total, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    T = sum(n for _, n in spec)
    q = torch.randn(T, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g).to(dtype)
    slots, qsl = [], [0]
    for (c, n), t in zip(spec, tables):
        slots += [t[p // block_size] * block_size + p % block_size for p in range(c, c + n)]
        qsl.append(qsl[-1] + n)
    qlens = [n for _, n in spec]
    dev = torch.device(device)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=bt.to(dev), max_query_len=max(qlens), max_seq_len=max(seq_lens),
        query_lens_cpu=qlens, seq_lens_cpu=seq_lens)
    to = lambda x: x.to(dev)  # noqa: E731
    return to(q), to(k), to(v), to(k_cache), to(v_cache), meta


def reference(q, k, v, k_cache, v_cache, meta, scale):
    """fp32 oracle: store into a copy of the cache, then gather + SDPA."""
    kc, vc = k_cache.float().clone(), v_cache.float().clone()
    store_kv_ref(k.float(), v.float(), kc, vc, meta.slot_mapping)
    return paged_attention_ref(q.float(), kc, vc, meta, scale), kc, vc


def check_forward(spec, H, KH, D, bs, dtype, device="cuda", seed=0):
    from engine.attention.triton_backend import TritonAttention
    q, k, v, kc, vc, meta = make_case(spec, H, KH, D, bs, dtype, device, seed)
    scale = D ** -0.5
    ref, kc_ref, vc_ref = reference(q, k, v, kc, vc, meta, scale)
    out = TritonAttention().forward(q, k, v, kc, vc, meta, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.equal(kc.float(), kc_ref) and torch.equal(vc.float(), vc_ref), "KV store mismatch"
    assert torch.isfinite(out).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    tol = {torch.float32: 5e-5, torch.float16: 2e-3}.get(dtype, 1.5e-2)
    assert err < tol, f"relative error {err:.2e} for spec={spec[:4]}... H={H} KH={KH} D={D} bs={bs} {dtype}"
    return err


def _ragged(rnd, n, lo, hi, qlen=1):
    return [(rnd.randint(lo, hi) - qlen if qlen else 0, qlen) for _ in range(n)]


# ------------------------------------------------------------------------ GPU tests

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,KH", [(8, 8), (32, 8), (32, 4)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("bs", [16, 32])
def test_decode_ragged(dtype, H, KH, D, bs):
    rnd = random.Random(hash((H, KH, D, bs)) & 0xFFFF)
    for B in (1, 7, 64):
        spec = [(rnd.randint(0, 2000), 1) for _ in range(B)]
        check_forward(spec, H, KH, D, bs, dtype, seed=B)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B,ctx", [(1, 1), (1, 16384), (3, 16383), (256, 33), (256, 700), (32, 4096)])
def test_decode_sizes(B, ctx):
    rnd = random.Random(B * 7 + ctx)
    spec = [(max(0, ctx - 1 - rnd.randint(0, min(ctx - 1, 16))), 1) for _ in range(B)]
    check_forward(spec, 32, 8, 128, 16, torch.bfloat16, seed=ctx)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("H,KH,D,bs", [(8, 8, 64, 16), (32, 8, 128, 16), (32, 4, 128, 32), (16, 2, 64, 32)])
def test_prefill_and_extend(dtype, H, KH, D, bs):
    cases = [
        [(0, 1000)],                                   # plain prefill
        [(0, 5), (0, 129), (0, 300), (0, 2)],          # ragged prompts
        [(64, 200), (0, 77), (480, 33)],               # prefix-cache hits (block-aligned) + fresh
        [(1000, 512), (2048, 17), (7, 100)],           # chunked prefill: later chunks, unaligned prefix
        [(300, 1), (0, 400), (999, 1), (40, 60), (5000, 1)],   # mixed decode + prefill
    ]
    for i, spec in enumerate(cases):
        check_forward(spec, H, KH, D, bs, dtype, seed=i)


@gpu
@pytest.mark.gpu
def test_prefill_long_and_many():
    check_forward([(0, 4096)], 32, 8, 128, 16, torch.bfloat16)
    check_forward([(12000, 4096)], 32, 8, 128, 16, torch.bfloat16, seed=1)   # 16k context
    rnd = random.Random(5)
    spec = [(rnd.randint(0, 300), rnd.choice([1, 1, 1, 2, 64, 130])) for _ in range(200)]
    check_forward(spec, 32, 8, 128, 32, torch.bfloat16, seed=2)
    check_forward([(100, 1), (0, 300), (37, 64)], 32, 8, 128, 16, torch.float16, seed=3)


@gpu
@pytest.mark.gpu
def test_decode_cuda_graph_replay():
    """Captured once, replayed with new context lengths and block tables: same as eager."""
    from engine.attention import triton_ops
    B, H, KH, D, bs = 8, 32, 8, 128, 16
    q, k, v, kc, vc, meta = make_case([(900, 1)] * B, H, KH, D, bs, torch.bfloat16, "cuda", seed=3)
    static = dict(q=q.clone(), bt=meta.block_tables.clone(), sl=meta.seq_lens.clone())
    triton_ops.paged_decode(static["q"], kc, vc, static["bt"], static["sl"], D ** -0.5)   # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.paged_decode(static["q"], kc, vc, static["bt"], static["sl"], D ** -0.5)
    for trial, lens in enumerate([[1] * B, [901, 5, 300, 0, 17, 64, 2, 900]]):
        static["sl"].copy_(torch.tensor(lens, dtype=torch.int32))
        static["q"].normal_()
        graph.replay()
        eager = triton_ops.paged_decode(static["q"], kc, vc, static["bt"], static["sl"], D ** -0.5)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), trial
        m = AttentionMetadata(meta.slot_mapping, meta.query_start_loc, static["sl"], static["bt"],
                              1, max(lens), [1] * B, lens)
        ref = paged_attention_ref(static["q"].float(), kc.float(), vc.float(), m, D ** -0.5)
        live = torch.tensor(lens, device="cuda") > 0
        assert (out[~live] == 0).all()
        err = ((out[live].float() - ref[live]).norm() / ref[live].norm()).item()
        assert err < 1.5e-2


@gpu
@pytest.mark.gpu
def test_store_kv_skips_padding_and_strided_inputs():
    from engine.attention import triton_ops
    T, KH, D, bs, nb = 10, 8, 128, 16, 4
    qkv = torch.randn(T, (32 + 2 * KH) * D, device="cuda", dtype=torch.bfloat16)
    k = qkv[:, 32 * D:(32 + KH) * D].view(T, KH, D)         # strided views of a fused projection
    v = qkv[:, (32 + KH) * D:].view(T, KH, D)
    kc = torch.randn(nb, bs, KH, D, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    slots = torch.tensor([5, 17, -1, 63, 0, -1, 31, 32, 48, 2], device="cuda")
    kr, vr = kc.clone(), vc.clone()
    keep = slots >= 0
    store_kv_ref(k[keep], v[keep], kr, vr, slots[keep])
    triton_ops.store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


# ------------------------------------------------------------------------ CPU (interpreter)

def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns scalars into 1-element arrays and converts
    them with ``int(array)``, which NumPy >= 2.4 refuses; convert via ``.item()``."""
    import triton.runtime.interpreter as interp
    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched


def _interpreter_main() -> None:
    """Tiny shapes through every kernel path (run with TRITON_INTERPRET=1)."""
    _patch_interpreter_index()
    errs = []
    many = [(i % 37, 1) for i in range(70)]                     # 70 requests: > one BLOCK_B scan
    many[3], many[66], many[69] = (0, 40), (5, 17), (30, 2)
    for spec, H, KH, D, bs in [
        ([(5, 1), (40, 1), (0, 1)], 4, 2, 16, 16),              # decode, GQA 2, split-K
        ([(0, 1)], 2, 2, 16, 16),                               # decode of a 1-token context (one split)
        ([(0, 20), (18, 1), (16, 9), (3, 2)], 4, 1, 32, 16),    # mixed: prefill, decode, prefix hit
        ([(600, 1), (30, 1)], 2, 1, 16, 16),                    # > MERGE_BLOCK_S splits, some empty
        (many, 2, 1, 16, 16),                                   # mixed, prefills past request 64
    ]:
        for dtype in (torch.float32, torch.float16):   # the interpreter's bf16 dot is wrong
            errs.append(check_forward(spec, H, KH, D, bs, dtype, device="cpu"))
    print("interpreter ok", " ".join(f"{e:.1e}" for e in errs))


@needs_triton
def test_kernels_under_interpreter():
    assert "interpreter ok" in run_under_interpreter(__file__, timeout=240)


if __name__ == "__main__":
    _interpreter_main()
