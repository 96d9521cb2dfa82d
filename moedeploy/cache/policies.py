"""Eviction policies: given the resident experts that may leave, pick the one that does.

Pure bookkeeping over per-expert statistics (insertion time, last use, use count); the pool tells a
policy what happened and asks it for victims. Candidates never include an expert the current step
needs, so every policy evicts experts inactive in the current batch first.

- lru: least recently used.       - lfu: least frequently used (ties: least recent).
- fifo: first in, first out.      - lifo: the paper's policy: inactive experts first (always true
  here), then last in, first out.

Keys are (layer, expert) pairs; time is the pool's access counter.
"""

from __future__ import annotations

from ..errors import OptionError

Key = tuple[int, int]


class Policy:
    def __init__(self):
        self.inserted: dict[Key, int] = {}
        self.last_use: dict[Key, int] = {}
        self.uses: dict[Key, int] = {}

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


POLICIES = {"lru": LRU, "lfu": LFU, "fifo": FIFO, "lifo": LIFO}


def make_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise OptionError(f"unknown cache policy {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name]()
