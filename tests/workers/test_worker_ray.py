"""The workers as real Ray actors: a disaggregated request across two actor processes."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from engine import EngineConfig, SamplingParams
from workers.client import WorkerClient

ray = pytest.importorskip("ray")
REPO = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def ray_cluster():
    if ray.is_initialized():          # another suite's session Ray (cluster tests) is up: share it
        yield
        return
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")      # short: Ray's socket paths must fit 107 chars
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO, "RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old


async def test_prefill_and_decode_actors_serve_a_disaggregated_request(ray_cluster, tiny_model_dir):
    from workers.actors import DecodeWorker, PrefillWorker

    cfg = EngineConfig(model=str(tiny_model_dir), block_size=4, num_kv_blocks=32, max_num_batched_tokens=64)
    prefill = PrefillWorker.remote(cfg, worker_id="rp0")
    decode = DecodeWorker.remote(cfg, worker_id="rd0")
    p_addr, d_addr = await prefill.start.remote(), await decode.start.remote()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = list(range(7, 20))
    async with WorkerClient(p_addr) as pc, WorkerClient(d_addr) as dc:
        local = [t async for c in dc.generate("ref", prompt, params) for t in c.token_ids]
        handle = await pc.prefill("r", prompt, params)
        assert handle.source_worker == "rp0"
        tokens = [t async for c in dc.decode(handle, params) for t in c.token_ids]
        assert [handle.first_token] + tokens == local
        stats = await dc.stats()
        assert stats.worker_id == "rd0" and stats.role == "decode" and stats.kv_transfers == 1
    assert "baton:num_requests_running" in await decode.metrics_text.remote()
    await prefill.stop.remote()
    await decode.stop.remote()
    ray.kill(prefill)
    ray.kill(decode)
