"""Shapes of real models for ``dummy:<preset>`` (random weights, no download).

Each preset is an HF ``config.json``-style dict (``ModelConfig.from_hf_dict``
parses it; ``hf_overrides`` merge into it). Token ids are SmolLM2's (bos 1,
eos 2) because dummy models are served with SmolLM2's tokenizer; a preset's
vocab may be larger than that tokenizer's (ids past 49151 decode to nothing).

The ``*-tiny`` / ``*-small`` presets are for tests and CPU benchmarks.
"""

from __future__ import annotations

_SMOL_IDS = {"bos_token_id": 1, "eos_token_id": 2}


def _p(model_type: str, vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int,
       theta: float, max_pos: int, eps: float, tie: bool, **extra) -> dict:
    return {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "rope_theta": theta, "max_position_embeddings": max_pos,
            "rms_norm_eps": eps, "tie_word_embeddings": tie, **_SMOL_IDS, **extra}


_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS: dict[str, dict] = {
    # real shapes
    "llama2-7b": _p("llama", 32000, 4096, 11008, 32, 32, 32, 10000.0, 4096, 1e-5, False),
    "llama3-8b": _p("llama", 128256, 4096, 14336, 32, 32, 8, 500000.0, 8192, 1e-5, False),
    "llama3.1-8b": _p("llama", 128256, 4096, 14336, 32, 32, 8, 500000.0, 131072, 1e-5, False,
                      rope_scaling=_LLAMA31_ROPE),
    "llama3.2-1b": _p("llama", 128256, 2048, 8192, 16, 32, 8, 500000.0, 131072, 1e-5, True,
                      head_dim=64, rope_scaling={**_LLAMA31_ROPE, "factor": 32.0}),
    "llama3-70b": _p("llama", 128256, 8192, 28672, 80, 64, 8, 500000.0, 8192, 1e-5, False),
    "mistral-7b": _p("mistral", 32768, 4096, 14336, 32, 32, 8, 1000000.0, 32768, 1e-5, False),
    "qwen2-0.5b": _p("qwen2", 151936, 896, 4864, 24, 14, 2, 1000000.0, 32768, 1e-6, True),
    "qwen2-7b": _p("qwen2", 152064, 3584, 18944, 28, 28, 4, 1000000.0, 32768, 1e-6, False),
    "smollm2-135m": _p("llama", 49152, 576, 1536, 30, 9, 3, 100000.0, 8192, 1e-5, True),
    "smollm2-360m": _p("llama", 49152, 960, 2560, 32, 15, 5, 100000.0, 8192, 1e-5, True),
    # small, for tests and CPU benchmarks (SmolLM2 vocab so every id decodes)
    "llama-tiny": _p("llama", 49152, 64, 128, 2, 4, 2, 10000.0, 2048, 1e-6, False),
    "qwen2-tiny": _p("qwen2", 49152, 64, 128, 2, 4, 2, 10000.0, 2048, 1e-6, True),
    "llama-small": _p("llama", 49152, 512, 1408, 8, 8, 4, 10000.0, 4096, 1e-5, True),
}


def get_preset(name: str, overrides: dict | None = None) -> dict:
    """The preset's HF-style dict with ``overrides`` merged in (a new dict)."""
    if name not in PRESETS:
        raise ValueError(f"unknown dummy preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return {**PRESETS[name], **(overrides or {})}
