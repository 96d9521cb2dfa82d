"""Timing generation token by token: a streamer that timestamps every token, and decode tokens/s from it."""

from __future__ import annotations

import time
import warnings

import torch

from .errors import OptionError


class TokenClock:
    """A transformers streamer that timestamps the prompt and every generated token."""

    def __init__(self, on_first=None):
        self.times: list[float] = []
        self.on_first = on_first  # called when the first new token arrives (the prompt step is over)

    def put(self, value):
        self.times.append(time.perf_counter())
        if len(self.times) == 2 and self.on_first is not None:
            self.on_first()

    def end(self):
        pass


def decode_rate(model, ids, new_tokens: int, on_first=None) -> tuple[float, torch.Tensor]:
    """Greedy-generate exactly `new_tokens` after `ids`; return (decode tokens/s after the first new token, output).
    on_first: called once the prompt step is over (to separate its statistics from the decode steps')."""
    if new_tokens < 2:
        raise OptionError(f"a decode rate needs at least 2 new tokens (the first one ends the prompt step), got "
                          f"{new_tokens}")
    clock = TokenClock(on_first)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the streaming notice at small budgets
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock)
    # clock.times[0] is the prompt, [1] the first new token: decode = the tokens after it
    return (len(clock.times) - 2) / (clock.times[-1] - clock.times[1]), out


def since(before: dict | None, after: dict | None) -> dict | None:
    """The numeric counters of `after` less those of `before`: statistics over a run's decode steps, given those
    taken when its first new token arrived (`decode_rate`'s on_first). Rates and peaks do not subtract: recompute
    them from the counters."""
    if after is None:
        return None
    return {k: v - before.get(k, 0) for k, v in after.items() if isinstance(v, int | float) and not isinstance(v, bool)}

