"""Conversions between kvtransfer dataclasses and their protobuf messages, and the
gRPC channel options every worker/KV channel and server uses (torch-free)."""

from __future__ import annotations

from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout
from protos.gen import kv_transfer_pb2 as pb

GRPC_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def layout_to_pb(layout: KVLayout) -> pb.KVLayout:
    return pb.KVLayout(dtype=layout.dtype, block_size=layout.block_size, num_layers=layout.num_layers,
                       num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                       tp_rank=layout.tp_rank, tp_size=layout.tp_size)


def layout_from_pb(msg: pb.KVLayout) -> KVLayout:
    """Raises KVLayoutError (a ValueError) on a malformed layout."""
    return KVLayout(dtype=msg.dtype, block_size=msg.block_size, num_layers=msg.num_layers,
                    num_kv_heads=msg.num_kv_heads, head_dim=msg.head_dim,
                    tp_rank=msg.tp_rank, tp_size=msg.tp_size)


def handle_to_pb(h: KVHandle) -> pb.KVHandle:
    msg = pb.KVHandle(request_id=h.request_id, source_worker=h.source_worker,
                      source_address=h.source_address, block_ids=h.block_ids,
                      num_tokens=h.num_tokens, first_token=h.first_token,
                      layout=layout_to_pb(h.layout), transport=h.transport,
                      prompt_token_ids=h.prompt_token_ids, transport_address=h.transport_address)
    if h.first_logprob is not None:
        msg.first_logprob = h.first_logprob
    return msg


def handle_from_pb(msg: pb.KVHandle) -> KVHandle:
    if not msg.HasField("layout"):
        raise ValueError("KV handle has no layout")
    return KVHandle(request_id=msg.request_id, source_worker=msg.source_worker,
                    source_address=msg.source_address, block_ids=list(msg.block_ids),
                    num_tokens=msg.num_tokens, first_token=msg.first_token,
                    layout=layout_from_pb(msg.layout), transport=msg.transport or "grpc",
                    prompt_token_ids=list(msg.prompt_token_ids),
                    first_logprob=msg.first_logprob if msg.HasField("first_logprob") else None,
                    transport_address=msg.transport_address)
