"""Routing policy stories: who prefills, who decodes, and when to skip the prefill pool."""

import pytest

from router.policy import NoCandidate, PolicyConfig, RoutingRequest, WorkerState, route

CFG = PolicyConfig(local_prefill_threshold=64, decode_affinity_slack=2)


def prefill(wid, **kw):
    return WorkerState(wid, "prefill", **kw)


def decode(wid, **kw):
    return WorkerState(wid, "decode", **kw)


def test_a_long_new_prompt_goes_to_the_prefill_pool():
    # 512 tokens, nothing cached anywhere: far over the 64-token threshold.
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    d = route(req, [prefill("p0"), prefill("p1"), decode("d0")], CFG)
    assert d.mode == "remote" and d.disaggregated
    assert (d.prefill_worker_id, d.decode_worker_id) == ("p0", "d0")
    assert d.uncached_tokens == 512
    assert d.code == "long_uncached_prompt"
    assert d.fallback_prefill_ids == ("p1",)          # the retry order if p0 fails
    assert "512 uncached tokens > threshold 64" in d.reason


def test_a_short_prompt_is_prefilled_on_the_decode_worker():
    req = RoutingRequest(num_prompt_tokens=40, block_size=16)
    d = route(req, [prefill("p0"), decode("d0")], CFG)
    assert (d.mode, d.prefill_worker_id, d.decode_worker_id) == ("local", None, "d0")
    assert d.code == "short_uncached_prompt"


def test_a_long_prompt_mostly_cached_on_the_decode_worker_stays_local():
    # 300 tokens, of which the decode worker holds 16 blocks = 256: only 44 are new.
    req = RoutingRequest(num_prompt_tokens=300, block_size=16)
    d = route(req, [prefill("p0"), decode("d0", cached_blocks=16)], CFG)
    assert d.mode == "local" and d.uncached_tokens == 44


def test_a_fully_cached_prompt_still_computes_its_last_token():
    req = RoutingRequest(num_prompt_tokens=32, block_size=16)
    d = route(req, [decode("d0", cached_blocks=2)], PolicyConfig(local_prefill_threshold=0))
    assert d.uncached_tokens == 1


def test_the_prefill_worker_holding_the_prefix_wins_over_an_idle_one():
    # p1 holds 30 of the 40 blocks (480 tokens) but has 100 tokens pending: 160+100 < 640.
    req = RoutingRequest(num_prompt_tokens=640, block_size=16)
    workers = [prefill("p0"), prefill("p1", cached_blocks=30, pending_prefill_tokens=100), decode("d0")]
    d = route(req, workers, CFG)
    assert d.prefill_worker_id == "p1"
    assert d.uncached_tokens == 160


def test_but_not_when_its_queue_costs_more_than_the_prefix_saves():
    req = RoutingRequest(num_prompt_tokens=640, block_size=16)
    workers = [prefill("p0"), prefill("p1", cached_blocks=30, pending_prefill_tokens=1000), decode("d0")]
    d = route(req, workers, CFG)
    assert d.prefill_worker_id == "p0"
    assert d.fallback_prefill_ids == ("p1",)


def test_draining_and_unhealthy_workers_are_never_chosen():
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    workers = [prefill("p0", draining=True), prefill("p1", healthy=False), prefill("p2"),
               decode("d0", draining=True), decode("d1")]
    d = route(req, workers, CFG)
    assert (d.prefill_worker_id, d.decode_worker_id) == ("p2", "d1")
    assert d.fallback_prefill_ids == ()


def test_no_prefill_worker_left_means_local_prefill():
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    d = route(req, [prefill("p0", healthy=False), decode("d0")], CFG)
    assert (d.mode, d.code) == ("local", "no_prefill_worker")
    # ... and the same when the only prefill workers already failed this request:
    d = route(req, [prefill("p0"), decode("d0")], CFG, exclude_prefill=frozenset({"p0"}))
    assert (d.mode, d.code) == ("local", "no_prefill_worker")
    assert "all prefill workers failed" in d.reason


def test_no_decode_worker_is_an_error():
    req = RoutingRequest(num_prompt_tokens=8, block_size=16)
    with pytest.raises(NoCandidate):
        route(req, [prefill("p0"), decode("d0", draining=True)], CFG)


def test_the_least_loaded_decode_worker_is_chosen():
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    workers = [prefill("p0"), decode("d0", num_running=9, num_waiting=1), decode("d1", num_running=3)]
    assert route(req, workers, CFG).decode_worker_id == "d1"


def test_the_routers_own_inflight_count_covers_stale_stats():
    # d1's stats (refreshed a second ago) say idle, but this router just sent it 5 requests.
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    workers = [prefill("p0"), decode("d0", num_running=2), decode("d1", num_inflight=5)]
    assert route(req, workers, CFG).decode_worker_id == "d0"


def test_prefix_affinity_beats_load_within_the_slack():
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    near = [prefill("p0"), decode("d0", num_running=1), decode("d1", num_running=3, cached_blocks=20)]
    d = route(req, near, CFG)
    assert d.decode_worker_id == "d1" and "holds 20 prompt blocks" in d.reason
    far = [prefill("p0"), decode("d0", num_running=1), decode("d1", num_running=4, cached_blocks=20)]
    assert route(req, far, CFG).decode_worker_id == "d0"


def test_a_decode_worker_without_room_for_the_prompt_is_skipped():
    # 512 tokens need 33 blocks (32 + one for the output); d0 has 10 free.
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    workers = [prefill("p0"), decode("d0", num_free_blocks=10), decode("d1", num_running=5, num_free_blocks=100)]
    assert route(req, workers, CFG).decode_worker_id == "d1"
    # When nobody has room, the least loaded gets it anyway (its engine queues it).
    workers = [prefill("p0"), decode("d0", num_free_blocks=10), decode("d1", num_running=5, num_free_blocks=20)]
    d = route(req, workers, CFG)
    assert d.decode_worker_id == "d0" and "none has 33 free blocks" in d.reason


def test_colocated_workers_alone_serve_everything_locally():
    req = RoutingRequest(num_prompt_tokens=4096, block_size=16)
    d = route(req, [WorkerState("c0", "colocated", num_running=2), WorkerState("c1", "colocated")], CFG)
    assert (d.mode, d.decode_worker_id, d.code) == ("local", "c1", "colocated")


def test_ties_break_by_worker_id_so_decisions_are_reproducible():
    req = RoutingRequest(num_prompt_tokens=512, block_size=16)
    workers = [prefill("p1"), prefill("p0"), decode("d1"), decode("d0")]
    d = route(req, workers, CFG)
    assert (d.prefill_worker_id, d.decode_worker_id) == ("p0", "d0")


def test_threshold_zero_always_disaggregates_when_it_can():
    req = RoutingRequest(num_prompt_tokens=2, block_size=16)
    d = route(req, [prefill("p0"), decode("d0")], PolicyConfig(local_prefill_threshold=0))
    assert d.mode == "remote"
