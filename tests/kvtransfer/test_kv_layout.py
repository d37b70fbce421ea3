"""KVLayout compatibility and KVHandle ↔ protobuf round trips."""

import pytest
import torch

from engine.kv_cache import KVCacheSpec
from kvtransfer import KVHandle, KVLayout, KVLayoutError
from kvtransfer.wire import handle_from_pb, handle_to_pb


def test_layout_from_spec_matches_export_shape():
    spec = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)
    layout = KVLayout.from_spec(spec)
    assert layout == KVLayout("bfloat16", 4, 3, 2, 8)
    assert layout.bytes_per_block == spec.bytes_per_block
    assert layout.export_shape(5) == (3, 2, 5, 4, 2, 8)


def test_compatible_layouts_pass_and_mismatches_are_named():
    a = KVLayout("float32", 16, 2, 4, 64)
    a.check_compatible(KVLayout("float32", 16, 2, 4, 64))
    with pytest.raises(KVLayoutError, match=r"block_size 16 != 32.*head_dim 64 != 128"):
        a.check_compatible(KVLayout("float32", 32, 2, 4, 128))
    with pytest.raises(KVLayoutError, match="dtype 'float32' != 'bfloat16'"):
        a.check_compatible(KVLayout("bfloat16", 16, 2, 4, 64))
    with pytest.raises(KVLayoutError, match="tensor-parallel"):
        a.check_compatible(KVLayout("float32", 16, 2, 2, 64, tp_rank=1, tp_size=2))
    assert issubclass(KVLayoutError, ValueError)


def test_malformed_layout_is_refused():
    with pytest.raises(KVLayoutError, match="dtype"):
        KVLayout("int8", 16, 2, 4, 64)
    with pytest.raises(KVLayoutError, match="tp_rank"):
        KVLayout("float32", 16, 2, 4, 64, tp_rank=2, tp_size=2)


def test_handle_round_trips_through_protobuf():
    h = KVHandle("r1", "w0", "127.0.0.1:5000", [7, 3, 9], 40, 123, KVLayout("float16", 16, 2, 4, 64),
                 prompt_token_ids=list(range(40)), first_logprob=-0.5)
    assert handle_from_pb(handle_to_pb(h)) == h
    h.first_logprob = None
    assert handle_from_pb(handle_to_pb(h)) == h
