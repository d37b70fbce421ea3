"""CompletionStream: RequestOutputs → per-completion deltas."""

from engine.outputs import CompletionOutput, RequestOutput
from engine.request import SamplingParams
from workers.streams import CompletionStream


def out(*comps, cached=0):
    return RequestOutput("r", [1, 2], [CompletionOutput(i, toks, text, fin) for i, (toks, text, fin) in
                                       enumerate(comps)], finished=all(c[2] for c in comps),
                         num_cached_tokens=cached)


def test_generate_stream_holds_back_text_that_may_start_a_stop_string():
    s = CompletionStream(SamplingParams(stop=["END"]))
    [c] = s.chunks(out(([5], "ab", None)))
    assert (c.token_ids, c.text) == ([5], "")               # "ab" could be the start of... anything 2 long
    [c] = s.chunks(out(([5, 6], "abcd", None)))
    assert (c.token_ids, c.text) == ([6], "ab")
    [c] = s.chunks(out(([5, 6, 7], "abcd", "stop")))       # engine cut "END" from the final text
    assert (c.token_ids, c.text, c.finish_reason) == ([7], "cd", "stop")
    assert s.finished and s.chunks(out(([5, 6, 7], "abcd", "stop"))) == []


def test_decode_stream_skips_the_first_token_and_its_text():
    s = CompletionStream(SamplingParams(), skip_first=True)
    assert s.chunks(out(([9], "Hi", None), cached=4)) == []   # finish_kv's output: the handle's token
    [c] = s.chunks(out(([9, 10], "Hi there", None), cached=4))
    assert (c.token_ids, c.text, c.num_cached_tokens) == ([10], " there", 4)
    [c] = s.chunks(out(([9, 10], "Hi there", "length")))
    assert c.token_ids == [] and c.finish_reason == "length" and s.finished


def test_n_completions_finish_independently_and_abort_closes_the_rest():
    s = CompletionStream(SamplingParams(n=2))
    chunks = s.chunks(out(([1], "", "stop"), ([2], "", None)))
    assert [(c.index, c.token_ids, c.finish_reason) for c in chunks] == [(0, [1], "stop"), (1, [2], None)]
    assert not s.finished
    assert [(c.index, c.finish_reason) for c in s.abort_chunks()] == [(1, "abort")]
    assert s.finished
