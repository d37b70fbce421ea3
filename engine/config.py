"""EngineConfig: every knob of one engine, validated once, frozen.

Decisions (where the design is silent):
- ``num_kv_blocks=None`` sizes the pool automatically: on GPU from
  ``gpu_memory_utilization`` after a profiling forward pass, on CPU from
  ``cpu_kv_cache_gib``.
- ``max_model_len=None`` takes the model's ``max_position_embeddings``.
- ``mode`` selects what the engine does with a finished prompt: ``"both"``
  decodes it (colocated), ``"prefill"`` samples the first token and holds the
  request's blocks until ``release`` (disaggregated prefill worker).
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPES = ("float32", "bfloat16", "float16")
_MODES = ("both", "prefill")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m"
    """Model: a preset name (``smollm2-135m``), an HF folder, a ``.gguf`` file or ``dummy:<preset>``."""
    tokenizer: str | None = None
    """Tokenizer folder or tokenizer.json; default: the model's own (SmolLM2's for dummy presets)."""
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int = 64
    """Most requests running in one step."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks plus decode tokens)."""
    num_kv_blocks: int | None = None
    """Blocks in the KV pool; None sizes it from memory."""
    max_model_len: int | None = None
    """Longest prompt+output; None takes the model's context length."""
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "float32"
    """Weights, activations and KV cache dtype: float32, bfloat16 or float16."""
    enable_prefix_caching: bool = True
    """Keep freed full blocks hashed so later requests reuse them."""
    mode: str = "both"
    """``both`` (prefill then decode) or ``prefill`` (hold blocks after the first token)."""
    attention_backend: str = "auto"
    """``torch`` (reference), ``triton`` (GPU) or ``auto`` (triton on CUDA when available)."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory the engine may use (weights + activations + KV)."""
    cpu_kv_cache_gib: float = 1.0
    """KV pool size on CPU when ``num_kv_blocks`` is None."""
    enforce_eager: bool = False
    """Disable CUDA graphs."""
    seed: int = 0
    """Seed for dummy weights and unseeded sampling."""
    hold_ttl_s: float = 60.0
    """Prefill mode: a held request not released within this many seconds is freed."""
    tensor_parallel_size: int = 1
    """TP ranks, one process each; this engine is rank 0 (see engine/tp_executor.py)."""
    async_scheduling: bool | None = None
    """Schedule and prepare step N+1 while step N runs on the device (one step in
    flight). None: on for CUDA at TP=1 unless ``mode='prefill'``."""
    hf_overrides: dict = field(default_factory=dict, hash=False, compare=False)
    """Extra config fields for dummy presets (e.g. ``num_hidden_layers``)."""

    @property
    def use_async_scheduling(self) -> bool:
        if self.async_scheduling is not None:
            return self.async_scheduling
        return self.device.startswith("cuda") and self.mode == "both" and self.tensor_parallel_size == 1

    @property
    def torch_dtype(self):
        """``dtype`` as a ``torch.dtype``."""
        import torch
        return getattr(torch, self.dtype)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got {self.attention_backend!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.async_scheduling and (self.mode == "prefill" or self.tensor_parallel_size > 1):
            raise ValueError("async_scheduling needs mode='both' and tensor_parallel_size=1")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
