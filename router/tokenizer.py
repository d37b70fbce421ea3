"""The served model's tokenizer, as the router uses it.

Wraps ``engine.tokenizer.Tokenizer`` (torch-free): prompts and chat messages →
token ids, and one ``IncrementalDetokenizer`` per sample.

Decision — detokenization happens in the router, not from the workers'
``text``: a disaggregated sample's first token comes from the prefill worker
and the rest from the decode worker, so only the router sees the whole output
stream. It detokenizes the token ids (the workers' authoritative output) with
the same tokenizer the workers use and applies stop strings itself
(``router/detokenize.py``). Stop strings are still passed to the workers so
they stop early; the router's cut is the one the client sees.

Tokenization of long inputs runs in a thread (``aencode``) so a 100 kB prompt
does not stall the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

_THREAD_CHARS = 4096   # inputs longer than this are tokenized off the event loop


class RouterTokenizer:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.eos_token_ids: tuple[int, ...] = tuple(tokenizer.eos_token_ids)
        size = getattr(tokenizer, "vocab_size", None)
        self.vocab_size: int | None = int(size) if size is not None else None

    @classmethod
    def from_path(cls, path: str) -> "RouterTokenizer":
        """A tokenizer folder, tokenizer.json or .gguf file; or a model preset name
        (``smollm2-135m``, ``dummy:<preset>``), which use the embedded SmolLM2 GGUF."""
        from engine.tokenizer import Tokenizer, resolve_tokenizer_path

        return cls(Tokenizer.from_path(resolve_tokenizer_path(path)))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    async def aencode(self, text: str) -> list[int]:
        if len(text) <= _THREAD_CHARS:
            return self.encode(text)
        return await asyncio.to_thread(self.encode, text)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Chat template → token ids (the template's own special tokens included)."""
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        if isinstance(out, str):
            return self.encode_rendered(out)
        return list(out)

    async def arender_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        if sum(len(m.get("content") or "") for m in messages) <= _THREAD_CHARS:
            return self.render_chat(messages, add_generation_prompt, **kwargs)
        return await asyncio.to_thread(self.render_chat, messages, add_generation_prompt, **kwargs)

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of an already rendered chat prompt: the template wrote its own special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def detokenizer(self, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        from engine.tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's own text (logprobs), special tokens kept."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
