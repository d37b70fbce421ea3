"""engine.fused_ops (Triton) vs the torch layers they replace (engine.models.layers)."""

from __future__ import annotations

import pytest
import torch

from engine.models.layers import RMSNorm, RotaryEmbedding, apply_rotary, silu_and_mul
from tests.helpers.gpu import needs_cuda_triton, needs_triton, run_under_interpreter


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_all(device, dtype, tokens=(1, 7, 300), hidden=4096, heads=(32, 8), head_dim=128, tol=None):
    from engine import fused_ops
    tol = tol or {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(hidden, 1e-5).to(device)
    norm.weight.data = (1 + 0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    rope = RotaryEmbedding(head_dim, 8192, 500000.0, None)
    for T in tokens:
        x = torch.randn(T, hidden, generator=g).to(device, dtype)
        r = torch.randn(T, hidden, generator=g).to(device, dtype)
        assert rel(fused_ops.rmsnorm(x, norm.weight, norm.eps), norm(x)) < tol
        out, res = fused_ops.add_rmsnorm(x, r, norm.weight, norm.eps)
        ref_out, ref_res = norm(x, r)
        assert torch.equal(res, ref_res)
        assert rel(out, ref_out) < tol
        gu = torch.randn(T, 2 * 1000, generator=g).to(device, dtype)
        assert rel(fused_ops.silu_and_mul(gu), silu_and_mul(gu)) < tol
        H, KH = heads
        qkv = torch.randn(T, (H + 2 * KH) * head_dim, generator=g).to(device, dtype)
        q = qkv[:, :H * head_dim].view(T, H, head_dim)
        k = qkv[:, H * head_dim:(H + KH) * head_dim].view(T, KH, head_dim)
        pos = torch.randint(0, 8192, (T,), generator=g).to(device)
        cos, sin = rope(pos)
        ref_q, ref_k = apply_rotary(q.clone(), k.clone(), cos, sin)
        fused_ops.rope_(q, k, cos, sin)
        assert rel(q, ref_q) < tol and rel(k, ref_k) < tol


@pytest.mark.gpu
@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fused_ops_match_torch_layers(dtype):
    check_all("cuda", dtype, tokens=(1, 7, 300, 2048))
    check_all("cuda", dtype, tokens=(5,), hidden=576, heads=(9, 3), head_dim=64)   # SmolLM2 shapes


@needs_triton
def test_fused_ops_under_interpreter():
    assert "fused ok" in run_under_interpreter(__file__, timeout=120)


if __name__ == "__main__":
    check_all("cpu", torch.float32, tokens=(1, 3), hidden=96, heads=(4, 2), head_dim=16)
    print("fused ok")
