"""benchmarks/local_cluster.py: a Ray-free cluster of worker processes + the router, served
token ids by benchmarks/serve.py (the issue #5 two-GPU benchmark, on the CPU)."""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import serve
from benchmarks.local_cluster import IdTokenizer, free_port, parse_topology

ROOT = Path(__file__).resolve().parents[2]


def test_topologies():
    assert [(w.worker_id, w.role, w.gpu) for w in parse_topology("1p1d", [0, 1])] == [
        ("prefill0", "prefill", 0), ("decode0", "decode", 1)]
    assert [(w.worker_id, w.gpu) for w in parse_topology("2x-colocated", None)] == [
        ("colocated0", None), ("colocated1", None)]
    assert [w.role for w in parse_topology("2p1d", None)] == ["prefill", "prefill", "decode"]
    for bad in ("1p0d", "2x", "colocated"):
        with pytest.raises(ValueError):
            parse_topology(bad, None)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        parse_topology("1p1d", [0])


def test_id_tokenizer_streams_every_token_as_text():
    from engine.tokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(IdTokenizer(128256), [5, 6, 7])
    assert [detok.step([t]) for t in (128000, 3, 49999)] == [" 128000", " 3", " 49999"]


@pytest.fixture
def cluster_1p1d(tmp_path):
    port = free_port()
    ready = tmp_path / "ready.json"
    with open(tmp_path / "cluster.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.local_cluster", "--topology", "1p1d", "--device", "cpu",
             "--model", "dummy:llama-tiny", "--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "64",
             "--cpu-threads", "1", "--http-port", str(port), "--ready-file", str(ready), "--log-dir", str(tmp_path)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.is_file():
            assert proc.poll() is None, (tmp_path / "cluster.log").read_text()
            assert time.monotonic() < deadline, "cluster not ready"
            time.sleep(0.2)
        yield proc, json.loads(ready.read_text())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_1p1d_serves_token_id_prompts_and_stops_its_workers(cluster_1p1d):
    proc, info = cluster_1p1d
    base = info["base_url"]
    args = serve.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--base-url", base, "--dataset", "random-ids", "--random-ids-vocab", "49152", "--num-prompts", "6",
         "--random-input-len", "40", "--random-output-len", "6", "--request-rate", "inf", "--ignore-eos",
         "--goodput-ttft-ms", "60000", "--save-detailed", "--no-save"])
    serve.validate(args)
    before = serve.scrape_phases(base)
    report = asyncio.run(serve.run(args))
    phases = serve.phase_summary(before, serve.scrape_phases(base))
    assert report["completed"] == 6 and report["failed"] == 0, report["errors"]
    assert report["model"] == "dummy:llama-tiny"
    assert report["total_input_tokens"] == 240 and report["total_output_tokens"] == 36
    assert [r["output_tokens"] for r in report["requests"]] == [6] * 6
    assert report["goodput"] == report["request_throughput"]
    # every request was disaggregated: prefilled on prefill0, its KV pulled by decode0
    assert phases["kv_transfer"]["count"] == 6 and "local_first_token" not in phases

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    for w in info["workers"]:
        with pytest.raises(ProcessLookupError):
            os.kill(w["pid"], 0)
