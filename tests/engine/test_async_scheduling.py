"""Async scheduling (one step in flight, placeholders filled on the device) gives
exactly what the synchronous engine gives, and finishes, aborts and the context
limit leave nothing behind. Run on CPU, where the same code path executes
without the overlap."""

import pytest

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.outputs import PLACEHOLDER


def make(path, async_scheduling, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(EngineConfig(model=str(path), async_scheduling=async_scheduling, **kw))


def run_all(eng, requests):
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    finals = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def summary(out):
    return [(o.token_ids, o.finish_reason, [sorted(lp) for lp in (o.logprobs or [])]) for o in out.outputs]


def test_async_equals_sync_for_seeds_n_logprobs_and_stop_tokens(tiny_llama):
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    probe = make(tiny_llama, False).generate([[7, 8, 9, 10]], greedy)[0].token_ids
    requests = [
        ("seeded-n3", [5, 6, 7, 8, 9, 10, 11], SamplingParams(n=3, max_tokens=10, temperature=0.9, seed=11,
                                                               logprobs=2, ignore_eos=True)),
        ("greedy", list(range(20, 45)), greedy),
        ("stops", [7, 8, 9, 10], SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[probe[4]])),
        ("one", [3, 4], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)),
    ]
    sync = run_all(make(tiny_llama, False), requests)
    eng = make(tiny_llama, True)
    pipelined = run_all(eng, requests)
    assert sync.keys() == pipelined.keys() == {r[0] for r in requests}
    for rid in sync:
        assert summary(pipelined[rid]) == summary(sync[rid]), rid
        for a, b in zip(pipelined[rid].outputs, sync[rid].outputs):
            for la, lb in zip(a.logprobs or [], b.logprobs or []):
                assert all(abs(la[t] - lb[t]) < 1e-5 for t in la)
    assert sync["stops"].finish_reason == "stop" and len(sync["stops"].token_ids) == probe.index(probe[4]) + 1
    assert len(sync["seeded-n3"].outputs) == 3
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks and not eng.scheduler.requests


def test_outputs_lag_one_step_and_the_next_step_uses_a_placeholder(tiny_llama):
    eng = make(tiny_llama, True)
    eng.add_request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert eng.step() == []                     # prompt launched; its token is not known yet
    req = eng.scheduler.requests["r"]
    assert req.num_inflight_samples == 1 and req.num_output_tokens == 0
    first = eng.step()                          # decode launched with a placeholder, prompt's token back
    assert [o.new_token_ids for o in first] == [[req.output_token_ids[0]]]
    sched = eng._inflight.sched
    assert sched.requests[0].token_ids == [PLACEHOLDER] and sched.requests[0].start_pos == 5
    while eng.has_unfinished():
        eng.step()
    assert req.num_output_tokens == 4 and req.num_inflight_tokens == req.num_inflight_samples == 0


def test_abort_with_a_step_in_flight_and_the_context_limit(tiny_llama):
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    expected = make(tiny_llama, False, max_model_len=40).generate([list(range(30, 60))], params)[0]
    assert expected.finish_reason == "length" and len(expected.token_ids) == 10   # 30 + 10 = max_model_len
    eng = make(tiny_llama, True, max_model_len=40)
    eng.add_request("keep", list(range(30, 60)), params)
    eng.add_request("drop", list(range(60, 90)), params)
    eng.step()
    eng.step()
    assert eng.abort("drop")                    # its in-flight step is ignored
    finals = {}
    while eng.has_unfinished():
        finals.update({o.request_id: o for o in eng.step() if o.finished})
    assert list(finals) == ["keep"]
    assert finals["keep"].token_ids == expected.token_ids and finals["keep"].finish_reason == "length"
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks


def test_stop_string_holdback_is_per_request(smollm2_engine):
    eng = smollm2_engine
    long_stop = SamplingParams(max_tokens=6, temperature=0.0, stop=["a stop string nobody writes"])
    eng.generate(["Hello"], long_stop)
    eng.add_request("plain", "The capital of France is", SamplingParams(max_tokens=6, temperature=0.0))
    streamed = ""
    while eng.has_unfinished():
        for out in eng.step():
            streamed += out.new_text
            if not out.finished:
                # no stop strings: nothing is held back, the stream is the whole text so far
                assert streamed == out.text
    assert streamed == out.text


def test_async_needs_a_tp1_colocated_engine():
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(async_scheduling=True, mode="prefill")
