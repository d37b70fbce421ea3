"""Workers asked for the nccl transport on CPU: the prefill worker advertises no
NCCL rendezvous, the decode worker pulls over grpc instead and counts the fallback."""

import asyncio

from tests.workers.test_worker_disagg import GREEDY, Reference, collect, config
from workers.client import WorkerClient
from workers.host import WorkerHost


async def test_nccl_without_a_gpu_falls_back_to_grpc_and_says_so(tiny_model_dir):
    prefill = WorkerHost(config(tiny_model_dir), "prefill", worker_id="p-nccl", kv_transport="nccl")
    decode = WorkerHost(config(tiny_model_dir), "decode", worker_id="d-nccl")
    await asyncio.gather(prefill.start(), decode.start())
    pc, dc = WorkerClient(prefill.address), WorkerClient(decode.address)
    try:
        prompt = list(range(10, 31))
        handle = await pc.prefill("r1", prompt, GREEDY)
        assert handle.transport == "nccl" and handle.transport_address == ""   # no GPU: nothing advertised
        assert decode.nccl_endpoint is None
        tokens, _ = await collect(dc.decode(handle, GREEDY))
        [expected] = Reference(tiny_model_dir).generate([prompt], GREEDY)
        assert [handle.first_token] + tokens == expected.token_ids
        assert 'baton:kv_transfer_fallbacks_total{reason="holder_without_nccl",role="decode",worker="d-nccl"} 1.0' \
            in decode.metrics_text()
    finally:
        await asyncio.gather(pc.close(), dc.close())
        await asyncio.gather(prefill.stop(), decode.stop())


async def test_tp2_prefill_worker_feeds_a_tp1_decode_worker(tiny_model_dir):
    """A TP=2 prefill worker (rank 1 in a spawned process) exports its two head
    shards; the TP=1 decode worker merges them (over grpc here: no GPU)."""
    from dataclasses import replace
    prefill = WorkerHost(replace(config(tiny_model_dir), tensor_parallel_size=2), "prefill", worker_id="p-tp2")
    decode = WorkerHost(config(tiny_model_dir), "decode", worker_id="d-tp1")
    await asyncio.gather(prefill.start(), decode.start())
    pc, dc = WorkerClient(prefill.address), WorkerClient(decode.address)
    try:
        assert (prefill.layout.tp_size, prefill.layout.num_kv_heads, decode.layout.num_kv_heads) == (2, 1, 2)
        prompt = list(range(40, 67))
        handle = await pc.prefill("r-tp", prompt, GREEDY)
        tokens, _ = await collect(dc.decode(handle, GREEDY))
        [expected] = Reference(tiny_model_dir).generate([prompt], GREEDY)
        assert [handle.first_token] + tokens == expected.token_ids
    finally:
        await asyncio.gather(pc.close(), dc.close())
        await asyncio.gather(prefill.stop(), decode.stop())
