"""load_model: HF folders (with and without tokenizer), GGUF, dummy presets, errors."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, forward_context
from engine.attention.torch_ref import TorchAttention
from engine.kv_cache import KVCache, KVCacheSpec
from engine.models.llama import LlamaForCausalLM, ModelConfig
from engine.models.loader import LoadedModel, load_model
from engine.models.presets import PRESETS, get_preset
from engine.tokenizer import Tokenizer
from tests.helpers.tiny_models import make_tiny_model, smollm2_gguf_path

CPU = torch.device("cpu")


def prefill_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """One request, whole prompt, blocks 0..n-1 of a fresh cache."""
    c, bs = loaded.config, 16
    nb = (len(ids) + bs - 1) // bs
    dtype = next(loaded.model.parameters()).dtype
    kv = KVCache(KVCacheSpec(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, bs, dtype), nb, CPU)
    n = len(ids)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                             seq_lens=torch.tensor([n], dtype=torch.int32),
                             block_tables=torch.arange(nb, dtype=torch.int32)[None], max_query_len=n,
                             max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n])
    with torch.inference_mode(), forward_context(meta, kv, TorchAttention()):
        return loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.arange(n)))


def test_hf_folder_without_tokenizer(tmp_path):
    path = make_tiny_model(tmp_path / "m", "llama")
    loaded = load_model(str(path), torch.float32, CPU)
    assert loaded.tokenizer is None and loaded.name == str(path)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert loaded.config.vocab_size == 256 and loaded.config.num_hidden_layers == 2
    assert loaded.config.bos_token_id == 1 and loaded.config.eos_token_ids == (2,)
    logits = prefill_logits(loaded, [1, 5, 9])
    assert logits.shape == (3, 256) and torch.isfinite(logits).all()


def test_hf_folder_with_tokenizer_bf16(tmp_path):
    path = make_tiny_model(tmp_path / "m", "qwen2", with_tokenizer=True, tie_word_embeddings=True)
    loaded = load_model(str(path), torch.bfloat16, CPU)
    assert isinstance(loaded.tokenizer, Tokenizer)
    assert loaded.tokenizer.encode("<|im_start|>user") == [1, 4093]
    assert loaded.config.vocab_size == 49152 and loaded.config.tie_word_embeddings
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert prefill_logits(loaded, loaded.tokenizer.encode("hello there")).dtype == torch.float32


def test_hf_overrides_truncate_layers(tmp_path):
    path = make_tiny_model(tmp_path / "m", "llama", num_hidden_layers=3)
    loaded = load_model(str(path), torch.float32, CPU, hf_overrides={"num_hidden_layers": 1})
    assert loaded.config.num_hidden_layers == 1 and len(loaded.model.model.layers) == 1


def test_checkpoint_missing_weights_is_an_error(tmp_path):
    path = make_tiny_model(tmp_path / "m", "llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="missing weights"):
        load_model(str(path), torch.float32, CPU, hf_overrides={"num_hidden_layers": 2})


def test_gguf_default_model():
    loaded = load_model("smollm2-135m", torch.float32, CPU, hf_overrides={"num_hidden_layers": 2})
    assert loaded.name == "smollm2-135m"
    c = loaded.config
    assert (c.architecture, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        ("llama", 576, 9, 3, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)
    assert loaded.tokenizer.eos_token_ids == (2,)
    # same file through its path: same tokenizer object (cached), same weights
    again = load_model(str(smollm2_gguf_path()), torch.float32, CPU, hf_overrides={"num_hidden_layers": 2})
    assert again.tokenizer is loaded.tokenizer
    torch.testing.assert_close(again.model.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)


@pytest.mark.parametrize("preset, params", [("llama3-8b", 8_030_261_248), ("qwen2-7b", 7_615_616_512),
                                            ("smollm2-135m", 134_515_008), ("mistral-7b", 7_248_023_552),
                                            ("llama3.2-1b", 1_235_814_400)])
def test_preset_shapes_are_real(preset, params):
    """Full-size shapes, checked on the meta device (nothing allocated)."""
    config = ModelConfig.from_hf_dict(get_preset(preset))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == params == config.num_parameters


@pytest.mark.parametrize("preset", ["llama3-8b", "qwen2-7b", "smollm2-135m"])
def test_dummy_presets_load_shrunk(preset):
    small = {"num_hidden_layers": 1, "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256}
    loaded = load_model(f"dummy:{preset}", torch.float32, CPU, hf_overrides=small)
    full = get_preset(preset)
    c = loaded.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (full["num_attention_heads"],
                                                             full["num_key_value_heads"])
    assert c.hidden_size == 128 and c.num_hidden_layers == 1
    qkv = loaded.model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.shape == ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, 128)
    assert (qkv.bias is not None) == (full["model_type"] == "qwen2")
    assert loaded.tokenizer.vocab_size == 49152   # SmolLM2's tokenizer for every dummy model
    assert torch.isfinite(prefill_logits(loaded, [1, 2, 3])).all()


def test_dummy_weights_seeded_and_typed():
    a = load_model("dummy:llama-tiny", torch.bfloat16, CPU, seed=1)
    b = load_model("dummy:llama-tiny", torch.bfloat16, CPU, seed=1)
    c = load_model("dummy:llama-tiny", torch.bfloat16, CPU, seed=2)
    wa, wb, wc = (m.model.model.layers[0].mlp.down_proj.weight for m in (a, b, c))
    assert wa.dtype == torch.bfloat16 and torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert 0.015 < wa.float().std().item() < 0.025
    assert torch.equal(a.model.model.norm.weight, torch.ones_like(a.model.model.norm.weight))
    assert set(PRESETS) >= {"llama3-8b", "qwen2-7b", "smollm2-135m", "llama-tiny"}


@pytest.mark.parametrize("name", ["nope", "dummy:nope", "/no/such/dir", "model.gguf"])
def test_unknown_model_is_a_value_error(name):
    with pytest.raises(ValueError, match="unknown"):
        load_model(name, torch.float32, CPU)


def test_folder_without_config_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(str(tmp_path), torch.float32, CPU)
