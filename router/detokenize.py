"""A sample's token stream → the text the client sees, with stop strings.

Lifecycle of one ``SampleText``: ``feed(token_ids)`` per chunk → the newly
visible text, and whether a stop string appeared (the caller then ends the
sample with ``finish_reason="stop"`` and drops the worker's request);
``finish()`` once at the end → the tail held back so far.

Held back: the last ``max(len(stop)) - 1`` characters, which a later token could
still turn into a stop string (the stop string itself is never shown, as in
OpenAI's API). A trailing EOS is not detokenized unless ``ignore_eos``.
"""

from __future__ import annotations

from typing import Any


class SampleText:
    def __init__(self, detokenizer: Any, stop: list[str] = (), eos_token_ids: tuple[int, ...] = (),
                 ignore_eos: bool = False):
        self.detokenizer = detokenizer
        self.stop = [s for s in stop if s]
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self.eos_token_ids = () if ignore_eos else tuple(eos_token_ids)
        self.num_emitted = 0            # characters of text already shown
        self.cut: int | None = None     # where a stop string begins, once found
        self.stop_reason: str | None = None

    @property
    def text(self) -> str:
        full = self.detokenizer.text
        return full if self.cut is None else full[:self.cut]

    def feed(self, token_ids: list[int]) -> tuple[str, bool]:
        """Detokenize new tokens; returns (newly visible text, stopped)."""
        if self.cut is not None:
            return "", True
        if token_ids and token_ids[-1] in self.eos_token_ids:
            token_ids = token_ids[:-1]
        before = len(self.detokenizer.text)
        if token_ids:
            self.detokenizer.step(list(token_ids))
        full = self.detokenizer.text
        if self.stop:
            start = max(0, before - self.max_stop + 1)
            hits = [(at, s) for s in self.stop if (at := full.find(s, start)) >= 0]
            if hits:
                self.cut, self.stop_reason = min(hits)
                return self._emit(self.cut), True
            return self._emit(len(full) - (self.max_stop - 1)), False
        return self._emit(len(full)), False

    def finish(self) -> str:
        """The text held back so far (call once the sample is over)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        full = self.detokenizer.text
        upto = min(upto, len(full) if self.cut is None else self.cut)
        if upto <= self.num_emitted:
            return ""
        delta = full[self.num_emitted:upto]
        self.num_emitted = upto
        return delta
