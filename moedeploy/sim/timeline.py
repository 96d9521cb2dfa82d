"""Time per token with prefetching: one host-to-device link, copies overlapping compute.

Assumptions (stated, not measured):
- Layers run one after another. A layer computes for (experts it uses) * expert_bytes / memory
  bandwidth (bandwidth-bound decoding, as in replay.CostModel), once all of its experts are on the device.
- One link carries every copy, one at a time, first come first served, each taking
  expert_bytes / link bandwidth. A prefetch issued at layer l is queued when layer l starts
  (its gate has run), so it overlaps the compute of layers l.. l+d and whatever follows.
- A demand miss is queued when its layer is reached, behind copies already queued (no preemption),
  and the layer waits for it. A layer that uses a prefetched expert whose copy is not done yet also
  waits (a late prefetch: a hit in the counters, a partial stall in time).
- Evicting costs nothing (read-only weights).
With the default numbers (16.5 MiB experts, 25 GB/s, 2 TB/s) one copy takes as long as about 80
expert reads, so time is dominated by bytes moved whenever more than ~1% of accesses need a copy.
"""

from __future__ import annotations

from ..cache.pool import SlotPool
from .replay import CostModel


class Timeline:
    def __init__(self, cost: CostModel):
        self.copy_s = cost.expert_bytes / (cost.link_gbps * 1e9)
        self.read_s = cost.expert_bytes / (cost.memory_gbps * 1e9)
        self.now = 0.0  # when the previous layer finished
        self.start = 0.0  # when the current layer started
        self.link_free = 0.0  # when the link finishes its queue
        self.ready: dict = {}  # key -> when its copy lands
        self.late = 0
        self.waited = 0.0  # seconds layers spent waiting for copies (demand misses and late prefetches)

    def _copy(self, keys, start: float) -> None:
        for key in keys:
            self.link_free = max(self.link_free, start) + self.copy_s
            self.ready[key] = self.link_free

    def demand(self, pool: SlotPool, keys: list) -> None:
        """Acquire `keys` in `pool` and run the layer: wait for misses and unfinished prefetches."""
        missing = [k for k in keys if k not in pool.slot_of]
        late = [k for k in keys if k in pool.unused_prefetch and self.ready.get(k, 0.0) > self.now]
        pool.acquire(keys)
        self._copy(missing, self.now)
        self.late += len(late)
        self.start = max([self.now] + [self.ready.get(k, 0.0) for k in keys])
        self.waited += self.start - self.now
        self.now = self.start + len(keys) * self.read_s

    def prefetch(self, pool: SlotPool, keys: list) -> None:
        """Prefetch `keys` into `pool`, queued on the link from the start of the current layer."""
        before = set(pool.slot_of)
        pool.prefetch(keys)
        self._copy([k for k in keys if k in pool.slot_of and k not in before], self.start)
