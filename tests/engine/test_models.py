"""Our Llama-family forward, driven through the paged KV cache, must give HF
transformers' logits (fp32) — for a whole prompt, for the same prompt split in
chunks (the later chunk reads the earlier one from the cache), for single-token
decode steps, and for several requests batched in one forward."""

from __future__ import annotations

import pytest
import torch

from engine.attention import AttentionMetadata, forward_context
from engine.attention.torch_ref import TorchAttention
from engine.kv_cache import KVCache, KVCacheSpec
from engine.models.layers import rope_inv_freq
from engine.models.llama import ModelConfig
from engine.models.loader import load_model
from tests.helpers.tiny_models import make_tiny_model, smollm2_gguf_path

transformers = pytest.importorskip("transformers")

BLOCK = 4


class PagedRunner:
    """Minimal stand-in for the model runner: fixed, shuffled block tables, one
    KV cache, and forwards of any mix of requests' new tokens."""

    def __init__(self, model, config: ModelConfig, num_requests: int = 1, blocks_per_request: int = 32):
        spec = KVCacheSpec(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                           BLOCK, torch.float32)
        n = num_requests * blocks_per_request
        self.kv = KVCache(spec, n + 1, torch.device("cpu"))
        perm = (torch.randperm(n, generator=torch.Generator().manual_seed(0)) + 1).tolist()  # block 0 unused
        self.tables = [perm[i * blocks_per_request:(i + 1) * blocks_per_request] for i in range(num_requests)]
        self.num_computed = [0] * num_requests
        self.model = model

    def step(self, new_tokens: dict[int, list[int]]) -> list[torch.Tensor]:
        """Forward the new tokens of each listed request; return each one's logits."""
        ids, pos, slots, qlens, slens, tables = [], [], [], [], [], []
        for r, toks in new_tokens.items():
            start = self.num_computed[r]
            for i, t in enumerate(toks):
                p = start + i
                ids.append(t)
                pos.append(p)
                slots.append(self.tables[r][p // BLOCK] * BLOCK + p % BLOCK)
            qlens.append(len(toks))
            slens.append(start + len(toks))
            tables.append(self.tables[r])
            self.num_computed[r] += len(toks)
        qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots), query_start_loc=qsl,
            seq_lens=torch.tensor(slens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_query_len=max(qlens), max_seq_len=max(slens), query_lens_cpu=qlens, seq_lens_cpu=slens)
        with torch.inference_mode(), forward_context(meta, self.kv, TorchAttention()):
            hidden = self.model(torch.tensor(ids), torch.tensor(pos))
            logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(qlens))


def hf_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()


def check_against_hf(ours, hf, ids: list[int], atol: float) -> None:
    ref = hf_logits(hf, ids)
    # whole prompt in one forward
    whole = PagedRunner(ours.model, ours.config).step({0: ids})[0]
    torch.testing.assert_close(whole, ref, atol=atol, rtol=0)
    # chunked prefill (second chunk attends to the first through the cache), then decode steps
    runner = PagedRunner(ours.model, ours.config)
    cut, decode_from = 5, len(ids) - 3
    parts = [runner.step({0: ids[:cut]})[0], runner.step({0: ids[cut:decode_from]})[0]]
    parts += [runner.step({0: [t]})[0] for t in ids[decode_from:]]
    torch.testing.assert_close(torch.cat(parts), ref, atol=atol, rtol=0)


def load_tiny_pair(tmp_path, arch, **kw):
    path = make_tiny_model(tmp_path / arch, arch, **kw)
    ours = load_model(str(path), torch.float32, torch.device("cpu"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, hf


IDS = [1, 17, 200, 3, 45, 99, 250, 7, 8, 9, 120, 64, 33, 5, 211, 180, 42]


def test_tiny_llama_gqa_matches_hf(tmp_path):
    ours, hf = load_tiny_pair(tmp_path, "llama", num_kv_heads=2)
    assert ours.config.num_key_value_heads == 2 and ours.config.num_attention_heads == 4
    check_against_hf(ours, hf, IDS, atol=1e-4)


def test_tiny_llama_tied_embeddings(tmp_path):
    ours, hf = load_tiny_pair(tmp_path, "llama", num_kv_heads=1, tie_word_embeddings=True, num_hidden_layers=3)
    assert ours.model.lm_head.weight is ours.model.model.embed_tokens.weight
    check_against_hf(ours, hf, IDS, atol=1e-4)


def test_tiny_qwen2_qkv_bias_matches_hf(tmp_path):
    ours, hf = load_tiny_pair(tmp_path, "qwen2")
    assert ours.config.attention_bias
    assert ours.model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert ours.model.model.layers[0].self_attn.o_proj.bias is None
    check_against_hf(ours, hf, IDS, atol=1e-4)


def test_tiny_mistral_matches_hf(tmp_path):
    ours, hf = load_tiny_pair(tmp_path, "mistral")
    check_against_hf(ours, hf, IDS, atol=1e-4)


def test_tiny_llama3_rope_scaling_matches_hf(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    ours, hf = load_tiny_pair(tmp_path, "llama", rope_scaling=scaling, rope_theta=500000.0, head_dim=32)
    assert ours.config.rope_scaling["rope_type"] == "llama3"
    # the scaling must actually change some frequencies for this test to mean anything
    assert not torch.allclose(rope_inv_freq(32, 500000.0, scaling), rope_inv_freq(32, 500000.0, None))
    ids = (IDS * 6)[:96]   # past original_max_position_embeddings
    check_against_hf(ours, hf, ids, atol=1e-4)


def test_batched_requests_match_single(tmp_path):
    ours, hf = load_tiny_pair(tmp_path, "llama")
    a, b = IDS[:11], IDS[4:]
    runner = PagedRunner(ours.model, ours.config, num_requests=2)
    # step 1: both prompts' first parts; step 2: a decodes while b finishes its prompt
    la1, lb1 = runner.step({0: a[:-1], 1: b[:6]})
    la2, lb2 = runner.step({0: a[-1:], 1: b[6:]})
    torch.testing.assert_close(torch.cat([la1, la2]), hf_logits(hf, a), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([lb1, lb2]), hf_logits(hf, b), atol=1e-4, rtol=0)
    # step 3: decode-only batch (both query length 1)
    la3, lb3 = runner.step({0: [5], 1: [6]})
    torch.testing.assert_close(la3[0], hf_logits(hf, a + [5])[-1], atol=1e-4, rtol=0)
    torch.testing.assert_close(lb3[0], hf_logits(hf, b + [6])[-1], atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def smollm2_pair():
    path = smollm2_gguf_path()
    ours = load_model(str(path), torch.float32, torch.device("cpu"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ours, hf


def test_smollm2_gguf_matches_hf(smollm2_pair):
    ours, hf = smollm2_pair
    assert ours.config.num_hidden_layers == 30 and ours.config.tie_word_embeddings
    ids = ours.tokenizer.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                "<|im_start|>assistant\n")
    check_against_hf(ours, hf, ids, atol=2e-3)
    # and the model is a real one: greedy continuation matches HF's
    ref = hf_logits(hf, ids)
    assert int(ref[-1].argmax()) == int(PagedRunner(ours.model, ours.config).step({0: ids})[0][-1].argmax())
