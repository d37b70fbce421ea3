"""Triton kernels for paged attention, and their Python launchers.

Three kernels over the paged cache ``[num_blocks, block_size, KH, D]``:

- ``store_kv``: scatter each new token's K/V ``[T, KH, D]`` to its cache slot.
  A negative slot means "padding, skip" (CUDA-graph batches are padded).
- ``paged_decode``: one query token per request, flash-decoding split-K. A
  program owns (request, KV head, split) and all ``H / KH`` query heads of
  that KV head (GQA: each K/V tile is read once for the whole group, padded
  to 16 rows for the tensor cores). Decisions:
    * the number of splits is a function of shapes only (batch size, KV heads,
      SM count, block-table width) — never of the step's context lengths —
      so grid and arguments are fixed for a CUDA graph; each program reads
      ``seq_lens`` on the device and takes ``ceil(seq_len / splits)`` keys
      (rounded up to a tile), so short contexts leave trailing splits empty;
    * with one split the kernel normalises and writes the output directly,
      otherwise a second small kernel merges the splits by their log-sum-exp;
    * padded requests (``seq_len == 0``) produce zeros, never NaN.
- ``paged_prefill``: query chunks attend causally to their request's paged
  context (cached prefix + the chunk itself, already stored). Covers plain
  prefill, chunked prefill and prefix-cache hits. One program owns
  (query head, query tile of BLOCK_M rows of one request); the tile → request
  mapping is computed on the device from ``query_start_loc`` (a cumulative sum
  of tile counts), so no host-built tile table is copied per step. Requests with
  ``query_len == 1`` inside a mixed batch are skipped here and handled by the
  decode kernel in "mixed" mode, which reads each request's query row from
  ``query_start_loc`` — a 1-row query in a 128-row tile would waste the
  tensor cores and re-read the context once per query head.

Compiled variants depend on the model and the device only, never on the step:
a Triton kernel compiles once per distinct set of ``tl.constexpr`` values and
argument specializations (an int equal to 1 or divisible by 16, a pointer
16-byte aligned), and a compile mid-serving stalls the engine thread for
0.2-2 s. So nothing a step decides is a compile-time constant here:

- the decode kernel tests ``num_splits == 1`` at run time, and its split
  workspace is always fp32 (a 1-element dummy when unused);
- the merge kernel walks the splits in chunks of ``BLOCK_S`` at run time
  (online log-sum-exp), instead of one tile of ``next_pow2(num_splits)`` rows;
- the prefill kernel finds a tile's request over ``BLOCK_B`` requests at a
  time, instead of one tile of ``next_pow2(num_requests)``;
- per-step integers (split count, request count, block-table width) are in
  ``do_not_specialize``, and per-step metadata pointers (slot mapping, query
  starts, sequence lengths, block tables: slices of one staging buffer whose
  offsets follow B and T, so their 16-byte alignment changed with B % 4) in
  ``do_not_specialize_on_alignment``. They are read as scalars or short
  gathers: the alignment hint bought next to nothing.

What remains compiles on first use, so the engine runs a mixed and a
decode-only step at start-up (``ModelRunner.warm_up``);
tests/engine/test_kernel_variants.py serves steps of every batch size after
it and expects no new variant (on a GPU: no compile).

All kernels accumulate in fp32 (online softmax in base 2), take bf16, fp16
or fp32 inputs (fp32 dots use IEEE precision, not tf32) and any head dim (padded
to a power of two). Inputs may be strided views (q/k/v slices of a fused QKV
projection) as long as the last dimension is contiguous. Tile sizes, split
counts and device queries live in ``launch_config`` (re-exported here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.launch_config import (
    decode_config,
    decode_num_splits,
    max_shared_mem,
    next_pow2,
    num_sms,
    prefill_config,
    prefill_num_tiles,
)

_LOG2E = 1.4426950408889634
MERGE_BLOCK_S = 16      # splits the merge kernel combines per loop step (decode_num_splits caps at 64)
PREFILL_BLOCK_B = 64    # requests the prefill kernel scans per loop step to map a tile to its request


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- KV store

@triton.jit(do_not_specialize_on_alignment=["slot_ptr"])
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ct, stride_ch,
                     BLOCK_SIZE: tl.constexpr, KH: tl.constexpr, HEAD_DIM: tl.constexpr,
                     KH_P: tl.constexpr, D_P: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        h = tl.arange(0, KH_P)[:, None]
        d = tl.arange(0, D_P)[None, :]
        mask = (h < KH) & (d < HEAD_DIM)
        dst = blk * stride_cb + off * stride_ct + h * stride_ch + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write ``k, v [T, KH, D]`` to ``slot_mapping [T]`` (block * block_size + offset; < 0 = skip)."""
    T, KH, D = k.shape
    if T == 0:
        return
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with a contiguous head dim")
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _store_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], KH=KH, HEAD_DIM=D, KH_P=next_pow2(KH), D_P=next_pow2(D),
        num_warps=1 if KH * D <= 1024 else 4)


def _check_attention_args(q, k_cache, v_cache, out):
    """Shared checks of the attention launchers; returns (q with a contiguous
    head dim, the output tensor, allocated when None)."""
    T, H, D = q.shape
    KH = k_cache.shape[2]
    if H % KH:
        raise ValueError(f"{H} query heads are not a multiple of {KH} KV heads")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share one layout with a contiguous head dim")
    q = _last_dim_contiguous(q)
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    return q, out


# --------------------------------------------------------------------------- decode

@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One key tile of flash attention (base-2 scores ``s``, masked with -inf):
    rescale the running max ``m_i``, sum ``l_i`` and output ``acc``, add the tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _kv_tile_base(bt_row, toks, kh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE: tl.constexpr, tmask=None):
    """Offsets of the key/value rows of tokens ``toks`` of one KV head (``tmask``:
    which tokens exist; None when all do) through the request's block-table row."""
    if tmask is None:
        blk = tl.load(bt_row + toks // BLOCK_SIZE).to(tl.int64)
    else:
        blk = tl.load(bt_row + toks // BLOCK_SIZE, mask=tmask, other=0).to(tl.int64)
    return blk * stride_cb + (toks % BLOCK_SIZE) * stride_ct + kh * stride_ch


# per-step values (batch width, split count, metadata pointers) are not specialized
# on: a new divisibility class would otherwise recompile the kernel mid-serving
@triton.jit(do_not_specialize=["num_splits", "stride_bt"],
            do_not_specialize_on_alignment=["bt_ptr", "seq_lens_ptr", "qsl_ptr"])
def _decode_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                   out_ptr, part_o_ptr, part_lse_ptr,
                   qk_scale, num_splits,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_cb, stride_ct, stride_ch, stride_bt,
                   GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                   HEAD_DIM: tl.constexpr, D_P: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                   MIXED: tl.constexpr, DOT_PREC: tl.constexpr):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    if MIXED:   # query row from query_start_loc; requests with query_len != 1 belong to the prefill kernel
        row = tl.load(qsl_ptr + b)
        is_decode = (tl.load(qsl_ptr + b + 1) - row) == 1
    else:
        row = b
        is_decode = True
    if is_decode:
        seq_len = tl.load(seq_lens_ptr + b)
        # keys of this split: a tile-aligned share of this request's context, read on the device
        split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        start = split * split_len
        end = tl.minimum(start + split_len, seq_len)

        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, D_P)
        heads = kh * GROUP + offs_h
        hmask = offs_h < GROUP
        dmask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + row.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0)
        q = q.to(kc_ptr.dtype.element_ty)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, D_P], tl.float32)
        bt_row = bt_ptr + b.to(tl.int64) * stride_bt
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            toks = n0 + offs_n
            tmask = toks < end
            base = _kv_tile_base(bt_row, toks, kh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, tmask)
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(tmask[None, :], s, float("-inf"))
            v = tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)

        omask = hmask[:, None] & dmask[None, :]
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]    # empty context → zeros, not NaN
        if num_splits == 1:     # a run-time test: one compiled variant for every batch size
            tl.store(out_ptr + row.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            # workspace [B, H, num_splits, HEAD_DIM] fp32 and lse [B, H, num_splits] (base 2)
            part = (b.to(tl.int64) * num_heads + heads) * num_splits + split
            tl.store(part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], o, mask=omask)
            lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
            tl.store(part_lse_ptr + part, lse, mask=hmask)


@triton.jit(do_not_specialize=["num_splits"], do_not_specialize_on_alignment=["qsl_ptr"])
def _decode_merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, qsl_ptr,
                         num_splits, stride_ot, stride_oh,
                         HEAD_DIM: tl.constexpr, D_P: tl.constexpr,
                         BLOCK_S: tl.constexpr, MIXED: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    if MIXED:
        row = tl.load(qsl_ptr + b)
        is_decode = (tl.load(qsl_ptr + b + 1) - row) == 1
    else:
        row = b
        is_decode = True
    if is_decode:
        offs_d = tl.arange(0, D_P)
        dmask = offs_d < HEAD_DIM
        base = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits
        # BLOCK_S splits at a time, merged by their log-sum-exp with a running max
        # (one chunk when num_splits <= BLOCK_S: the plain max-weighted sum)
        m = tl.full([], float("-inf"), tl.float32)
        den = tl.zeros([], tl.float32)
        acc = tl.zeros([D_P], tl.float32)
        for s0 in range(0, num_splits, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            smask = offs_s < num_splits
            lse = tl.load(part_lse_ptr + base + offs_s, mask=smask, other=float("-inf"))
            o = tl.load(part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=smask[:, None] & dmask[None, :], other=0.0)
            valid = lse > float("-inf")     # empty splits never wrote their partial output
            m_new = tl.maximum(m, tl.max(lse, 0))
            m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m - m_ref)      # 0 while nothing was valid (m = -inf)
            w = tl.where(valid, tl.exp2(lse - m_ref), 0.0)
            acc = acc * alpha + tl.sum(w[:, None] * tl.where(valid[:, None], o, 0.0), 0)
            den = den * alpha + tl.sum(w, 0)
            m = m_new
        res = acc / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + row.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
                 res.to(out_ptr.dtype.element_ty), mask=dmask)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None, query_start_loc: torch.Tensor | None = None,
                 num_splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """Decode attention: ``q [T, H, D]`` → ``out [T, H, D]``.

    Without ``query_start_loc`` request b's query is row b (decode-only batch,
    B = ``block_tables.shape[0]`` requests). With it ("mixed"), request b's row
    is ``query_start_loc[b]`` and only requests with query_len 1 are computed;
    other rows of ``out`` are left untouched. Grid and arguments depend on
    shapes only: safe to capture in a CUDA graph.
    """
    T, H, D = q.shape
    B = block_tables.shape[0]
    _, block_size, KH, _ = k_cache.shape
    q, out = _check_attention_args(q, k_cache, v_cache, out)
    if B == 0:
        return out
    cfg = dict(decode_config(k_cache.dtype, D), **(config or {}))
    block_n = cfg.pop("BLOCK_N")
    if num_splits is None:
        num_splits = decode_num_splits(B, KH, block_tables.shape[1], block_size, block_n, num_sms(q.device))
    group = H // KH
    mixed = query_start_loc is not None
    qsl = query_start_loc if mixed else seq_lens   # unused pointer when not mixed
    if num_splits > 1:
        part_o = torch.empty((B, H, num_splits, D), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((B, H, num_splits), dtype=torch.float32, device=q.device)
    else:   # unused, but fp32 like the workspace: a pointer's dtype is part of the compiled variant
        part_o = part_lse = torch.empty((1,), dtype=torch.float32, device=q.device)
    D_P = next_pow2(D)
    _decode_kernel[(B, KH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, qsl, out, part_o, part_lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, BLOCK_H=max(16, next_pow2(group)), HEAD_DIM=D, D_P=D_P,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, MIXED=mixed,
        DOT_PREC=_dot_precision(k_cache.dtype), **cfg)
    if num_splits > 1:
        _decode_merge_kernel[(B, H)](
            part_o, part_lse, out, qsl, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=D, D_P=D_P, BLOCK_S=MERGE_BLOCK_S, MIXED=mixed,
            num_warps=4 if D_P * MERGE_BLOCK_S >= 4096 else 2)
    return out


# --------------------------------------------------------------------------- prefill / extend

@triton.jit(do_not_specialize=["num_reqs", "stride_bt"],
            do_not_specialize_on_alignment=["bt_ptr", "seq_lens_ptr", "qsl_ptr"])
def _prefill_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
                    qk_scale, num_reqs,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_P: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_B: tl.constexpr, DOT_PREC: tl.constexpr):
    h = tl.program_id(0)
    tile = tl.program_id(1)
    kh = h // GROUP

    # tile -> (request, query tile): cumulative tile counts of requests with query_len > 1,
    # BLOCK_B requests at a time. The tile's request b is the number of requests whose
    # tiles all come before it; its first tile is the largest cumulative count <= tile.
    offs_b = tl.arange(0, BLOCK_B)
    b = 0
    first_tile = 0
    done = 0                                    # tiles of the requests before this chunk
    for b0 in range(0, num_reqs, BLOCK_B):
        idx = b0 + offs_b
        bmask = idx < num_reqs
        starts = tl.load(qsl_ptr + idx, mask=bmask, other=0)
        qlens = tl.load(qsl_ptr + idx + 1, mask=bmask, other=0) - starts
        ntiles = tl.where(qlens > 1, tl.cdiv(qlens, BLOCK_M), 0)
        cum = done + tl.cumsum(ntiles, 0)
        before = cum <= tile
        b += tl.sum(before.to(tl.int32), 0)
        first_tile = tl.maximum(first_tile, tl.max(tl.where(before, cum, 0), 0))
        done += tl.sum(ntiles, 0)
    q_start = tl.load(qsl_ptr + b)
    qlen = tl.load(qsl_ptr + b + 1) - q_start
    n_b = tl.cdiv(qlen, BLOCK_M)
    qt = n_b - 1 - (tile - first_tile)          # last (heaviest) query tiles are scheduled first
    seq_len = tl.load(seq_lens_ptr + b)
    ctx0 = seq_len - qlen                       # position of the request's first query row

    offs_m = qt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_P)
    offs_n = tl.arange(0, BLOCK_N)
    mmask = offs_m < qlen
    dmask = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=mmask[:, None] & dmask[None, :], other=0.0)
    q = q.to(kc_ptr.dtype.element_ty)
    qpos = ctx0 + offs_m

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # keys [0, full_end) are visible to every row of the tile: no causal mask there
    full_end = ((ctx0 + qt * BLOCK_M + 1) // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(ctx0 + (qt + 1) * BLOCK_M, seq_len)
    for n0 in range(0, full_end, BLOCK_N):
        toks = n0 + offs_n
        base = _kv_tile_base(bt_row, toks, kh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE)
        k = tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        v = tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=dmask[None, :], other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)
    for n0 in range(full_end, kv_end, BLOCK_N):   # the diagonal: causal mask
        toks = n0 + offs_n
        tmask = toks < kv_end
        base = _kv_tile_base(bt_row, toks, kh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE, tmask)
        kv_mask = tmask[:, None] & dmask[None, :]
        k = tl.load(kc_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        s = tl.where((toks[None, :] <= qpos[:, None]) & tmask[None, :], s, float("-inf"))
        v = tl.load(vc_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_PREC)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                  query_lens_cpu: list[int], scale: float, out: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """Causal attention of the query rows of requests with query_len > 1 over their paged context.

    Rows of requests with query_len 1 are left untouched in ``out`` (the decode
    kernel's mixed mode fills them). ``query_lens_cpu`` only sizes the grid.
    """
    T, H, D = q.shape
    _, block_size, KH, _ = k_cache.shape
    q, out = _check_attention_args(q, k_cache, v_cache, out)
    cfg = dict(prefill_config(k_cache.dtype, D, max_shared_mem(q.device)), **(config or {}))
    block_m, block_n = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N")
    num_tiles = prefill_num_tiles(query_lens_cpu, block_m)
    if num_tiles == 0:
        return out
    B = len(query_lens_cpu)
    _prefill_kernel[(H, num_tiles)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * _LOG2E, B,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=H // KH, HEAD_DIM=D, D_P=next_pow2(D), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=PREFILL_BLOCK_B,
        DOT_PREC=_dot_precision(k_cache.dtype), **cfg)
    return out


def attention_flops(query_lens: list[int], seq_lens: list[int], num_heads: int, head_dim: int) -> float:
    """Useful FLOPs of causal paged attention (QK^T and PV, 2 FLOPs per MAC)."""
    total = 0
    for ql, sl in zip(query_lens, seq_lens):
        ctx0 = sl - ql
        total += ql * ctx0 + ql * (ql + 1) // 2      # visible keys summed over query rows
    return 4.0 * total * num_heads * head_dim


__all__ = ["store_kv", "paged_decode", "paged_prefill", "decode_num_splits", "decode_config",
           "prefill_config", "prefill_num_tiles", "attention_flops", "num_sms", "max_shared_mem"]
