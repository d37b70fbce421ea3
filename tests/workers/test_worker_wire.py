"""WorkerStats on the wire: the engine's load numbers are WorkerStats fields (it
extends EngineStats), and every field survives the proto round trip — so a new
EngineStats field fails here until protos/worker.proto carries it too."""

from dataclasses import fields

from engine.outputs import EngineStats
from kvtransfer.layout import KVLayout
from workers.types import WorkerStats
from workers.wire import stats_from_pb, stats_to_pb


def test_worker_stats_round_trip_every_field_including_the_engines():
    values = {f.name: i + 1 for i, f in enumerate(fields(WorkerStats)) if f.type in ("int", "float")}
    stats = WorkerStats(worker_id="d0", role="decode", address="127.0.0.1:1", epoch="ab12", **values,
                        layout=KVLayout("float32", block_size=4, num_layers=2, num_kv_heads=2, head_dim=8))
    assert {f.name for f in fields(EngineStats)} <= set(values)
    assert stats_from_pb(stats_to_pb(stats)) == stats
