"""Eviction policies: given the resident experts that may leave, pick the one that does.

Pure bookkeeping over per-expert statistics (insertion time, last use, use count); the pool tells a
policy what happened and asks it for victims. Candidates never include an expert the current step
needs, so every policy evicts experts inactive in the current batch first.

- lru: least recently used.       - lfu: least frequently used (ties: least recent).
- fifo: first in, first out.      - lifo: the paper's policy: inactive experts first (always true
  here), then last in, first out.
- belady: the offline optimum, evicting the expert whose next use is farthest away. It needs the
  future, so only the simulator (moedeploy.sim) can build it.

Keys are (layer, expert) pairs; time is the pool's access counter.
"""

from __future__ import annotations

import math
from bisect import bisect_right

from ..errors import OptionError

Key = tuple[int, int]


class Policy:
    def __init__(self):
        self.inserted: dict[Key, int] = {}
        self.last_use: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}

    def tick(self, now: int) -> None:
        """A new access step begins (the pool's clock)."""

    def on_insert(self, key: Key, now: int) -> None:
        self.inserted[key] = now
        self.uses[key] = 0
        self.on_use(key, now)

    def on_use(self, key: Key, now: int) -> None:
        self.last_use[key] = now
        self.uses[key] += 1

    def on_evict(self, key: Key) -> None:
        for table in (self.inserted, self.last_use, self.uses):
            table.pop(key, None)

    def victim(self, candidates: list[Key]) -> Key:
        raise NotImplementedError


class LRU(Policy):
    def victim(self, candidates):
        return min(candidates, key=self.last_use.__getitem__)


class LFU(Policy):
    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.uses[k], self.last_use[k]))


class FIFO(Policy):
    def victim(self, candidates):
        return min(candidates, key=self.inserted.__getitem__)


class LIFO(Policy):
    def victim(self, candidates):
        return max(candidates, key=self.inserted.__getitem__)


class Belady(Policy):
    def __init__(self, future: dict[Key, list[int]]):
        """future[key]: the ascending access steps (the pool's clock) at which key will be needed."""
        super().__init__()
        self.future = future
        self.now = 0

    def tick(self, now):
        self.now = now

    def victim(self, candidates):
        def next_use(key):
            times = self.future.get(key, ())
            i = bisect_right(times, self.now)
            return times[i] if i < len(times) else math.inf

        return max(candidates, key=next_use)


POLICIES = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "lifo": LIFO}  # usable live; belady is offline only


def make_policy(name: str) -> Policy:
    if name == "belady":
        raise OptionError("policy 'belady' needs to know the future: use it offline with `moedeploy simulate`")
    if name not in POLICIES:
        raise OptionError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]()
