import pytest
import torch

from tests.helpers.tiny_models import make_tiny_model, smollm2_gguf_path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", num_kv_heads=2)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", num_kv_heads=2)


@pytest.fixture(scope="session")
def smollm2_path():
    return smollm2_gguf_path()


def hf_greedy(model_dir, prompts, max_new_tokens, gguf_file=None):
    """The oracle: transformers' greedy generate, one prompt at a time, EOS ignored."""
    from transformers import AutoModelForCausalLM

    if gguf_file is not None:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), gguf_file=gguf_file, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            outs.append(gen[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="session")
def smollm2_engine():
    from engine import EngineConfig, LLMEngine
    return LLMEngine(EngineConfig(model="smollm2-135m", block_size=16, num_kv_blocks=128))
