"""No Triton kernel compiles after engine start-up, whatever the steps served.

A mixed step (prefill chunks beside decodes) runs eagerly, and any launch
parameter that followed the step's batch size, token count or split count made
Triton compile a new variant on the engine thread in the middle of serving
(0.2-2 s stalls; engine/attention/triton_ops.py). The engine warms every
variant up at start-up (``ModelRunner.warm_up``); these tests then serve mixed
steps of every batch size 1..max_num_seqs, chunked prefills and decode-only
steps, and expect no new variant:

- GPU (marker ``gpu``): the engine on CUDA; variants are the entries of each
  kernel's compile cache (tests/helpers/triton_variants.py).
- CPU: the model runner with the Triton attention backend and fused ops under
  the Triton interpreter; variants are the cache keys ``JITFunction.run`` would
  compute for each launch (same binder, same specialization rules).
"""

from __future__ import annotations

import random
import sys

import pytest
import torch

from engine.outputs import ScheduledRequest, SchedulerOutput
from tests.helpers.gpu import needs_triton, run_under_interpreter
from tests.helpers.triton_variants import compiled_variants, new_variants

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _serve_every_batch_size(engine, max_num_seqs: int, budget: int, vocab: int, seed: int = 0) -> int:
    """Steps of every shape after start-up; returns how many steps ran.

    1. One short request per step (its prompt fits beside the decodes): mixed steps
       of B = 1..max_num_seqs, one prefill beside B - 1 decodes.
    2. Long prompts (one of them twice: a prefix hit) queue behind the full batch and
       are prefilled in chunks beside the decodes as requests finish.
    3. Drain: decode-only steps while the batch shrinks to 1.
    """
    from engine import SamplingParams

    rng = random.Random(seed)

    def add(rid: str, prompt_len: int, max_tokens: int) -> list[int]:
        prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return prompt

    steps = 0
    for i in range(max_num_seqs):            # none finishes before the last arrives
        add(f"short{i}", rng.randint(2, budget - max_num_seqs), max_num_seqs + rng.randint(0, 40))
        engine.step()
        steps += 1
    longs = [add(f"long{i}", rng.randint(100, 250), rng.randint(1, 30)) for i in range(12)]
    engine.add_request("long-again", longs[0], SamplingParams(max_tokens=5, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return steps


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("eager", [False, True], ids=["cuda-graphs", "eager"])
def test_no_triton_compile_after_engine_start(tiny_llama, eager):
    from engine import EngineConfig, LLMEngine

    max_num_seqs, budget = 128, 192
    engine = LLMEngine(EngineConfig(model=str(tiny_llama), device="cuda", dtype="bfloat16", block_size=16,
                                    num_kv_blocks=4096, max_num_seqs=max_num_seqs,
                                    max_num_batched_tokens=budget, enforce_eager=eager))
    before = compiled_variants()
    for name in ("_store_kv_kernel", "_decode_kernel", "_decode_merge_kernel", "_prefill_kernel"):
        assert before[name], f"{name}: no compiled variant after start-up (is the counter blind?)"
    steps = _serve_every_batch_size(engine, max_num_seqs, budget, vocab=256)
    assert steps > 2 * max_num_seqs
    grown = new_variants(before, compiled_variants())
    assert not grown, f"kernels compiled after start-up: {grown}"


# ------------------------------------------------------------------------ CPU (interpreter)

def _runner_main(model_dir: str) -> None:
    """The model runner with Triton attention and fused ops under the interpreter:
    warm up, then mixed / prefill / decode-only steps of B = 1..18 (run with
    TRITON_INTERPRET=1)."""
    from engine import fused_ops
    from engine.attention.triton_backend import TritonAttention
    from engine.kv_cache import KVCache, KVCacheSpec
    from engine.model_runner import ModelRunner
    from engine.models import layers, llama
    from engine.models.loader import load_model
    from tests.engine.attention.test_triton_kernels import _patch_interpreter_index
    from tests.helpers.triton_variants import record_launch_keys

    _patch_interpreter_index()
    keys = record_launch_keys()
    # the fused ops run where the layers would on a GPU
    layers.RMSNorm.forward = lambda self, x, residual=None: (
        fused_ops.rmsnorm(x, self.weight, self.eps) if residual is None
        else fused_ops.add_rmsnorm(x, residual, self.weight, self.eps))
    llama.silu_and_mul = fused_ops.silu_and_mul
    llama.apply_rotary = fused_ops.rope_

    dev = torch.device("cpu")
    loaded = load_model(model_dir, torch.float32, dev)
    bs, num_blocks, max_len = 16, 64, 512
    kv = KVCache(KVCacheSpec.for_model(loaded.config, 1, bs, torch.float32), num_blocks, dev)
    runner = ModelRunner(loaded.model, kv, TritonAttention(), dev, max_len)
    runner.warm_up()
    before = {name: set(k) for name, k in keys.items()}

    rng = random.Random(0)

    def request(i: int, query_len: int, context: int) -> ScheduledRequest:
        nblocks = -(-context // bs)
        first = rng.randrange(num_blocks - nblocks + 1)
        return ScheduledRequest(f"r{i}", [rng.randrange(3, 200) for _ in range(query_len)],
                                context - query_len, list(range(first, first + nblocks)), True)

    # B = 1..18 crosses the old classes (next_pow2(B) up to 32, B % 4 for the staging
    # buffer's offsets); each kind of step meets every B % 4
    for B in range(1, 19):
        kind = ("decode", "mixed", "prefill")[B % 3]
        reqs = []
        for i in range(B):
            # decode contexts from 1 token (one split) to 150 (several); chunks of 2..33 tokens
            if kind == "decode" or (kind == "mixed" and i > 0):
                reqs.append(request(i, 1, rng.choice([1, 16, 40, 150])))
            else:
                q = rng.choice([2, 3, 17, 33])
                reqs.append(request(i, q, q + rng.choice([0, 5, 16, 60])))
        rows = list(range(sum(len(r.token_ids) for r in reqs)))
        runner.run(SchedulerOutput(reqs), rows[-1:])
    grown = new_variants(before, keys)
    print("launch keys", {name: len(k) for name, k in keys.items()})
    print("new variants", grown if grown else "none")


@needs_triton
def test_launch_keys_do_not_follow_the_step_under_interpreter(tmp_path):
    from tests.helpers.tiny_models import make_tiny_model
    model = make_tiny_model(tmp_path, "llama", num_kv_heads=2, num_hidden_layers=1)   # one layer: faster
    out = run_under_interpreter(__file__, timeout=300, args=[str(model)])
    assert "new variants none" in out, out


if __name__ == "__main__":
    _runner_main(sys.argv[1])
