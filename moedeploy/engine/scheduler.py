"""Who runs in the next step, and how many of their tokens: continuous batching with chunked prefill.

    waiting (FIFO) ──admit──► running ──finish / abort──► gone
    one step = every prefilled running request's next token (decodes first: they are latency-bound)
             + prompt chunks (the oldest first) filling what is left of `max_batch_tokens`

Requests join and leave at token granularity: a request admitted now is in this step; one that finished
in the last step is not. A prompt longer than what is left of the step's budget is split across steps
(chunked prefill); a step samples a token only for requests whose pending tokens all ran in it.

What it does not do: run the model (runner.py), own KV memory (kv.py), or sample (sampler.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .request import Request


@dataclass(frozen=True)
class Chunk:
    """`length` tokens of `request`, from token index `start` on, run in this step."""

    request: Request
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the request's last token, so the step samples the request's next one."""
        return self.start + self.length == self.request.length


class Scheduler:
    def __init__(self, max_batch_tokens: int, max_running: int):
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Forget a finished or aborted request, wherever it is."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> list[Chunk]:
        """This step's chunks: decodes, then the running prefills, then newly admitted prompts."""
        budget = self.max_batch_tokens
        decodes = [r for r in self.running if r.pending == 1 and r.output][:budget]
        chunks = [Chunk(r, r.computed, 1) for r in decodes]
        budget -= len(chunks)
        for r in self.running:
            if budget == 0:
                return chunks
            if not r.output:  # still prefilling (a prompt split over steps)
                n = min(r.pending, budget)
                chunks.append(Chunk(r, r.computed, n))
                budget -= n
        while budget and self.waiting and len(self.running) < self.max_running:
            r = self.waiting.popleft()
            self.running.append(r)
            n = min(r.pending, budget)
            chunks.append(Chunk(r, r.computed, n))
            budget -= n
        return chunks
