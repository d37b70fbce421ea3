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
    with pytest.raises(KVLayoutError, match="tensor-parallel"):      # shards don't add up to 4 heads
        a.check_compatible(KVLayout("float32", 16, 2, 1, 64, tp_size=2))
    with pytest.raises(KVLayoutError, match="tensor-parallel"):      # TP=1 into TP=2: not defined
        KVLayout("float32", 16, 2, 2, 64, tp_size=2).check_compatible(a)
    with pytest.raises(KVLayoutError, match="num_kv_heads 4 != 2"):
        a.check_compatible(KVLayout("float32", 16, 2, 2, 64))
    assert issubclass(KVLayoutError, ValueError)


def test_tp_holder_shards_merge_into_a_tp1_cache():
    full = KVLayout("bfloat16", 16, 2, 4, 64)
    tp2 = KVLayout("bfloat16", 16, 2, 2, 64, tp_rank=0, tp_size=2)
    full.check_compatible(tp2)
    assert full.merges_shards_of(tp2) and not tp2.merges_shards_of(full)
    assert tp2.wire_shape(3) == (2, 2, 2, 3, 16, 2, 64) and full.wire_shape(3) == full.export_shape(3)
    # rank r's shard holds heads [2r, 2r+2): the merge puts them side by side
    from kvtransfer.relayout import to_local
    heads = torch.arange(4.0).view(1, 1, 1, 1, 4, 1).expand(2, 2, 3, 16, 4, 64)
    shards = torch.stack([heads[..., 0:2, :], heads[..., 2:4, :]])
    assert torch.equal(to_local(shards, tp2, 3), heads)
    with pytest.raises(KVLayoutError, match="wire shape"):
        to_local(heads, tp2, 3)


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
