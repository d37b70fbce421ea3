"""Many pulls from one holder at once (the CPU and the GPU nccl tests share it):
they go out in batches, a failing pull fails alone, every other pull gets exactly
its own blocks, and the pair stays in step for the next pull."""

import torch

from kvtransfer import KVHandle, KVLayout
from kvtransfer.base import TransferState
from kvtransfer.nccl import NcclKVReceiver
from tests.kvtransfer.nccl_holder_proc import HELD_BLOCKS


async def check_concurrent_pulls(endpoint, address: str, full, **receiver_options) -> None:
    layout = KVLayout.from_spec(full.spec)

    def handle(request_id="r1"):
        return KVHandle(request_id, "holder", "127.0.0.1:1", list(HELD_BLOCKS), 15, 42, layout,
                        transport="nccl", transport_address=address)

    # different sizes (start blocks) and a pull of a request the holder does not hold, queued at once
    plan = [(handle(), i % len(HELD_BLOCKS)) for i in range(11)]
    plan.insert(5, (handle("nobody"), 0))
    receivers = [NcclKVReceiver(layout, nccl_endpoint=endpoint, **receiver_options) for _ in plan]
    for rx, (h, start) in zip(receivers, plan):
        rx.start(h, start)
    states = [await rx.wait(timeout=60) for rx in receivers]
    for rx, state, (h, start) in zip(receivers, states, plan):
        if h.request_id == "nobody":
            assert state is TransferState.FAILED and "no KV held" in rx.error
            continue
        assert state is TransferState.DONE, rx.error
        assert rx.stats.transport == "nccl"
        expected = full.export_blocks(HELD_BLOCKS[start:])
        assert torch.equal(rx.result().view(torch.uint8), expected.view(torch.uint8))
    assert max(rx.wire_phases["batch"] for rx in receivers if rx.wire_phases) > 1   # they went out together
    assert len(endpoint.pairs) == 1
    rx = NcclKVReceiver(layout, nccl_endpoint=endpoint, **receiver_options)
    rx.start(handle(), 0)
    assert await rx.wait(timeout=60) is TransferState.DONE, rx.error
    assert torch.equal(rx.result(), full.export_blocks(HELD_BLOCKS))
