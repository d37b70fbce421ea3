"""benchmarks/serve.py against a fake streaming OpenAI server (real HTTP, real openai client)."""

import json
import socket
import statistics
import threading
import time

import pytest

from benchmarks import serve


def test_arrivals_and_datasets():
    gaps = serve.arrival_gaps(4000, rate=10.0, burstiness=1.0, seed=0)
    assert abs(statistics.mean(gaps) - 0.1) < 0.01
    assert serve.arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    reqs = serve.shared_prefix_dataset(20, groups=2, prefix_len=50, suffix_len=5, output_len=8,
                                       range_ratio=0.0, seed=1)
    by_group = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r.prompt)
    for prompts in by_group.values():
        prefix = prompts[0].split("\n")[0]
        assert all(p.startswith(prefix) and len(prefix.split()) == 52 for p in prompts)
    assert all(r.max_tokens == 8 for r in reqs)


def test_random_ids_dataset():
    reqs = serve.random_ids_dataset(50, input_len=100, output_len=8, range_ratio=0.5, vocab=1000, seed=3)
    assert all(isinstance(r.prompt, list) and 50 <= len(r.prompt) <= 150 for r in reqs)
    assert all(3 <= t < 1000 for r in reqs for t in r.prompt)
    assert len({len(r.prompt) for r in reqs}) > 1
    p = serve.add_arguments(__import__("argparse").ArgumentParser())
    with pytest.raises(ValueError, match="completions"):
        serve.validate(p.parse_args(["--dataset", "random-ids", "--endpoint", "chat"]))


def _fake_app():
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "t"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        import asyncio

        n = body["max_tokens"]

        async def gen():
            for i in range(n):
                await asyncio.sleep(0.002)
                yield "data: " + json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "fake",
                                             "choices": [{"index": 0, "text": f" t{i}", "finish_reason":
                                                          "length" if i == n - 1 else None}]}) + "\n\n"
            yield "data: " + json.dumps({"id": "x", "object": "text_completion", "created": 0, "model": "fake",
                                         "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n,
                                                                  "total_tokens": 7 + n}}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture
def fake_server():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_fake_app(), host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    t.join(5)


def test_run_reports_latencies_and_goodput(fake_server, tmp_path):
    args = serve.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--base-url", fake_server, "--num-prompts", "12", "--random-input-len", "8", "--random-output-len", "5",
         "--request-rate", "200", "--max-concurrency", "4", "--goodput-ttft-ms", "10000",
         "--goodput-tpot-ms", "0.001", "--result-dir", str(tmp_path), "--label", "t", "--save-detailed"])
    serve.validate(args)
    import asyncio

    report = asyncio.run(serve.run(args))
    assert report["completed"] == 12 and report["failed"] == 0 and report["model"] == "fake"
    assert report["total_output_tokens"] == 60 and report["total_input_tokens"] == 84
    assert 0 < report["mean_ttft_ms"] < report["mean_e2el_ms"]
    assert report["p99_itl_ms"] >= report["median_itl_ms"] > 0
    assert report["goodput"] == 0.0             # no request meets a 1 µs TPOT
    assert len(report["requests"]) == 12 and all(r["output_tokens"] == 5 and r["tpot_ms"] > 0.001
                                                 for r in report["requests"])
    # sent on the absolute schedule (never early), in arrival order; the offered rate is measured
    reqs = report["requests"]
    assert [r["index"] for r in reqs] == list(range(12))
    assert all(r["sent_s"] >= r["scheduled_s"] - 1e-3 for r in reqs)
    assert report["send_window_s"] == pytest.approx(max(r["sent_s"] for r in reqs), abs=1e-3)
    assert report["offered_rate"] == pytest.approx(12 / report["send_window_s"])
    assert report["max_send_lag_ms"] >= 0
    path = serve.save_report(report, args.result_dir)
    assert json.loads(path.read_text())["completed"] == 12 and path.name.startswith("serve-t-")
