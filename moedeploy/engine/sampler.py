"""Per-request sampling: greedy rows in one argmax; sampled rows through transformers' temperature, top-k and
top-p warpers and a multinomial draw from the request's own `torch.Generator`."""

from __future__ import annotations

import secrets

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .request import SamplingParams


class Sampler:
    """The draw of one request: deterministic given its seed, independent of what else is in the batch."""

    def __init__(self, params: SamplingParams, device):
        self.greedy = params.greedy
        self.generator = None
        self.warpers = LogitsProcessorList()
        if self.greedy:
            return
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        if params.temperature != 1:
            self.warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            self.warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            self.warpers.append(TopPLogitsWarper(params.top_p))

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [V] (float32) -> a 0-d token id tensor."""
        scores = self.warpers(None, logits[None])
        return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[0, 0]


def sample(samplers: list[Sampler], logits: torch.Tensor) -> list[int]:
    """logits [R, V] for R requests, row r drawn by samplers[r] -> R token ids, with one host copy."""
    greedy = logits.argmax(-1)  # [R]: argmax needs no float32 copy
    if all(s.greedy for s in samplers):
        return greedy.tolist()
    logits = logits.float()
    picks = [greedy[r] if s.greedy else s.draw(logits[r]) for r, s in enumerate(samplers)]
    return torch.stack(picks).tolist() if picks else []
