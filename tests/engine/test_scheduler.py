"""Scheduler stories: budgets, chunked prefill, prefix hits, preemption, holds.

The runner's part is played by RunnerOutput values (the contract), so these
tests exercise scheduling alone."""


from hypothesis import given, settings, strategies as st

from engine.block_manager import BlockManager
from engine.outputs import RunnerOutput, SampledToken
from engine.request import Request, RequestStatus, SamplingParams
from engine.scheduler import Scheduler


def make_sched(num_blocks=16, bs=4, max_seqs=4, budget=16, max_len=64, hold=False):
    return Scheduler(BlockManager(num_blocks, bs), max_seqs, budget, max_len, hold_after_prefill=hold)


def req(rid, n_prompt, max_tokens=4, first=0):
    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_step(s, token=7):
    out = s.schedule()
    sampled = {r.request_id: SampledToken(token) for r in out.requests if r.sample}
    s.update(out, RunnerOutput(sampled))
    return out


def test_long_prompt_is_chunked_under_the_token_budget():
    s = make_sched(budget=8)
    a = req("a", 20)
    s.add(a)
    chunks = [[(r.request_id, r.start_pos, len(r.token_ids), r.sample) for r in run_step(s).requests]
              for _ in range(3)]
    assert chunks == [[("a", 0, 8, False)], [("a", 8, 8, False)], [("a", 16, 4, True)]]
    assert a.num_computed_tokens == 20 and a.output_token_ids == [7]
    assert a.block_ids == [0, 1, 2, 3, 4]


def test_running_requests_go_first_then_waiting_ones_fill_the_budget():
    s = make_sched(budget=10)
    a, b = req("a", 6), req("b", 12)
    s.add(a); s.add(b)
    first = run_step(s)
    assert [(r.request_id, len(r.token_ids)) for r in first.requests] == [("a", 6), ("b", 4)]
    second = run_step(s)
    # a decodes one token first, b continues its prefill with the rest of the budget
    assert [(r.request_id, r.start_pos, len(r.token_ids)) for r in second.requests] == [("a", 6, 1), ("b", 4, 8)]


def test_max_num_seqs_caps_the_running_set():
    s = make_sched(max_seqs=2, budget=64)
    for i in range(3):
        s.add(req(f"r{i}", 4, first=10 * i))
    out = run_step(s)
    assert [r.request_id for r in out.requests] == ["r0", "r1"]
    assert [r.request_id for r in s.waiting] == ["r2"]


def test_prefix_hit_skips_cached_blocks_and_counts_them():
    s = make_sched(budget=64)
    a = req("a", 10, max_tokens=1)
    s.add(a)
    run_step(s)                                 # a finishes; blocks 0,1 stay cached
    assert a.status == RequestStatus.FINISHED_LENGTH
    b = req("b", 11, max_tokens=1)              # same first 8 tokens
    s.add(b)
    out = run_step(s)
    assert out.requests[0].start_pos == 8 and len(out.requests[0].token_ids) == 3
    assert b.num_cached_tokens == 8
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (21, 8)


def test_preemption_frees_the_newest_request_and_recomputes_it_later():
    s = make_sched(num_blocks=4, bs=4, budget=64, max_len=16)
    a, b = req("a", 7, max_tokens=6), req("b", 7, max_tokens=6, first=50)
    s.add(a); s.add(b)
    run_step(s)                                 # a: blocks 0,1; b: blocks 2,3
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    out = run_step(s)                           # both fit position 7 in their 2nd block
    assert [r.request_id for r in out.requests] == ["a", "b"]
    out = run_step(s)                           # a needs a 3rd block: b (newest) is preempted
    assert out.preempted_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert a.block_ids == [0, 1, 3]              # b freed tail first: 3 is the first free block
    while not a.is_finished:
        run_step(s)
    while not b.is_finished:
        run_step(s)
    assert b.output_token_ids == [7] * 6        # recomputed prompt + outputs, then continued
    assert s.block_manager.num_free_blocks == 4


def test_prefill_mode_holds_blocks_until_release():
    s = make_sched(hold=True, budget=64)
    a = req("a", 9, max_tokens=8)
    s.add(a)
    run_step(s)
    assert a.status == RequestStatus.HELD and not s.has_unfinished()
    held = s.held["a"]
    assert held.first_token == 7 and held.block_ids == [0, 1, 2]
    assert s.block_manager.num_free_blocks == 13
    s.finish(a, RequestStatus.FINISHED_STOPPED)
    assert s.block_manager.num_free_blocks == 16 and "a" not in s.held


def test_abort_from_every_state_frees_blocks():
    s = make_sched(budget=8)
    a, b = req("a", 20), req("b", 4)
    s.add(a); s.add(b)
    run_step(s)                                 # a running (partially computed), b waiting
    s.finish(a, RequestStatus.FINISHED_ABORTED)
    s.finish(b, RequestStatus.FINISHED_ABORTED)
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 16


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(1, 40), st.integers(0, 3)),
                min_size=1, max_size=150))
def test_random_add_abort_finish_never_leaks_blocks(ops):
    s = make_sched(num_blocks=12, bs=4, max_seqs=3, budget=16, max_len=48)
    bm = s.block_manager
    live = []
    for i, (op, n, pick) in enumerate(ops):
        if op == "add":
            r = Request(f"r{i}", [(i * 7 + j) % 5 for j in range(n)],     # repetitive → prefix hits
                        SamplingParams(max_tokens=1 + pick, ignore_eos=True))
            s.add(r); live.append(r)
        elif op == "abort" and live:
            s.finish(live[pick % len(live)], RequestStatus.FINISHED_ABORTED)
        else:
            run_step(s, token=i % 5)
        live = [r for r in live if not r.is_finished]
        # invariant: ref counts equal the block-table references of live requests
        refs = [0] * bm.num_blocks
        for r in live:
            for b in r.block_ids:
                refs[b] += 1
        assert refs == bm.ref_counts
        assert bm.num_free_blocks == sum(1 for c in refs if c == 0)
    for _ in range(400):
        if not s.has_unfinished():
            break
        run_step(s)
    assert not s.has_unfinished()
    assert bm.num_free_blocks == bm.num_blocks
