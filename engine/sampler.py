"""Sampling on the logits' device: greedy, temperature, top-k, top-p, min-p,
per-request seeds, top-N logprobs.

Random sampling uses the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)``
draws from ``p`` without a cumulative sum or a host sync. A seeded request draws
its ``E`` from its own ``torch.Generator`` so its output is reproducible whatever
it is batched with. Logprobs are those of the model's raw distribution (before
temperature and truncation), as vLLM reports them. ``sample`` only launches
device work; ``tokens`` reads the results (the runner copies them to pinned
host memory first, so only that copy is waited for).
"""

from __future__ import annotations

import torch

from engine.outputs import SampledToken
from engine.request import Request


class Sampler:
    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> list[SampledToken]:
        return self.tokens(self.sample(logits, reqs), reqs)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> list[torch.Tensor]:
        """The chosen ids on the device, then — only when a request asks for logprobs —
        their logprobs and the top-k logprobs and ids. Launches work; no host sync."""
        logits = logits.float()
        ids = self._sample(logits, reqs)
        want = [r.params.logprobs for r in reqs]
        if all(w is None for w in want):
            return [ids]
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, ids[:, None]).squeeze(1)
        k = max(w or 0 for w in want)
        if k == 0:
            return [ids, chosen]
        top_vals, top_ids = logprobs.topk(k, dim=-1)
        return [ids, chosen, top_vals, top_ids]

    @staticmethod
    def tokens(tensors: list[torch.Tensor], reqs: list[Request]) -> list[SampledToken]:
        """``sample``'s tensors (on any device; host copies avoid a sync) → tokens."""
        ids = tensors[0].tolist()
        if len(tensors) == 1:
            return [SampledToken(t) for t in ids]
        chosen = tensors[1].tolist()
        top_vals, top_ids = (tensors[2].tolist(), tensors[3].tolist()) if len(tensors) > 2 else (None, None)
        out = []
        for i, (tok, lp, r) in enumerate(zip(ids, chosen, reqs)):
            w, top = r.params.logprobs, None
            if w is not None:
                top = dict(zip(top_ids[i][:w], top_vals[i][:w])) if w > 0 else {}
                top.setdefault(tok, lp)
            out.append(SampledToken(tok, lp, top))
        return out

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        greedy_ids = logits.argmax(dim=-1)
        if all(r.params.greedy for r in reqs):
            return greedy_ids
        dev = logits.device
        temps = torch.tensor([r.params.temperature if not r.params.greedy else 1.0 for r in reqs],
                             device=dev, dtype=torch.float32)
        probs = torch.softmax(logits / temps[:, None], dim=-1)
        probs = self._truncate(probs, reqs)
        noise = torch.empty_like(probs)
        for i, r in enumerate(reqs):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
            else:
                noise[i].exponential_()
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([r.params.greedy for r in reqs], device=dev)
        return torch.where(is_greedy, greedy_ids, sampled)

    @staticmethod
    def _truncate(probs: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """Zero the tokens outside top-k / top-p / min-p (each row its own limits)."""
        ps = [r.params for r in reqs]
        if any(p.top_k > 0 for p in ps):
            vocab = probs.shape[-1]
            ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in ps], device=probs.device)
            sorted_p = probs.sort(dim=-1, descending=True).values
            kth = sorted_p.gather(1, (ks.clamp(max=vocab) - 1)[:, None])
            probs = torch.where(probs < kth, 0.0, probs)
        if any(p.top_p < 1.0 for p in ps):
            top_p = torch.tensor([p.top_p for p in ps], device=probs.device)[:, None]
            sorted_p, order = probs.sort(dim=-1, descending=True)
            # keep a token if the mass before it is below top_p (the first is always kept)
            before = sorted_p.cumsum(dim=-1) - sorted_p
            sorted_p = torch.where(before >= top_p * sorted_p.sum(-1, keepdim=True), 0.0, sorted_p)
            probs = torch.zeros_like(probs).scatter_(1, order, sorted_p)
        if any(p.min_p > 0.0 for p in ps):
            min_p = torch.tensor([p.min_p for p in ps], device=probs.device)[:, None]
            probs = torch.where(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0, probs)
        return probs
