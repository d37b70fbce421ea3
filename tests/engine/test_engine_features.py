"""Prefix caching, KV export/import, sampling controls, n > 1, bad input."""

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.request import Request
from engine.sampler import Sampler

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine(EngineConfig(model=str(tiny_llama), block_size=8, num_kv_blocks=64))


def test_shared_prefix_is_served_from_the_cache(engine):
    prefix = list(range(10, 50))                         # 40 tokens = 5 full blocks of 8
    a, b = prefix + [60, 61, 62], prefix + [70, 71]
    ref_b = LLMEngine(EngineConfig(model=engine.config.model, block_size=8, num_kv_blocks=64,
                                   enable_prefix_caching=False)).generate([b], GREEDY)[0]
    out_a = engine.generate([a], GREEDY)[0]
    out_b = engine.generate([b], GREEDY)[0]
    assert out_a.num_cached_tokens == 0
    assert out_b.num_cached_tokens == 40
    assert out_b.token_ids == ref_b.token_ids
    assert ref_b.num_cached_tokens == 0


def test_evicted_prefix_blocks_are_recomputed_correctly(tiny_llama):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=8, num_kv_blocks=10))
    prompt = list(range(20, 60))                          # 5 blocks
    first = eng.generate([prompt], GREEDY)[0]
    eng.generate([list(range(100, 160))], GREEDY)         # 8+ blocks: evicts the cached prefix
    again = eng.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens < 40
    assert again.token_ids == first.token_ids


def test_block_events_report_stored_and_removed_hashes(tiny_llama):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=8, num_kv_blocks=6))
    eng.generate([list(range(3, 28))], GREEDY)            # 25 prompt + 8 out → 4 full blocks stored
    stored = [h for e in eng.drain_block_events() if e.kind == "stored" for h in e.block_hashes]
    assert len(stored) == 4
    eng.generate([list(range(100, 140))], GREEDY)         # needs 6 blocks: evicts them all
    removed = [h for e in eng.drain_block_events() if e.kind == "removed" for h in e.block_hashes]
    assert set(stored) <= set(removed)


def test_export_import_across_engines_continues_token_identically(tiny_llama):
    cfg = dict(model=str(tiny_llama), block_size=8, num_kv_blocks=32)
    prompt = list(range(30, 63))                          # 33 tokens: last block partial
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    expected = LLMEngine(EngineConfig(**cfg)).generate([prompt], params)[0].token_ids

    prefill = LLMEngine(EngineConfig(**cfg, mode="prefill"))
    decode = LLMEngine(EngineConfig(**cfg))
    prefill.add_request("r", prompt, params)
    outs = []
    while prefill.has_unfinished():
        outs += prefill.step()
    assert outs[-1].finished and outs[-1].metrics["held"]
    held = prefill.get_held("r")
    assert held.first_token == expected[0] and len(held.block_ids) == 5
    assert list(prefill.held_requests) == ["r"] and prefill.num_running == 0
    plan = decode.add_request_with_kv("r", prompt, held.first_token, params)
    decode.import_kv("r", prefill.export_kv("r", plan.num_cached_blocks))
    view = prefill.held_requests
    assert prefill.release("r")
    assert prefill.stats().num_held == 0 and "r" not in view      # a live view, not a copy
    assert prefill.stats().num_free_blocks == 32
    final = decode.finish_kv("r", ok=True)
    while decode.has_unfinished():
        final += decode.step()
    assert final[-1].finished and final[-1].token_ids == expected


def test_seeded_sampling_is_reproducible_and_seeds_differ(engine):
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=123, ignore_eos=True)
    a = engine.generate([[5, 6, 7]], p)[0].token_ids
    # batched with other work, same seed → same tokens
    b = engine.generate([[5, 6, 7], [9, 9, 9, 9]], [p, SamplingParams(max_tokens=5, temperature=1.0)])[0].token_ids
    c = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=1.0, seed=124, ignore_eos=True))[0]
    assert a == b
    assert c.token_ids != a


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 3
    order = logits[0].argsort(descending=True).tolist()
    probs = torch.softmax(logits[0], -1)
    sampler = Sampler()
    k_req = Request("k", [1], SamplingParams(temperature=1.0, top_k=3))
    seen_k = {sampler(logits, [k_req])[0].token_id for _ in range(300)}
    assert seen_k <= set(order[:3]) and len(seen_k) >= 2
    top_p = 0.6
    cum, nucleus = 0.0, []
    for t in order:                                       # smallest set with mass >= top_p
        nucleus.append(t)
        cum += probs[t].item()
        if cum >= top_p:
            break
    p_req = Request("p", [1], SamplingParams(temperature=1.0, top_p=top_p))
    seen_p = {sampler(logits, [p_req])[0].token_id for _ in range(300)}
    assert seen_p <= set(nucleus)
    m_req = Request("m", [1], SamplingParams(temperature=1.0, min_p=0.5))
    seen_m = {sampler(logits, [m_req])[0].token_id for _ in range(200)}
    assert all(probs[t] >= 0.5 * probs.max() for t in seen_m)


def test_logprobs_are_the_models_log_distribution(engine):
    out = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True))[0]
    lps = out.outputs[0].logprobs
    assert len(lps) == 3
    for tok, entry in zip(out.token_ids, lps):
        assert tok in entry and max(entry, key=entry.get) == tok      # greedy picks the top one
        assert all(v <= 0 for v in entry.values())


def test_n4_shares_prompt_blocks_and_copy_on_write_keeps_outputs_right(tiny_llama):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=8, num_kv_blocks=40))
    prompt = list(range(40, 61))                           # 21 tokens: 2 full blocks + partial
    single = eng.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    eng.add_request("g", prompt, SamplingParams(n=4, max_tokens=6, temperature=0.0, ignore_eos=True))
    eng.step()                                             # prompt done: children fork
    samples = eng._groups["g"]
    full_blocks = samples[0].block_ids[:2]
    assert all(s.block_ids[:2] == full_blocks for s in samples)
    assert [eng.block_manager.ref_counts[b] for b in full_blocks] == [4, 4]
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    final = outs[-1]
    assert final.finished and len(final.outputs) == 4
    assert all(o.token_ids == single.token_ids for o in final.outputs)   # CoW kept the shared tail intact
    assert eng.stats().num_free_blocks == 40
    seeded = eng.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in seeded.outputs}) > 1


def test_stop_strings_and_stop_token_ids(smollm2_engine):
    eng = smollm2_engine
    base = eng.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0))[0]
    stop_tok = base.token_ids[3]
    out = eng.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0,
                                                                     stop_token_ids=[stop_tok]))[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    word = base.text.split()[1]
    out = eng.generate(["The capital of France is"], SamplingParams(max_tokens=12, temperature=0.0, stop=[word]))[0]
    assert out.finish_reason == "stop" and word not in out.text
    assert base.text.startswith(out.text)


def test_bad_input_raises_clear_value_errors(engine):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", [5] * 600, GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad", [10**9], GREEDY)
    with pytest.raises(ValueError, match="model"):
        LLMEngine(EngineConfig(model="no-such-model"))


def test_decode_side_needs_no_pull_for_a_fully_cached_block_aligned_prompt(tiny_llama):
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), block_size=8, num_kv_blocks=32))
    prompt = list(range(70, 102))                          # 32 tokens = 4 full blocks
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    expected = eng.generate([prompt], params)[0].token_ids  # leaves the 4 blocks cached
    plan = eng.add_request_with_kv("d", prompt, expected[0], params)
    assert plan.num_cached_blocks == 4 and plan.missing_block_ids == [] and plan.num_cached_tokens == 32
    outs = eng.finish_kv("d", ok=True)
    while eng.has_unfinished():
        outs += eng.step()
    assert outs[-1].token_ids == expected
