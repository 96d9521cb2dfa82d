"""How copies into device slots run, and how their time is counted.

A `SlotPool` hands every copy to its transfers object as a closure and gets back a handle for the
ones that run ahead of need:

- `demand(copy)`: a miss. The copy is on the critical path; its time is stall time.
- `ahead(copy)`: a prefetch. The copy overlaps the model's compute; its time is prefetch time. The
  handle says when it is done.
- `wait(handle)`: a slot with a copy in flight is about to be read or overwritten; the time the model
  waits for it is stall time.
- `settle()`: bring every deferred time into the statistics (before they are read or reset).

`HostCopies` (CPU): demand copies on the calling thread, prefetches on a one-thread executor (the CPU
stand-in for a copy engine), waits that block. `StreamCopies` (CUDA): demand copies on the compute
stream, prefetches on a side stream that first waits for the compute queued so far (so no slot is
overwritten while a kernel still reads it), and waits that make the compute stream wait on the
copy's event; the host never blocks. Its times come from CUDA events, read at `settle()`: a wait's
stall is the time the compute stream sat between an event recorded before the wait and one after.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

Copy = Callable[[], None]


class HostCopies:
    def __init__(self, stats_of: Callable[[], object], prefetch: bool):
        self.stats_of = stats_of  # the pool's current CacheStats (a reset replaces it)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="moedeploy-copier") if prefetch else None

    def demand(self, copy: Copy) -> None:
        self.stats_of().stall_s += _timed(copy)

    def ahead(self, copy: Copy) -> Future | None:
        if self.executor is None:  # no copy engine: inline
            self.stats_of().prefetch_s += _timed(copy)
            return None
        stats = self.stats_of()

        def run():  # on the copier thread
            stats.prefetch_s += _timed(copy)
        return self.executor.submit(run)

    def wait(self, handle: Future) -> None:
        start = time.perf_counter()
        handle.result()  # re-raises a failed copy here, on the model's thread
        self.stats_of().stall_s += time.perf_counter() - start

    def settle(self) -> None:
        pass


class StreamCopies:
    def __init__(self, stats_of: Callable[[], object], device: torch.device):
        self.stats_of = stats_of
        # With its index: torch looks up the current device for a bare "cuda", at every stream query.
        self.device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self.stream = torch.cuda.Stream(device)  # the side stream: a copy engine works it
        self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # (stats field, start, end)

    def _timed(self, stream, field: str, work: Copy) -> torch.cuda.Event:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        work()
        end.record(stream)
        self.pending.append((field, start, end))
        if len(self.pending) > 4096:  # a long run: fold in what is done, without blocking
            self._fold(lambda end: end.query())
        return end

    def demand(self, copy: Copy) -> None:
        self._timed(torch.cuda.current_stream(self.device), "stall_s", copy)

    def ahead(self, copy: Copy) -> torch.cuda.Event:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # slot reads queued so far come first
        with torch.cuda.stream(self.stream):
            return self._timed(self.stream, "prefetch_s", copy)

    def wait(self, handle: torch.cuda.Event) -> None:
        compute = torch.cuda.current_stream(self.device)
        self._timed(compute, "stall_s", lambda: compute.wait_event(handle))

    def settle(self) -> None:
        if self.pending:
            torch.cuda.synchronize(self.device)
            self._fold(lambda end: True)

    def _fold(self, done: Callable[[torch.cuda.Event], bool]) -> None:
        stats, left = self.stats_of(), []
        for field, start, end in self.pending:
            if done(end):
                setattr(stats, field, getattr(stats, field) + start.elapsed_time(end) / 1000)
            else:
                left.append((field, start, end))
        self.pending = left


def transfers_for(device: torch.device, stats_of: Callable[[], object], prefetch: bool):
    return StreamCopies(stats_of, device) if device.type == "cuda" else HostCopies(stats_of, prefetch)


def _timed(copy: Copy) -> float:
    start = time.perf_counter()
    copy()
    return time.perf_counter() - start
