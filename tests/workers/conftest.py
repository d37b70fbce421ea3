import pytest

from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Overrides the shared fixture: a tokenizer-less tiny Llama (vocab 256), token-id prompts."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama_workers"), "llama", num_kv_heads=2)
