"""KVHandle: what a prefill worker returns and a decode worker pulls with.

Torch-free (the router passes handles from one worker to the other).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvtransfer.layout import KVLayout


@dataclass
class KVHandle:
    request_id: str
    source_worker: str
    source_address: str          # host:port of the holder's gRPC server
    block_ids: list[int]         # the holder's block ids; block i covers tokens [i*bs, (i+1)*bs)
    num_tokens: int              # prompt tokens covered (the last block may be partial)
    first_token: int
    layout: KVLayout
    transport: str = "grpc"
    # Extensions beyond docs/contracts.md (defaults keep the contract's constructor):
    prompt_token_ids: list[int] = field(default_factory=list)   # the decode side needs the prompt
    first_logprob: float | None = None
    transport_address: str = ""  # where ``transport`` meets the holder when not source_address
                                 # (nccl: host:port of the holder's rendezvous TCPStore)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)
