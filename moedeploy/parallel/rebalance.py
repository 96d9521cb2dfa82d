"""Online rebalancing in an expert-parallel run: the rule `moedeploy place --algorithm online` scores
(placement/online.py), applied to the running model with real weight moves.

    each model step (a forward pre-hook, the same on every rank):
        counts [L, E] routed since the last step (every rank routes every token: identical everywhere)
        ─► every `every` tokens: policies.migrate(placement in force, counts of the last `window` tokens)
           ─► target; the layers that differ queue up
        ─► before the step, up to max(1, tokens of the last step // move_tokens) queued layers switch:
           this rank's new slots keep the experts it already holds and read the others from the
           checkpoint (the store), bytes counted; the layer's slots map changes on every rank at once

The past only: a re-plan sees steps already served. Every rank computes the same target from the same
counts, so no collective is needed to agree. Outputs do not change: every placement gives the same
tokens (docs/parallel.md). Not with an expert budget (the cache's slots would have to follow).

Legend: L = MoE layers, E = experts, S = slots per layer.
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import numpy as np
import torch

from ..experts import ExpertBank
from ..placement.online import OnlineConfig
from ..placement.policies import migrate
from ..store import HostStore
from ..store.experts import FIELDS


class Rebalancer:
    def __init__(self, layers: list, sharding, config: OnlineConfig = OnlineConfig()):
        self.layers = layers  # MoELayer, model order, each with .parallel
        self.rank = sharding.group.rank
        self.placement = sharding.placement  # in force
        self.config = config
        self.top_k = layers[0].router.top_k
        self.seen = np.stack([layer.expert_counts.cpu().numpy() for layer in layers])  # [L, E] at the last step
        self.history: deque[tuple[int, np.ndarray]] = deque()  # (tokens, counts [L, E]) per step, newest last
        self.since = 0  # tokens since the last re-plan
        self.target = None
        self.queue: list[int] = []
        self.replans = self.layer_moves = self.moved_slots = self.bytes_read = 0

    def __call__(self, module, args, kwargs=None) -> None:
        """Forward pre-hook of the model: account for the step that just ran, then move what is due."""
        now = torch.stack([layer.expert_counts for layer in self.layers]).cpu().numpy()  # [L, E] since load
        counts = now - self.seen if (now >= self.seen).all() else now
        self.seen = now  # (counters reset by reset_stats: the step's counts are the counters themselves)
        tokens = int(counts[0].sum()) // self.top_k
        if tokens == 0:
            return
        self._remember(tokens, counts)
        if self.since >= self.config.every:
            self._replan()
        moves = max(1, tokens // self.config.move_tokens)  # layers switched before this step
        for layer in self.queue[:moves]:
            self._switch(layer)
        self.queue = self.queue[moves:]

    def _remember(self, tokens: int, counts: np.ndarray) -> None:
        self.history.append((tokens, counts))
        self.since += tokens
        while sum(t for t, _ in self.history) - self.history[0][0] >= self.config.window:
            self.history.popleft()

    def _replan(self) -> None:
        window = np.sum([c for _, c in self.history], axis=0).astype(np.float64)  # [L, E] the past only
        self.target = migrate(self.placement, window, self.config.penalty)
        self.replans += 1
        self.since = 0
        self.queue = [int(layer) for layer in np.flatnonzero((self.target.slots != self.placement.slots).any(1))]

    def _switch(self, index: int) -> None:
        """Layer `index` takes the target's slots: this rank's bank is rebuilt, reading only new experts."""
        layer, new = self.layers[index], self.target.slots[index]
        old = self.placement.local(index, self.rank)
        want = self.target.local(index, self.rank)
        held = {int(e): i for i, e in enumerate(old)}
        bank = layer.experts
        names = [name for name in FIELDS if getattr(bank, name) is not None]  # the store's read() order
        parts = []
        for e in want.tolist():
            if e in held:  # already on this rank
                parts.append([getattr(bank, name)[held[e]] for name in names])
            else:  # read from the checkpoint, converted as loading does
                parts.append([t.to(bank.w_in.dtype) for t in layer.source.read(e)])
                self.bytes_read += bank.expert_bytes()
        stacked = {name: torch.stack([p[i] for p in parts]).to(bank.w_in.device) for i, name in enumerate(names)}
        layer.experts = ExpertBank(activation=bank.activation, **stacked)
        layer.store = HostStore(layer.experts)
        layer.parallel.slots = new
        self.moved_slots += int((new != self.placement.slots[index]).sum())
        slots = self.placement.slots.copy()
        share = self.placement.share.copy()
        slots[index], share[index] = new, self.target.share[index]
        self.placement = replace(self.placement, slots=slots, share=share, algorithm="online")
        self.layer_moves += 1

    def stats(self) -> dict:
        return {"replans": self.replans, "layer_moves": self.layer_moves, "moved_slots": self.moved_slots,
                "bytes_read_this_rank": self.bytes_read}
