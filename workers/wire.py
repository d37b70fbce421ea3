"""Conversions between worker dataclasses / SamplingParams and protobuf (torch-free)."""

from __future__ import annotations

from dataclasses import fields

from engine.request import SamplingParams
from kvtransfer.wire import layout_from_pb, layout_to_pb
from protos.gen import worker_pb2 as pb
from workers.types import DecodeChunk, WorkerStats


def params_to_pb(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(n=p.n, max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k,
                            top_p=p.top_p, min_p=p.min_p, stop=p.stop, stop_token_ids=p.stop_token_ids,
                            ignore_eos=p.ignore_eos, skip_special_tokens=p.skip_special_tokens)
    if p.seed is not None:
        msg.seed = p.seed
    if p.logprobs is not None:
        msg.logprobs = p.logprobs
    return msg


def params_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError on bad values (SamplingParams validates)."""
    return SamplingParams(n=msg.n, max_tokens=msg.max_tokens, temperature=msg.temperature,
                          top_k=msg.top_k, top_p=msg.top_p, min_p=msg.min_p,
                          seed=msg.seed if msg.HasField("seed") else None, stop=list(msg.stop),
                          stop_token_ids=list(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
                          logprobs=msg.logprobs if msg.HasField("logprobs") else None,
                          skip_special_tokens=msg.skip_special_tokens)


def chunk_to_pb(c: DecodeChunk) -> pb.GenerateChunk:
    msg = pb.GenerateChunk(index=c.index, token_ids=c.token_ids, text=c.text,
                           finish_reason=c.finish_reason or "", num_cached_tokens=c.num_cached_tokens,
                           kv_transfer_seconds=c.kv_transfer_seconds, kv_transfer_bytes=c.kv_transfer_bytes)
    for entry in c.logprobs or ():
        msg.logprobs.add().logprobs.update(entry)
    return msg


def chunk_from_pb(msg: pb.GenerateChunk) -> DecodeChunk:
    return DecodeChunk(token_ids=list(msg.token_ids), text=msg.text, finish_reason=msg.finish_reason or None,
                       num_cached_tokens=msg.num_cached_tokens, index=msg.index,
                       logprobs=[dict(e.logprobs) for e in msg.logprobs] or None,
                       kv_transfer_seconds=msg.kv_transfer_seconds, kv_transfer_bytes=msg.kv_transfer_bytes)


_STAT_FIELDS = [f.name for f in fields(WorkerStats) if f.name not in ("layout", "extra")]


def stats_to_pb(s: WorkerStats) -> pb.WorkerStats:
    msg = pb.WorkerStats(**{k: getattr(s, k) for k in _STAT_FIELDS})
    if s.layout is not None:
        msg.layout.CopyFrom(layout_to_pb(s.layout))
    return msg


def stats_from_pb(msg: pb.WorkerStats) -> WorkerStats:
    return WorkerStats(**{k: getattr(msg, k) for k in _STAT_FIELDS},
                       layout=layout_from_pb(msg.layout) if msg.HasField("layout") else None)
