"""Building blocks of the decoder: norms, rotary embedding, linears, MLP activation.

Decisions:
- Parameters are created with ``torch.empty`` (no init): every weight comes from
  ``load_weights`` or from the loader's dummy init, so building a big model is
  free. The loader builds on the ``meta`` device and materializes straight on
  the target device/dtype (see ``materialize``).
- Tensor parallelism is Megatron's: a column linear owns a slice of output
  features (no communication), a row linear a slice of input features and
  all-reduces its output over the ``TPGroup`` it was built with
  (engine/distributed.py); each parameter carries a ``weight_loader(param,
  loaded, shard_id)`` that copies this rank's slice of an HF tensor. Fused
  linears (``QKVLinear``, ``MergedColumnLinear``) stack HF's separate q/k/v
  and gate/up tensors; their shard ids are "q"/"k"/"v" and 0/1. Without a
  group (or with ``TPGroup.single()``) nothing is sharded or communicated.
- The vocabulary is split across ranks in equal slices of
  ``ceil(vocab / tp)`` rows (the last one zero-padded): the embedding looks
  up the ids of its slice and all-reduces; the LM head computes its slice of
  the logits and all-gathers them (padding cut off).
- RoPE follows HF's ``rotate_half`` layout (first half / second half of the
  head dim), which is what HF checkpoints assume. The cos/sin table is built
  lazily in fp32 on the device of the first call, up to
  ``max_position_embeddings`` (grown on demand on CPU if a position exceeds
  it); the model gathers cos/sin once per forward and every layer reuses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- norms / act

class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (as HF does), optionally fused with the residual add.

    ``forward(x)`` → normed; ``forward(x, residual)`` → ``(normed(x + residual), x + residual)``.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and (fused := _fused_ops()) is not None:   # one Triton kernel on GPU
            if residual is None:
                return fused.rmsnorm(x, self.weight, self.eps)
            return fused.add_rmsnorm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def _fused_ops():
    """``engine.fused_ops`` (Triton, same numerics as the torch code here) when
    Triton imports, else None — CPU keeps the torch path."""
    global _FUSED
    if _FUSED is False:
        try:
            from engine import fused_ops
            _FUSED = fused_ops
        except Exception:       # no Triton (CPU build): stay on torch
            _FUSED = None
    return _FUSED


_FUSED = False


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2I]`` (gate ‖ up) → ``silu(gate) * up`` ``[..., I]``."""
    if x.is_cuda and (fused := _fused_ops()) is not None:
        return fused.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ---------------------------------------------------------------- linears

def _copy_checked(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(f"{what}: checkpoint shape {tuple(loaded.shape)} != parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard_id=None) -> None:
    """Whole-tensor copy (norm weights and other unsharded parameters)."""
    if shard_id is not None:
        raise ValueError("this parameter has no shards")
    _copy_checked(param, loaded, "parameter")


class _Linear(nn.Module):
    """``y = x W^T (+ b)`` with a ``[out, in]`` weight (this rank's shard)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_checked(param, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _tp(tp, tp_rank: int, tp_size: int):
    """(group or None, rank, size): an explicit group wins over bare rank/size
    (bare rank/size shard the weights only — weight-loading tests)."""
    if tp is not None:
        return tp, tp.rank, tp.size
    return None, tp_rank, tp_size


class ColumnLinear(_Linear):
    """Output features split across TP ranks (rank r owns rows ``[r*out/tp, (r+1)*out/tp)``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, tp=None):
        self.tp, self.tp_rank, self.tp_size = _tp(tp, tp_rank, tp_size)
        if out_features % self.tp_size:
            raise ValueError(f"output size {out_features} not divisible by tp_size {self.tp_size}")
        super().__init__(in_features, out_features // self.tp_size, bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        n = param.shape[0]
        _copy_checked(param, loaded.narrow(0, self.tp_rank * n, n), type(self).__name__)


class RowLinear(_Linear):
    """Input features split across TP ranks; a TP>1 caller all-reduces the output.

    The bias (if any) is added by rank 0 only, so the all-reduce adds it once.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, tp=None):
        self.tp, self.tp_rank, self.tp_size = _tp(tp, tp_rank, tp_size)
        if in_features % self.tp_size:
            raise ValueError(f"input size {in_features} not divisible by tp_size {self.tp_size}")
        super().__init__(in_features // self.tp_size, out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param.dim() == 2:
            n = param.shape[1]
            loaded = loaded.narrow(1, self.tp_rank * n, n)
        _copy_checked(param, loaded, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        if self.tp is not None and self.tp.size > 1:
            self.tp.all_reduce(y)     # partial sums of every rank's input slice
        return y


class MergedColumnLinear(ColumnLinear):
    """Several column linears of equal input stacked on the output axis (gate ‖ up).

    ``shard_id`` is the index of the HF tensor in ``output_sizes``.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1, tp=None):
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, tp_rank, tp_size, tp)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if shard_id is None:  # already fused in the checkpoint
            return super().weight_loader(param, loaded)
        sizes = [s // self.tp_size for s in self.output_sizes]
        offset = sum(sizes[:shard_id])
        n = sizes[shard_id]
        _copy_checked(param.narrow(0, offset, n), loaded.narrow(0, self.tp_rank * n, n),
                      f"{type(self).__name__}[{shard_id}]")


class QKVLinear(ColumnLinear):
    """q ‖ k ‖ v projection for GQA. Each rank owns ``H/tp`` query heads and
    ``KH/tp`` kv heads (kv heads are replicated when ``tp_size > KH``)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int = 0, tp_size: int = 1, tp=None):
        self.tp, tp_rank, tp_size = _tp(tp, tp_rank, tp_size)
        if num_heads % tp_size:
            raise ValueError(f"num_heads {num_heads} not divisible by tp_size {tp_size}")
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"num_kv_heads {num_kv_heads} and tp_size {tp_size}: one must divide the other")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        _Linear.__init__(self, hidden_size, out, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if shard_id is None:
            raise ValueError("QKVLinear loads q/k/v separately (shard_id 'q', 'k' or 'v')")
        if shard_id == "q":
            offset, n, rank = 0, self.q_size, self.tp_rank
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            n, rank = self.kv_size, self.tp_rank // self.kv_replicas
        _copy_checked(param.narrow(0, offset, n), loaded.narrow(0, rank * n, n),
                      f"QKVLinear[{shard_id}]")


class VocabEmbedding(nn.Module):
    """Token embedding ``[vocab, hidden]``, vocab-parallel: rank r owns rows
    ``[r*per_rank, (r+1)*per_rank)`` with ``per_rank = ceil(vocab / tp)``."""

    def __init__(self, vocab_size: int, hidden_size: int, tp=None):
        super().__init__()
        self.tp, self.tp_rank, self.tp_size = _tp(tp, 0, 1)
        self.vocab_size = vocab_size
        self.per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if self.tp_size == 1:
            return _copy_checked(param, loaded, type(self).__name__)
        if loaded.shape[0] != self.vocab_size or loaded.shape[1:] != param.shape[1:]:
            raise ValueError(f"{type(self).__name__}: checkpoint shape {tuple(loaded.shape)} != "
                             f"({self.vocab_size}, {param.shape[1]})")
        n = max(0, min(self.per_rank, self.vocab_size - self.vocab_start))
        param.data[n:].zero_()    # padding rows of the last shard
        param.data[:n].copy_(loaded.narrow(0, self.vocab_start, n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)     # each id's row comes from exactly one rank


class ParallelLMHead(VocabEmbedding):
    """LM head sharded like the embedding (and tied to it when the model ties):
    ``forward(hidden [T, H]) -> logits [T, vocab]`` in the activation dtype."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        if self.tp_size == 1:
            return logits
        return self.tp.all_gather(logits, dim=-1)[..., :self.vocab_size]


# ---------------------------------------------------------------- rotary

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim/2]`` (fp32), with the rope scaling applied.

    Supported ``rope_type``: default, linear, llama3. Others raise ValueError.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, and
        # interpolate smoothly in the band between the two wavelength cutoffs.
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        in_band = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        return torch.where(in_band, interpolated, out)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin of RoPE at given positions; one instance (one table) per model.

    ``forward(positions [T]) -> (cos, sin)`` each ``[T, 1, D]`` fp32, computed once
    per model forward and applied in every layer with ``apply_rotary``.
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        self.inv_freq_cpu = rope_inv_freq(head_dim, theta, scaling)   # plain attr: not a buffer
        self._cos_sin: torch.Tensor | None = None   # [2, n, D]: cos, sin for positions 0..n-1

    def _table(self, device: torch.device, needed: int) -> torch.Tensor:
        cache = self._cos_sin
        if cache is None or cache.device != device or cache.shape[1] < needed:
            n = max(self.max_position, needed)
            t = torch.arange(n, dtype=torch.float32, device=device)
            freqs = torch.outer(t, self.inv_freq_cpu.to(device))
            emb = torch.cat([freqs, freqs], dim=-1)
            cache = self._cos_sin = torch.stack([emb.cos(), emb.sin()])
        return cache

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._table(positions.device, self.max_position)
        # On CPU a position past the table grows it; on GPU the runner keeps
        # positions < max_model_len <= max_position (no host sync here).
        if positions.device.type == "cpu" and positions.numel() and int(positions.max()) >= table.shape[1]:
            table = self._table(positions.device, int(positions.max()) + 1)
        cos_sin = table[:, positions].unsqueeze(2)   # [2, T, 1, D]
        return cos_sin[0], cos_sin[1]


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q ``[T, H, D]`` and k ``[T, KH, D]`` (HF rotate_half layout), math in fp32.
    On GPU one Triton kernel rotates both in place."""
    if q.is_cuda and (fused := _fused_ops()) is not None:
        return fused.rope_(q, k, cos, sin)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(dtype)


# ---------------------------------------------------------------- materialize

@torch.no_grad()
def materialize(module: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every (meta) parameter by an uninitialized tensor of ``dtype`` on
    ``device``, keeping shared parameters shared and ``weight_loader`` attached."""
    done: dict[int, nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            new = done.get(id(p))
            if new is None:
                new = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device), requires_grad=False)
                if hasattr(p, "weight_loader"):
                    new.weight_loader = p.weight_loader
                done[id(p)] = new
            mod._parameters[name] = new
