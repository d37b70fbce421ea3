"""RequestOutput → DecodeChunk deltas, per completion.

Each completion (index 0..n-1) remembers how many tokens and characters it
already streamed. Text is held back by ``max(len(stop)) - 1`` characters while
the completion runs, so a stop string (which the engine cuts from the final
text) is never streamed half-way. A Decode stream starts with the first token
already sent (it came with the KVHandle): ``skip_first=True`` makes the first
output — the one ``finish_kv`` produces, holding exactly that token — set the
baseline instead of being streamed.
"""

from __future__ import annotations

from engine.request import SamplingParams
from workers.types import DecodeChunk


class CompletionStream:
    def __init__(self, params: SamplingParams, skip_first: bool = False):
        self.holdback = max((len(s) for s in params.stop), default=1) - 1
        self.want_logprobs = params.logprobs is not None
        self._sent: dict[int, list[int]] = {}    # index → [tokens, chars]
        self._done: set[int] = set()
        self._skip_first = skip_first
        self.n = params.n

    @property
    def finished(self) -> bool:
        return len(self._done) >= self.n

    def chunks(self, out) -> list[DecodeChunk]:
        chunks = []
        for comp in out.outputs:
            if comp.index in self._done:
                continue
            sent = self._sent.get(comp.index)
            if sent is None:
                if self._skip_first:
                    sent = [1, len(comp.text) if len(comp.token_ids) == 1 else 0]
                else:
                    sent = [0, 0]
                self._sent[comp.index] = sent
            finished = comp.finish_reason is not None
            text = comp.text
            visible = len(text) if finished else max(sent[1], len(text) - self.holdback)
            new_tokens = comp.token_ids[sent[0]:]
            new_text = text[sent[1]:visible]
            if not (new_tokens or new_text or finished):
                continue
            logprobs = None
            if self.want_logprobs and comp.logprobs is not None:
                logprobs = comp.logprobs[sent[0]:sent[0] + len(new_tokens)]
            chunks.append(DecodeChunk(token_ids=list(new_tokens), text=new_text,
                                      finish_reason=comp.finish_reason, num_cached_tokens=out.num_cached_tokens,
                                      index=comp.index, logprobs=logprobs))
            sent[0], sent[1] = len(comp.token_ids), visible
            if finished:
                self._done.add(comp.index)
        return chunks

    def abort_chunks(self, num_cached_tokens: int = 0) -> list[DecodeChunk]:
        """Final chunks for completions still open when the request was aborted."""
        open_ = [i for i in range(self.n) if i not in self._done]
        self._done.update(open_)
        return [DecodeChunk([], "", "abort", num_cached_tokens, index=i) for i in open_]
