"""Timing generation token by token: a streamer that timestamps every token, and decode tokens/s from it."""

from __future__ import annotations

import time
import warnings

import torch


class TokenClock:
    """A transformers streamer that timestamps the prompt and every generated token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_rate(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy-generate exactly `new_tokens` after `ids`; return (decode tokens/s after the first new token, output)."""
    clock = TokenClock()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the streaming notice at small budgets
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    # clock.times[0] is the prompt, [1] the first new token: decode = the tokens after it
    return (len(clock.times) - 2) / (clock.times[-1] - clock.times[1]), out
