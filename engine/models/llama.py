"""The Llama family: Llama 2/3 (incl. llama3 rope scaling), Mistral, Qwen2, SmolLM2.

All four are the same decoder — RMSNorm, GQA attention with RoPE, SiLU-gated
MLP — differing only in config: Qwen2 has a q/k/v bias, SmolLM2 and small
Qwen2 tie the LM head to the embedding.

Forward contract: ``forward(input_ids [T], positions [T]) -> hidden [T, hidden]``
over the flattened batch of the current step; attention reads the paged KV
cache and the ``AttentionMetadata`` from ``engine.attention.get_forward_context()``.
``compute_logits`` runs the LM head on the rows the runner selects (usually the
last token of each request) and returns fp32.

Decisions:
- Mistral's ``sliding_window`` is ignored (full attention): exact for contexts
  up to the window, which covers the checkpoints we serve.
- Llama's ``attention_bias`` puts a bias on q/k/v *and* o (as HF does); Qwen2's
  bias is on q/k/v only. ``mlp_bias`` is not supported (ValueError).
- Module names mirror HF's (``model.layers.N.self_attn...``) except the fused
  ``qkv_proj`` and ``gate_up_proj``; ``load_weights`` maps HF names onto them.
- Tensor parallelism: the model is built with a ``TPGroup`` (default: TP=1,
  no group) that every sharded layer keeps; each rank then holds its shard of
  every weight, ``H/tp`` query heads and ``KH/tp`` KV heads (its KV cache holds
  those heads only), and ``compute_logits`` returns the full vocabulary on
  every rank (all-gathered).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from engine.attention import get_forward_context
from engine.models.layers import (MergedColumnLinear, ParallelLMHead, QKVLinear, RMSNorm,
                                  RotaryEmbedding, RowLinear, VocabEmbedding, apply_rotary,
                                  default_weight_loader, silu_and_mul)

ARCHITECTURES = ("llama", "mistral", "qwen2")
_ARCH_BY_CLASS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape and numerics of one model (from config.json, GGUF metadata or a preset)."""
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = field(hash=False)   # dicts don't hash; the rest of the config does
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; supported: {ARCHITECTURES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def o_bias(self) -> bool:
        """Llama's attention_bias also biases o_proj; Qwen2's does not."""
        return self.attention_bias and self.architecture == "llama"

    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        """Parse an HF ``config.json`` dict (transformers 4.x ``rope_theta``/``rope_scaling``
        or 5.x ``rope_parameters``)."""
        arch = d.get("model_type")
        if arch not in ARCHITECTURES:
            arch = next((_ARCH_BY_CLASS[a] for a in d.get("architectures") or [] if a in _ARCH_BY_CLASS), arch)
        if arch not in ARCHITECTURES:
            raise ValueError(f"unsupported model_type {d.get('model_type')!r} / architectures "
                             f"{d.get('architectures')!r}; supported: {ARCHITECTURES}")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d.get('hidden_act')!r} is not supported (silu only)")
        rope = dict(d.get("rope_parameters") or {})
        theta = float(d.get("rope_theta", rope.pop("rope_theta", 10000.0)))
        rope.pop("rope_theta", None)
        scaling = d.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        heads = int(d["num_attention_heads"])
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @property
    def num_parameters(self) -> int:
        """Parameter count (for progress bars and memory estimates)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = h * (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim
        o = self.num_attention_heads * self.head_dim * h
        layer = qkv + o + 3 * h * i + 2 * h
        if self.attention_bias:
            layer += qkv // h + (h if self.o_bias else 0)
        return v * h * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + h


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.qkv_proj = QKVLinear(config.hidden_size, config.head_dim, config.num_attention_heads,
                                  config.num_key_value_heads, bias=config.attention_bias, tp=tp)
        self.o_proj = RowLinear(config.num_attention_heads * config.head_dim, config.hidden_size,
                                bias=config.o_bias, tp=tp)
        self.scale = config.head_dim ** -0.5

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        T = hidden.shape[0]
        q = q.view(T, -1, self.head_dim)
        k = k.view(T, -1, self.head_dim)
        v = v.view(T, -1, self.head_dim)
        q, k = apply_rotary(q, k, *rope)
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
        out = ctx.backend.forward(q, k, v, k_cache, v_cache, ctx.metadata, self.scale)
        return self.o_proj(out.reshape(T, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        i = config.intermediate_size
        self.gate_up_proj = MergedColumnLinear(config.hidden_size, [i, i], tp=tp)
        self.down_proj = RowLinear(i, config.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, tp=None):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, hidden, residual):
        """Pre-norm block with the residual add fused into the norms: returns
        ``(mlp_out, residual)``; the next norm adds them."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, tp=tp)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                          config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, tp) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions):
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)   # (cos, sin), shared by all layers
        residual = None
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# HF checkpoint name fragment → (our fused module fragment, shard id)
_STACKED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaForCausalLM(nn.Module):
    """Parameters are uninitialized after ``__init__``: call ``load_weights``
    (or use ``engine.models.loader.load_model``)."""

    def __init__(self, config: ModelConfig, tp=None):
        super().__init__()
        self.config = config
        self.tp = tp             # engine.distributed.TPGroup, or None for TP=1
        self.model = LlamaModel(config, tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp=tp)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Re-share the LM head with the embedding (after parameters were replaced)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters, converting dtype and
        device on the fly. Raises ValueError on unknown names, shape mismatches
        or parameters left unloaded."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        stacked_expected: dict[str, set] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue   # tied: the embedding is the head
            shard_id = None
            for hf_part, our_part, sid in _STACKED:
                if hf_part in name:
                    name, shard_id = name.replace(hf_part, our_part), sid
                    break
            param = params.get(name)
            if param is None:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor, shard_id)   # copy_ converts dtype/device
            if shard_id is None:
                loaded.add(name)
            else:
                stacked_expected.setdefault(name, set()).add(shard_id)
        for name, shards in stacked_expected.items():
            needed = {"q", "k", "v"} if ".qkv_proj." in name else {0, 1}
            if shards >= needed:
                loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
