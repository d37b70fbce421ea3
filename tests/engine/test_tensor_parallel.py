"""Tensor parallelism on CPU: a TP=2 engine (rank 1 in a spawned process, gloo)
against the TP=1 engine on the same tiny fp32 checkpoint.

The vocabulary (251) is odd on purpose: rank 1's vocab shard carries one
padding row, and the LM head must cut it off.
"""

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.outputs import ScheduledRequest, SchedulerOutput
from tests.helpers.tiny_models import make_tiny_model

BS = 4


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tp_llama"), "llama", num_kv_heads=2, vocab_size=251)
    cfg = dict(model=str(path), num_kv_blocks=64, block_size=BS)
    tp1 = LLMEngine(EngineConfig(**cfg))
    tp2 = LLMEngine(EngineConfig(**cfg, tensor_parallel_size=2))
    yield tp1, tp2
    tp2.close()


def test_tp2_shards_the_kv_heads(engines):
    tp1, tp2 = engines
    assert tp1.kv_spec.num_kv_heads == 2 and tp2.kv_spec.num_kv_heads == 1
    attn = tp2.model.model.layers[0].self_attn.qkv_proj
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert tp2.model.lm_head.weight.shape[0] == 126    # 251 = 126 + 125 (+1 padding row)


def test_tp2_logits_match_tp1(engines):
    tp1, tp2 = engines
    prompt = list(range(3, 40))
    sched = SchedulerOutput([ScheduledRequest("a", prompt, 0, list(range(10)), True)])
    rows = list(range(len(prompt)))
    torch.testing.assert_close(tp2.runner.run(sched, rows), tp1.runner.run(sched, rows),
                               rtol=1e-5, atol=1e-5)


def test_tp2_greedy_tokens_match_tp1(engines):
    tp1, tp2 = engines
    prompts = [list(range(3, 40)), [7, 8, 9, 10, 11], list(range(100, 130))]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in tp2.generate(prompts, params)] == \
           [o.token_ids for o in tp1.generate(prompts, params)]


def test_tp2_export_stacks_head_shards_and_import_slices_them(engines):
    tp1, tp2 = engines
    prompt = list(range(20, 33))    # 13 tokens: 4 blocks, the last partial
    params = SamplingParams(max_tokens=4, temperature=0.0)
    for eng in (tp1, tp2):
        eng.scheduler.hold_after_prefill = True
        eng.generate([prompt], params)
    try:
        rid1, rid2 = next(iter(tp1.scheduler.held)), next(iter(tp2.scheduler.held))
        full = tp1.export_kv(rid1)
        shards = tp2.export_kv(rid2)
        assert shards.shape == (2, *full.shape[:4], 1, full.shape[5])
        merged = torch.cat(shards.unbind(0), dim=4)        # head shards in rank order
        torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
        # import on TP=2: each rank keeps its slice of the full heads; export gives them back
        spare = list(range(60, 64))       # never reached by these short prompts
        tp2.runner.import_kv(spare, full)
        torch.testing.assert_close(tp2.runner.export_kv(spare), full.movedim(4, 0).unsqueeze(5))
    finally:
        for eng in (tp1, tp2):
            for rid in list(eng.scheduler.held):
                eng.release(rid)
            eng.scheduler.hold_after_prefill = False
