"""`baton generate`: one in-process engine, no cluster — load, stream the text to
stdout, then a one-line timing summary (TTFT, decode tok/s, load time) on stderr."""

from __future__ import annotations

import sys
import time


def run(args) -> int:
    from engine import EngineConfig, LLMEngine, SamplingParams

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    t_load = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    num_kv_blocks=args.num_kv_blocks, seed=args.seed or 0))
    load_s = time.perf_counter() - t_load
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt_ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if isinstance(prompt_ids, str):
            prompt_ids = engine.tokenizer.encode(prompt_ids)
    else:
        prompt_ids = engine.tokenizer.encode(prompt)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    t0 = time.perf_counter()
    engine.add_request("generate-0", list(prompt_ids), params)
    first = None
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.new_text:
                if first is None:
                    first = time.perf_counter() - t0
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
            if out.finished:
                final = out
    elapsed = time.perf_counter() - t0
    sys.stdout.write("\n")
    n = len(final.token_ids) if final else 0
    decode_s = elapsed - (first or 0.0)
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    print(f"[{len(prompt_ids)} prompt + {n} generated tokens in {elapsed:.2f}s, "
          f"TTFT {1000 * (first or elapsed):.0f} ms, {tps:.1f} tok/s decode, "
          f"finish={final.finish_reason if final else '?'}, load {load_s:.1f}s]", file=sys.stderr)
    return 0
