"""CUDA-graph decode (engine.cuda_graphs) == eager decode, padding never touches the KV cache."""

from __future__ import annotations

import pytest
import torch

from engine.cuda_graphs import default_buckets


def test_default_buckets():
    assert default_buckets(1) == [1]
    assert default_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert default_buckets(100)[-3:] == [80, 96, 100]
    assert default_buckets(256)[-2:] == [240, 256]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_decode_matches_eager():
    from engine.attention.triton_backend import TritonAttention
    from engine.cuda_graphs import CUDAGraphRunner
    from engine.kv_cache import KVCache, KVCacheSpec
    from engine.model_runner import ModelRunner
    from engine.models.llama import ModelConfig
    from engine.models.loader import build_model, init_dummy_weights
    from engine.models.presets import get_preset
    from engine.outputs import ScheduledRequest, SchedulerOutput

    dev = torch.device("cuda")
    cfg = ModelConfig.from_hf_dict(get_preset("llama-small"))
    model = build_model(cfg, torch.bfloat16, dev)
    init_dummy_weights(model, seed=0)
    spec = KVCacheSpec(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 16, torch.bfloat16)
    kv = KVCache(spec, 256, dev)
    kv.tensor.normal_()
    runner = ModelRunner(model, kv, TritonAttention(), dev, max_model_len=1024)
    graphs = CUDAGraphRunner(runner, 16)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(256, generator=gen).tolist()
    for n in (5, 1, 3, 16):
        lens = torch.randint(1, 300, (n,), generator=gen).tolist()
        sched, pos = SchedulerOutput(), 0
        for i, L in enumerate(lens):
            nb = -(-L // 16)
            blocks = perm[pos:pos + nb]
            pos += nb
            sched.requests.append(ScheduledRequest(f"r{i}", [int(torch.randint(0, 49152, (1,), generator=gen))],
                                                   L - 1, blocks, True))
        ids, positions, meta = runner.prepare(sched)
        before = kv.tensor.clone()
        runner.graphs = None
        eager = runner.forward(ids, positions, meta).clone()
        after_eager = kv.tensor.clone()
        kv.tensor.copy_(before)
        runner.graphs = graphs
        assert graphs.can_run(meta)
        out = runner.forward(ids, positions, meta)
        assert out.shape == eager.shape
        err = ((out.float() - eager.float()).norm() / eager.float().norm()).item()
        assert err < 2e-2, (n, err)
        # the graph wrote exactly the new tokens' slots (padding rows write nothing)
        changed = (kv.tensor != before).flatten(3).any(-1).any(0).any(0)        # [num_blocks, block_size]
        assert torch.equal(changed, (after_eager != before).flatten(3).any(-1).any(0).any(0))
        assert torch.allclose(kv.tensor.float(), after_eager.float(), atol=5e-2, rtol=5e-2)
    assert set(graphs.graphs) == {8, 1, 4, 16}
    assert all(s > 0 for s in graphs.capture_seconds.values())
