"""What a request asks for (`SamplingParams`) and what the engine knows about it while it runs (`Request`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

from ..errors import OptionError

FINISH_REASONS = ("stop", "length", "abort", "timeout", "error")


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off;
    `seed` seeds the request's own generator (never the global RNG); `stop` strings end the text before them;
    `ignore_eos` generates max_tokens whatever the model says (benchmarks)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        checks = {
            "max_tokens": self.max_tokens >= 1,
            "temperature": 0 <= self.temperature <= 2,
            "top_p": 0 < self.top_p <= 1,
            "top_k": self.top_k >= 0,
            "stop": all(isinstance(s, str) and s for s in self.stop),
        }
        for name, ok in checks.items():
            if not ok:
                raise OptionError(f"{name} is out of range: {getattr(self, name)!r}"[:200])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Update:
    """What the engine tells a request's owner after a step: the text that became final, and at the end why."""

    text: str
    tokens: list[int]
    finish_reason: str | None = None  # one of FINISH_REASONS once the request is over
    error: str | None = None  # with finish_reason "timeout" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One request in the engine: prompt + output tokens, of which the first `computed` are in the KV cache."""

    prompt: list[int]
    params: SamplingParams
    on_update: Callable[[Update], None]
    deadline: float | None = None  # time.monotonic() after which the request ends with "timeout"
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    computed: int = 0
    finish_reason: str | None = None
    sampler: object = None  # its Sampler and Detokenizer, made by the engine when it takes the request
    detok: object = None

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens start .. start + n of prompt + output, without building the whole list."""
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start:start + n]
        return (self.prompt + self.output)[start:start + n] if start < p else self.output[start - p:start - p + n]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens whose keys and values are not yet computed: the prompt's rest, or the last sampled token."""
        return self.length - self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
