"""Greedy output token-identical to Hugging Face transformers on the same weights,
through batching, block boundaries, chunked prefill and preemption."""

import random

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine.conftest import hf_greedy


def mixed_prompts(vocab, lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LENGTHS = [3, 8, 17, 31, 46]


@pytest.fixture(scope="module")
def llama_case(tiny_llama):
    prompts = mixed_prompts(256, LENGTHS)
    return tiny_llama, prompts, hf_greedy(tiny_llama, prompts, GREEDY.max_tokens)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("block_size,budget,num_blocks", [
    (16, 2048, None),      # plain batch
    (8, 2048, None),       # prompts crossing many block boundaries
    (8, 20, None),         # token budget forces chunked prefill
    (8, 64, 12),           # 96 slots for 5 requests: forces preemption
])
def test_tiny_llama_gqa_matches_transformers(llama_case, block_size, budget, num_blocks, async_scheduling):
    path, prompts, expected = llama_case
    eng = LLMEngine(EngineConfig(model=str(path), block_size=block_size, max_num_batched_tokens=budget,
                                 num_kv_blocks=num_blocks, max_num_seqs=8, async_scheduling=async_scheduling))
    outs = eng.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    if num_blocks == 12:
        assert eng.stats().num_preemptions > 0
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_tiny_qwen2_with_bias_matches_transformers(tiny_qwen2):
    prompts = mixed_prompts(256, LENGTHS, seed=1)
    expected = hf_greedy(tiny_qwen2, prompts, GREEDY.max_tokens)
    eng = LLMEngine(EngineConfig(model=str(tiny_qwen2), block_size=8, max_num_batched_tokens=24))
    assert [o.token_ids for o in eng.generate(prompts, GREEDY)] == expected


def test_smollm2_gguf_matches_transformers(smollm2_path):
    eng = LLMEngine(EngineConfig(model="smollm2-135m", block_size=16, max_num_batched_tokens=40,
                                 num_kv_blocks=64))
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away, there lived a"]
    prompts = [eng.tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    expected = hf_greedy(smollm2_path.parent, prompts, 16, gguf_file=smollm2_path.name)
    assert [o.token_ids for o in eng.generate(prompts, params)] == expected
