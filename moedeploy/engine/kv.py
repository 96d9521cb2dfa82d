"""The KV cache of every running request: one arena per layer, a region of it per request.

A step packs the tokens of many requests into one sequence ([1, T, D]); `RequestKV` is the transformers `Cache`
the model gets for it. Every layer has an arena of keys and of values, [1, H, C, d]; each running request owns a
region of C (the same columns in every layer) and its keys fill the region from its start. At the start of a
step (`begin`) every request in it gets room for its new tokens (a request that outgrows its region moves to one
twice as large, up to its most tokens); each layer's `update` then writes the step's keys into the arena with one
`index_copy_` and returns the arena's used columns as they are, no copy. `attention.py` lets each request attend to
its own region only (`spans`). A finished request's region is free for the next one at once; when no request is
left the arenas are dropped, and their memory with them.

What it does not do: decide who runs (scheduler.py), or sliding-window and hybrid attention (refused).

Legend: H = key/value heads, C = arena columns, d = head size, T = tokens in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Cache

from ..errors import UnsupportedModelError

MIN_REGION = 64  # tokens a request's first region holds (or its most tokens, if fewer)


def check_supported(config) -> None:
    """Refuse what per-request full-attention regions cannot serve exactly, with the reason."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type} is an encoder-decoder model; the engine serves decoder-only models")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if kinds != {"full_attention"} or sliding:
        raise UnsupportedModelError(f"{config.model_type} uses sliding-window or hybrid attention "
                                    f"({', '.join(sorted(kinds))}); the engine serves full-attention models only")


@dataclass
class Region:
    base: int  # first arena column
    size: int  # columns it owns
    length: int = 0  # columns filled with the request's keys


class RequestKV(Cache):
    def __init__(self, config, device):
        check_supported(config)
        super().__init__(layers=[])
        self.device = torch.device(device)
        self.keys: dict[int, torch.Tensor] = {}  # layer -> arena [1, H, C, d]
        self.values: dict[int, torch.Tensor] = {}
        self.columns_allocated = 0  # C
        self.regions: dict[int, Region] = {}  # request id -> its region
        self.holes: list[tuple[int, int]] = []  # (base, size) of unowned columns below C, sorted
        self.begin([], {})

    # -- a step ----------------------------------------------------------------------------------------
    def begin(self, segments: list[tuple[int, int, int]], limits: dict[int, int]) -> None:
        """A new step: `segments` (request id, first row in the step, rows); `limits` the most tokens of a request
        seen for the first time. Makes room, and fixes where each new key goes (`dest`) and each request's keys
        after the step (`spans`)."""
        self.segments = segments
        dest, spans = [], []
        for request, _, n in segments:
            region = self.regions.get(request)
            if region is None or region.length + n > region.size:
                region = self._grow(request, n, limits.get(request, 1 << 40))
            dest.append(torch.arange(region.base + region.length, region.base + region.length + n))
            region.length += n
            spans.append((region.base, region.length))
        self.spans = spans  # (first column, keys) of each segment's request, in `update`'s result
        self.used = max((r.base + r.length for r in self.regions.values()), default=0)
        self.dest = torch.cat(dest).to(self.device) if dest else None  # [T] arena column of each new key

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write a step's keys and values [1, H, T, d] into the layer's arena; return its used columns
        [1, H, used, d] (views). What the model stores may be a compressed form (DeepSeek's latent): it expands
        what this returns, so attention reads each request's keys from its input, at `spans`."""
        keys, values = self._arena(layer_idx, key_states, value_states)
        keys.index_copy_(2, self.dest, key_states)
        values.index_copy_(2, self.dest, value_states)
        return keys[:, :, :self.used], values[:, :, :self.used]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per token; no request's length is "the" length

    # -- requests --------------------------------------------------------------------------------------
    def free(self, requests: list[int]) -> None:
        """Give these requests' regions back (their keys stay until overwritten); with none left, drop the arenas."""
        for request in requests:
            region = self.regions.pop(request, None)
            if region is not None:
                self._release(region.base, region.size)
        if not self.regions:
            self.reset()

    def held_by(self, request: int) -> int:
        region = self.regions.get(request)
        return region.length if region else 0

    @property
    def columns(self) -> int:
        """Tokens held, over all requests."""
        return sum(r.length for r in self.regions.values())

    def reset(self) -> None:
        self.keys.clear()
        self.values.clear()
        self.columns_allocated = 0
        self.regions.clear()
        self.holes = []

    # -- the arena -------------------------------------------------------------------------------------
    def _arena(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor):
        keys = self.keys.get(layer)
        if keys is None or keys.shape[2] < self.columns_allocated:
            self.keys[layer] = self._widen(keys, key_states)
            self.values[layer] = self._widen(self.values.get(layer), value_states)
        return self.keys[layer], self.values[layer]

    def _widen(self, arena: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
        """The arena with C columns, zeros where new (DeepSeek expands the whole used arena, gaps included: keep
        them ordinary numbers)."""
        wide = like.new_zeros((*like.shape[:2], self.columns_allocated, like.shape[3]))
        if arena is not None:
            wide[:, :, :arena.shape[2]] = arena
        return wide

    def _grow(self, request: int, n: int, limit: int) -> Region:
        """A region with room for n more tokens of `request`, its keys moved there in every layer."""
        old = self.regions.get(request)
        length = old.length if old else 0
        size = max(length + n, min(2 * old.size if old else MIN_REGION, limit))
        region = Region(self._take(size), size, length)
        if old is not None:
            for arena in (*self.keys.values(), *self.values.values()):
                arena[:, :, region.base:region.base + length] = arena[:, :, old.base:old.base + length]
            self._release(old.base, old.size)
        self.regions[request] = region
        return region

    def _take(self, size: int) -> int:
        """The first free run of `size` columns, else new columns at the end (C grows by half at least)."""
        for i, (base, free) in enumerate(self.holes):
            if free >= size:
                self.holes[i:i + 1] = [(base + size, free - size)] if free > size else []
                return base
        base = self.columns_allocated
        if self.holes and self.holes[-1][0] + self.holes[-1][1] == base:  # a free run at the end: extend it
            base = self.holes.pop()[0]
        grown = max(base + size, self.columns_allocated + self.columns_allocated // 2)
        if grown > base + size:
            self.holes.append((base + size, grown - base - size))
        self._resize(grown)
        return base

    def _resize(self, columns: int) -> None:
        self.columns_allocated = columns
        for table in (self.keys, self.values):
            for layer, arena in table.items():
                table[layer] = self._widen(arena, arena)

    def _release(self, base: int, size: int) -> None:
        """Free columns [base, base + size), merged with free neighbours."""
        runs = sorted(self.holes + [(base, size)])
        merged = [runs[0]]
        for b, s in runs[1:]:
            if merged[-1][0] + merged[-1][1] == b:
                merged[-1] = (merged[-1][0], merged[-1][1] + s)
            else:
                merged.append((b, s))
        self.holes = merged
