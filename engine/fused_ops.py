"""Triton kernels for the decoder's elementwise stages (GPU), one launch each.

Why: the eager layers in ``engine.models.layers`` spend ~35 small kernels per
decoder layer on RMSNorm (fp32 upcast, pow, mean, rsqrt, muls, casts), RoPE
(index, upcast, chunk, cat, muls, add, cast) and SiLU-gating. Measured on H100
(``benchmarks/results/roofline_h100_baseline.json``) that is ~1,300 launches
per Llama-3-8B step: ~2 ms of a 8.7 ms B=1 decode step even under CUDA graphs,
and ~24 ms of a 70 ms 2k-token prefill. Each function here is one kernel with
the same numerics as the torch code it replaces:

- ``add_rmsnorm(x, residual, weight, eps)`` → ``(normed, x + residual)``;
  ``rmsnorm(x, weight, eps)``: fp32 statistics, ``weight * normed.to(dtype)``
  rounded as torch rounds it (HF semantics).
- ``rope_(q, k, cos, sin)``: rotate-half RoPE **in place** on q ``[T, H, D]``
  and k ``[T, KH, D]`` (strided views of a fused QKV output are fine), with
  the per-token ``cos``/``sin`` ``[T, 1, D]`` fp32 of ``RotaryEmbedding``
  (its two halves are equal); math in fp32. Drop-in for ``apply_rotary``.
- ``silu_and_mul(x)``: ``[T, 2I]`` (gate ‖ up) → ``silu(gate) * up``.

Rows must have a contiguous last dimension. Results match the torch code to
bf16 rounding (reduction order differs), see tests/engine/test_fused_ops.py.

Compiled variants follow the model's shapes only (hidden size, heads, head
dim), never the step's token count T: T is the grid, strides are per-row
constants, and the tensors are fresh allocations or views at fixed offsets
(``sin`` lies T·D fp32 after ``cos``: 16-byte aligned for any head dim
divisible by 4). So the start-up warm-up covers every step
(tests/engine/test_kernel_variants.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.launch_config import next_pow2


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps,
                    stride_x, stride_r, stride_o, stride_ro, N,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)      # rounded as torch's add rounds
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    h = (xf * rstd).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _rmsnorm_launch(x, residual, weight, eps):
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T, N = x2.shape
    out = torch.empty((T, N), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, N)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        res_out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    else:
        r2 = res_out = x2
    if T:
        block = next_pow2(N)
        _rmsnorm_kernel[(T,)](x2, r2, weight, out, res_out, eps,
                              x2.stride(0), r2.stride(0), out.stride(0), res_out.stride(0), N,
                              HAS_RES=residual is not None, BLOCK=block,
                              num_warps=max(1, min(16, block // 512)))
    return out.view(shape), (res_out.view(shape) if residual is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _rmsnorm_launch(x, None, weight, eps)[0]


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(rmsnorm(x + residual), x + residual)`` in one pass."""
    return _rmsnorm_launch(x, residual, weight, eps)


@triton.jit
def _rotate_heads(ptr, stride_h, c, s, d, dmask, NH: tl.constexpr, NH_P: tl.constexpr, HALF: tl.constexpr):
    """Rotate-half RoPE in place on the ``NH`` heads of one token at ``ptr``."""
    h = tl.arange(0, NH_P)[:, None]
    m = (h < NH) & dmask[None, :]
    p1 = ptr + h * stride_h + d[None, :]
    x1 = tl.load(p1, mask=m, other=0.0)
    x2 = tl.load(p1 + HALF, mask=m, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (a * c - b * s).to(x1.dtype), mask=m)
    tl.store(p1 + HALF, (b * c + a * s).to(x1.dtype), mask=m)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr,
                 stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
                 H: tl.constexpr, KH: tl.constexpr, H_P: tl.constexpr, KH_P: tl.constexpr,
                 HALF: tl.constexpr, HALF_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, HALF_P)
    dmask = d < HALF
    c = tl.load(cos_ptr + t * stride_cos + d, mask=dmask, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * stride_cos + d, mask=dmask, other=0.0)[None, :]
    _rotate_heads(q_ptr + t * stride_qt, stride_qh, c, s, d, dmask, H, H_P, HALF)
    _rotate_heads(k_ptr + t * stride_kt, stride_kh, c, s, d, dmask, KH, KH_P, HALF)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE in place; per-token ``cos``/``sin`` ``[T, 1, D]`` or ``[T, D]`` (halves equal)."""
    T, H, D = q.shape
    KH = k.shape[1]
    cos, sin = cos.reshape(T, D), sin.reshape(T, D)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rope_ needs a contiguous head dim and cos/sin of one layout")
    if T:
        half = D // 2
        _rope_kernel[(T,)](q, k, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                           cos.stride(0), H=H, KH=KH, H_P=next_pow2(H), KH_P=next_pow2(KH),
                           HALF=half, HALF_P=next_pow2(half), num_warps=4)
    return q, k


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)     # torch rounds silu's output
    tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2I]`` (gate ‖ up) → ``silu(gate) * up`` ``[..., I]``."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T, N2 = x2.shape
    N = N2 // 2
    out = torch.empty((T, N), dtype=x.dtype, device=x.device)
    if T:
        block = min(2048, next_pow2(N))
        _silu_mul_kernel[(T, triton.cdiv(N, block))](x2, out, x2.stride(0), out.stride(0), N,
                                                     BLOCK=block, num_warps=4)
    return out.view(*shape[:-1], N)
