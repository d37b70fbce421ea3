"""Model family (Llama/Mistral/Qwen2/SmolLM2), layers and weight loading.

``load_model`` lives in ``engine.models.loader``; import it from there (kept
out of this package's namespace so ``import engine.models.llama`` stays light).
"""

from engine.models.llama import LlamaForCausalLM, ModelConfig

__all__ = ["LlamaForCausalLM", "ModelConfig"]
