"""Offline throughput: Baton's engine vs transformers ``generate`` on the same
weights, prompts and output lengths, in one run.

  python -m benchmarks.offline_throughput                      # CPU, SmolLM2, 1/16/64 requests
  python -m benchmarks.offline_throughput --device cuda --model dummy:llama3-8b \
      --dtype bfloat16 --prompt-len 512 --output-len 128 --batches 1 16 64

On GPU each batch runs once untimed first, for both sides (Triton compiles a
kernel specialization and CUDA graphs are captured on first use; transformers
warms up cuBLAS), then once timed. Every request generates exactly its output
length (EOS ignored on both sides): ``--output-len`` tokens, or with
``--mixed-output`` a length uniform in [output_len/4, output_len]. transformers
runs each batch as one padded ``generate`` call (left padding), which lasts
until its longest request is done; ours gets all requests at once and
schedules them itself. Throughput counts the requested tokens on both sides.
Prompt lengths are mixed (uniform in [prompt_len/2, prompt_len]) unless
``--fixed`` is given.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from benchmarks.common import environment, write_result


def make_prompts(n, prompt_len, vocab, fixed, seed=0):
    rng = random.Random(seed)
    lens = [prompt_len if fixed else rng.randint(prompt_len // 2, prompt_len) for _ in range(n)]
    return [[rng.randrange(100, vocab) for _ in range(L)] for L in lens]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ours(engine, prompts, output_lens):
    from engine import SamplingParams
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
    sync(engine.config.device)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync(engine.config.device)
    dt = time.perf_counter() - t0
    assert [len(o.token_ids) for o in outs] == list(output_lens)
    return dt


def run_hf(model, prompts, output_len, device):
    """One static batch: it runs until its longest request is done."""
    pad = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                             do_sample=False, pad_token_id=pad, eos_token_id=None)
    sync(device)
    dt = time.perf_counter() - t0
    assert out.shape[1] - width == output_len
    return dt


def hf_state_dict(model, mc) -> dict:
    """Our (fused) parameters under HF's names: qkv_proj → q/k/v, gate_up_proj → gate/up."""
    q = mc.num_attention_heads * mc.head_dim
    kv = mc.num_key_value_heads * mc.head_dim
    out = {}
    for name, t in model.state_dict().items():
        if ".qkv_proj." in name:
            for part, piece in zip(("q_proj", "k_proj", "v_proj"), t.split([q, kv, kv], dim=0)):
                out[name.replace("qkv_proj", part)] = piece
        elif ".gate_up_proj." in name:
            gate, up = t.chunk(2, dim=0)
            out[name.replace("gate_up_proj", "gate_proj")] = gate
            out[name.replace("gate_up_proj", "up_proj")] = up
        else:
            out[name] = t
    if mc.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_model_like(engine, device, dtype):
    """A transformers model with the engine's exact weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config
    mc = engine.model_config
    cls = Qwen2Config if mc.architecture == "qwen2" else LlamaConfig
    cfg = cls(vocab_size=mc.vocab_size, hidden_size=mc.hidden_size, intermediate_size=mc.intermediate_size,
              num_hidden_layers=mc.num_hidden_layers, num_attention_heads=mc.num_attention_heads,
              num_key_value_heads=mc.num_key_value_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
              rope_theta=mc.rope_theta, rope_scaling=mc.rope_scaling,
              max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_word_embeddings)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    state = hf_state_dict(engine.model, mc)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "rotary" not in m and not (m == "lm_head.weight" and mc.tie_word_embeddings)]
    if mc.tie_word_embeddings:
        model.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"weight mismatch: missing={missing[:4]} unexpected={unexpected[:4]}")
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--fixed", action="store_true", help="all prompts exactly --prompt-len tokens")
    ap.add_argument("--mixed-output", action="store_true",
                    help="per-request output lengths uniform in [output_len/4, output_len]; transformers' "
                         "static batch runs to the longest, useful tokens are counted on both sides")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.45,
                    help="our engine's share of the GPU (the transformers twin needs the rest)")
    ap.add_argument("--out", default=None, help="result name under benchmarks/results/")
    args = ap.parse_args(argv)

    from engine import EngineConfig, LLMEngine
    dtype = getattr(torch, args.dtype)
    max_batch = max(args.batches)
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    max_num_seqs=max(max_batch, 1), max_num_batched_tokens=4096,
                                    enable_prefix_caching=False,
                                    gpu_memory_utilization=args.gpu_memory_utilization))
    hf = None if args.skip_hf else hf_model_like(engine, args.device, dtype)
    vocab = min(engine.model_config.vocab_size, 49152)
    rows = []
    run_ours(engine, make_prompts(2, 16, vocab, True, seed=99), [4, 4])      # warm-up
    if hf is not None:
        run_hf(hf, make_prompts(2, 16, vocab, True, seed=99), 4, args.device)
    for b in args.batches:
        prompts = make_prompts(b, args.prompt_len, vocab, args.fixed, seed=b)
        rng = random.Random(1000 + b)
        out_lens = ([rng.randint(max(1, args.output_len // 4), args.output_len) for _ in range(b)]
                    if args.mixed_output else [args.output_len] * b)
        out_tokens = sum(out_lens)
        if args.device.startswith("cuda"):      # compile Triton specializations, capture graphs
            run_ours(engine, prompts, out_lens)
        t_ours = run_ours(engine, prompts, out_lens)
        row = {"batch": b, "output_tokens": out_tokens, "ours_s": round(t_ours, 3),
               "ours_tok_s": round(out_tokens / t_ours, 1)}
        if hf is not None:
            if args.device.startswith("cuda"):
                run_hf(hf, prompts, min(args.output_len, 8), args.device)
            t_hf = run_hf(hf, prompts, max(out_lens), args.device)
            row.update(hf_s=round(t_hf, 3), hf_tok_s=round(out_tokens / t_hf, 1), speedup=round(t_hf / t_ours, 2))
        rows.append(row)
        print(row, flush=True)
    name = args.out or f"offline_throughput_{args.device.split(':')[0]}_{args.model.replace(':', '-')}"
    path = write_result(name, {"benchmark": "offline_throughput", "env": environment(args.device),
                               "model": args.model, "dtype": args.dtype, "prompt_len": args.prompt_len,
                               "output_len": args.output_len, "mixed_prompt_lengths": not args.fixed,
                               "mixed_output_lengths": args.mixed_output, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
