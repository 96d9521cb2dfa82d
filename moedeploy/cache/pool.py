"""Device slots for experts, what they hold, the copies into them, and the statistics.

A `SlotPool` has `num_slots` slots, each the size of one expert, stored as an `ExpertBank` whose
first dimension is the slot. `acquire(keys)` makes the given (layer, expert) keys resident, loading
misses from the layer's store (store/experts.py: host memory or the checkpoint on disk) and
evicting what the policy picks among residents the caller does not need now; it returns each key's
slot. `prefetch(keys)` loads predicted keys ahead of need: a later `acquire` of one is a hit (a
useful prefetch), not a miss.

Copies run through the pool's transfers (cache/transfer.py): on CPU, real copies into the slot
memory (demand misses on the calling thread, prefetches on a one-thread copier), so the logic and
statistics are those of a device cache; on CUDA, from pinned host memory, demand misses on the
compute stream and prefetches on a side stream. A slot with a copy in flight is waited for before it
is read or overwritten (a blocking wait on CPU, an event wait of the compute stream on CUDA); that
wait counts as stall time. Read-only weights are never copied back.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..experts import ExpertBank
from .policies import Key, Policy
from .transfer import transfers_for

SERIES_CAP = 4096  # points of a pool's resident-bytes series (CacheStats.record)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0  # demand misses: the step waits for the copy (a stall)
    prefetched: int = 0  # experts loaded ahead of need
    prefetch_hits: int = 0  # demand hits on a prefetched expert, at its first use
    bytes_moved: int = 0  # demand misses and prefetches
    stall_s: float = 0.0  # time spent copying experts in on demand, on the critical path
    prefetch_s: float = 0.0  # time spent copying prefetched experts (off the critical path)
    streamed_calls: int = 0  # layer calls that needed more experts than the pool has slots
    acquires: int = 0
    peak_resident_bytes: int = 0
    resident_bytes: list[int] = field(default_factory=list)  # after every `stride`-th acquire (at most SERIES_CAP)
    resident_at: list[float] = field(default_factory=list)  # time.perf_counter() of each of those acquires
    stride: int = 1

    def record(self, resident: int, now: float) -> None:
        """One acquire's resident bytes. The series keeps every acquire until SERIES_CAP points, then every
        2nd, 4th, ...: a server that runs for days keeps a bounded series, and the peak stays exact."""
        self.acquires += 1
        self.peak_resident_bytes = max(self.peak_resident_bytes, resident)
        if self.acquires % self.stride:
            return
        self.resident_bytes.append(resident)
        self.resident_at.append(now)
        if len(self.resident_bytes) >= SERIES_CAP:
            del self.resident_bytes[1::2], self.resident_at[1::2]
            self.stride *= 2

    def as_dict(self) -> dict:
        d = asdict(self)
        d["miss_rate"] = self.misses / max(self.hits + self.misses, 1)
        for series in ("resident_bytes", "resident_at", "stride"):  # long, or bookkeeping: left out
            del d[series]
        return d


def _slot_bank(like: ExpertBank, num_slots: int, device) -> ExpertBank:
    if getattr(like, "quantized", False):  # slots hold the small form: a miss copies the quantized bytes
        return like.empty(num_slots, device)

    def empty(t):
        return None if t is None else torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, device=device)

    return ExpertBank(empty(like.w_in), empty(like.w_out), like.activation, empty(like.b_in), empty(like.b_out))


class SlotPool:
    def __init__(self, num_slots: int, policy: Policy, like: ExpertBank | None, device=None, expert_bytes: int = 0,
                 prefetch: bool = False):
        """Slots shaped like `like`'s experts on `device`; with like=None, bookkeeping only (the simulator):
        no slot memory, and a load just counts `expert_bytes`. `prefetch`: prefetch copies overlap compute
        (on CPU a copier thread; on CUDA the side stream is always used)."""
        self.num_slots = num_slots
        self.policy = policy
        self.slots = None if like is None else _slot_bank(like, num_slots, device)
        self.expert_bytes = expert_bytes if like is None else like.expert_bytes()
        self.slot_of: dict[Key, int] = {}
        self.free = list(range(num_slots))
        self.stores: dict[int, object] = {}  # layer -> its store (store.HostStore or store.DiskStore)
        self.unused_prefetch: set[Key] = set()  # prefetched, not yet needed
        self.pinned: set[Key] = set()  # resident for good (cache/pinning.py)
        self.transfers = None if like is None else transfers_for(torch.device(device or "cpu"), lambda: self.stats,
                                                                 prefetch)
        self.in_flight: dict[int, object] = {}  # slot -> the handle of its prefetch copy, not yet waited for
        self.ahead: set[Key] = set()  # predicted for a later layer of this step: evicted only if nothing else can be
        self.stats = CacheStats()
        self._now = 0

    def register(self, layer: int, store) -> None:
        self.stores[layer] = store

    def pin(self, keys: list[Key]) -> None:
        """Load `keys` and never evict them. Part of setting up: the statistics start after it."""
        assert len(self.pinned) + len(keys) < self.num_slots, "one slot at least stays under the policy"
        for key in keys:
            if key not in self.slot_of:
                slot = self._place(key, self.pinned | {key})
                if self.transfers is not None:
                    self.transfers.demand(lambda: self._copy([(key, slot)]))
            self.pinned.add(key)
        self.drain()  # the setting-up copies' times (CUDA: pending events) land in the discarded stats
        self.stats = CacheStats()

    def chunks(self, keys: list[Key]) -> list[list[Key]]:
        """Split one step's distinct keys into chunks that `acquire` can hold at once: pinned keys ride
        in the first chunk, the others fill the unpinned slots."""
        room = self.num_slots - len(self.pinned)
        others = [k for k in keys if k not in self.pinned]
        chunks = [others[i : i + room] for i in range(0, len(others), room)] or [[]]
        chunks[0] = [k for k in keys if k in self.pinned] + chunks[0]
        return chunks

    def acquire(self, keys: list[Key]) -> list[int]:
        """Slots of `keys` (one of `chunks(...)`), loading misses; the order of `keys` is kept."""
        assert len([k for k in keys if k not in self.pinned]) <= self.num_slots - len(self.pinned), \
            "the caller splits a step into chunks that fit"
        self._now += 1
        self.policy.tick(self._now)
        needed = set(keys)
        if self.ahead:  # their layer has come: what it did not use is no longer ahead of need (nor, in a later
            came = {key[0] for key in keys}  # step, protected for a prediction that is over)
            self.ahead = {k for k in self.ahead if k[0] not in came}
        for key in keys:
            if key in self.slot_of:
                self.stats.hits += 1
                self._wait(self.slot_of[key])  # a prefetch still copying: a late one
                if key in self.unused_prefetch:
                    self.stats.prefetch_hits += 1
                    self.unused_prefetch.discard(key)
                self.policy.on_use(key, self._now)
                continue
            self.stats.misses += 1
            slot = self._place(key, needed)
            if self.transfers is not None:
                try:
                    self.transfers.demand(lambda: self._copy([(key, slot)]))
                except BaseException:
                    self._forget({slot})  # half written: never a hit
                    raise
        self.stats.record(len(self.slot_of) * self.expert_bytes, time.perf_counter())
        return [self.slot_of[k] for k in keys]

    def prefetch(self, keys: list[Key]) -> None:
        """Load the keys that are not resident, best first, evicting only keys outside `keys`; at most as
        many as there are unpinned slots. The pool's clock does not advance: a prefetch is not an access.
        Call it only once the slots the current step reads are done with (MoELayer does)."""
        keys = [k for k in dict.fromkeys(keys) if k not in self.pinned][: self.num_slots - len(self.pinned)]
        wanted = set(keys)
        copies = []  # (key, slot): one batch for the copy engine, so one hand-off however many experts
        for key in keys:
            if key in self.slot_of:
                continue
            self.stats.prefetched += 1
            self.unused_prefetch.add(key)
            copies.append((key, self._place(key, wanted)))
        if copies and self.transfers is not None:
            handle = self.transfers.ahead(lambda: self._copy(copies))
            if handle is not None:
                self.in_flight.update(dict.fromkeys((slot for _, slot in copies), handle))

    def resident(self, layer: int) -> list[int]:
        """The experts of `layer` in a slot, or with a prefetch copy in flight into one: `acquire` finds them
        without a demand miss."""
        return [e for (l, e) in self.slot_of if l == layer]

    def _place(self, key: Key, protected: set[Key]) -> int:
        """Give `key` a slot, evicting the policy's pick among residents outside `protected` (and, while
        any other can go, outside `ahead`); the copy is the caller's. A slot still being copied into is
        waited for before it is reused."""
        if not self.free:
            candidates = [k for k in self.slot_of if k not in protected and k not in self.pinned]
            victim = self.policy.victim([k for k in candidates if k not in self.ahead] or candidates)
            self.free.append(self.slot_of.pop(victim))  # read-only: nothing is copied back
            self.policy.on_evict(victim)
            self.unused_prefetch.discard(victim)
        slot = self.free.pop()
        self._wait(slot)
        self.slot_of[key] = slot
        self.policy.on_insert(key, self._now)
        self.stats.bytes_moved += self.expert_bytes
        return slot

    def _copy(self, copies: list[tuple[Key, int]]) -> None:
        """Copy each expert key from its store into its slot (on the stream or thread the transfers chose),
        in one multi-tensor copy: a CPU copier thread holds the GIL only to gather the views."""
        dst, src = [], []
        for (layer, expert), slot in copies:
            store, views = self.stores[layer], [slots[slot] for slots in self.slots.tensors()]
            if store.read_into(expert, views):
                continue  # read from disk straight into the slot
            for view, t in zip(views, store.read(expert), strict=True):
                dst.append(view)
                src.append(t)
        if dst:
            torch._foreach_copy_(dst, src, non_blocking=True)  # converts to the model's dtype as loading does

    def _wait(self, slot: int) -> None:
        """`slot`'s prefetch copy is done before anything after this reads or overwrites the slot."""
        handle = self.in_flight.pop(slot, None)
        if handle is not None:
            try:
                self.transfers.wait(handle)
            except BaseException:  # the batch's copy failed: none of its slots holds its expert
                self._forget({slot} | {s for s, h in self.in_flight.items() if h is handle})
                raise

    def _forget(self, slots: set[int]) -> None:
        """`slots` hold nothing usable (a copy into them failed): their keys leave, and the slots are free."""
        for key in [k for k, s in self.slot_of.items() if s in slots]:
            del self.slot_of[key]
            self.policy.on_evict(key)
            self.unused_prefetch.discard(key)
        for slot in slots:
            self.in_flight.pop(slot, None)
            if slot not in self.free:
                self.free.append(slot)

    def drain(self) -> None:
        """Wait for every copy in flight and bring their times into the statistics."""
        for slot in list(self.in_flight):
            self._wait(slot)
        if self.transfers is not None:
            self.transfers.settle()

    def reset(self) -> None:
        """Empty every unpinned slot and forget the statistics (a cold start; pinned experts stay)."""
        self.drain()
        for key in [k for k in self.slot_of if k not in self.pinned]:
            self.policy.on_evict(key)
            self.free.append(self.slot_of.pop(key))
        self.unused_prefetch.clear()
        self.ahead.clear()
        self.stats = CacheStats()
        self._now = 0

    def note_streaming(self, needed: int) -> None:
        """A layer call needs more experts than there are slots: they stream through in chunks. Say so once."""
        if self.stats.streamed_calls == 0:
            import warnings

            warnings.warn(f"moedeploy: the expert budget holds {self.num_slots} experts per pool, but one layer "
                          f"call needed {needed}; experts stream through the slots in chunks (slower, still exact)",
                          stacklevel=3)
        self.stats.streamed_calls += 1

    def resident_bytes(self) -> int:
        return len(self.slot_of) * self.expert_bytes
