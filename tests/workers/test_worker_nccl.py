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
