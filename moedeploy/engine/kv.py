"""The KV cache of every running request, each request in its own buffer per layer.

A step packs the tokens of many requests into one sequence ([1, T, D]); `RequestKV` is the transformers `Cache`
the model gets for it. Its `update` splits the step's new keys and values by request (`segments`, set by the
runner), appends each request's rows to that request's buffers (which grow by doubling up to the request's most
tokens), and returns the step's requests' keys one request after another. `attention.py` then lets each request
attend to its own keys only (`spans`): no request sees another's tokens, nothing is padded, and attention costs
what each request would cost alone. A request's buffers are dropped the moment it ends (`free`).

What it does not do: decide who runs (scheduler.py), or sliding-window and hybrid attention (refused).
"""

from __future__ import annotations

import torch
from transformers import Cache

from ..errors import UnsupportedModelError

MIN_CAPACITY = 64  # tokens a request's buffer starts with (or its most tokens, if fewer)
UNLIMITED = 1 << 40


def check_supported(config) -> None:
    """Refuse what per-request full-attention buffers cannot serve exactly, with the reason."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type} is an encoder-decoder model; the engine serves decoder-only models")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if kinds != {"full_attention"} or sliding:
        raise UnsupportedModelError(f"{config.model_type} uses sliding-window or hybrid attention "
                                    f"({', '.join(sorted(kinds))}); the engine serves full-attention models only")


class _Buffer:
    """One request's keys and values in one layer: [1, H, capacity, d], the first `length` columns filled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        self.keys = keys.new_empty((*keys.shape[:2], capacity, keys.shape[3]))
        self.values = values.new_empty((*values.shape[:2], capacity, values.shape[3]))
        self.length = 0

    def append(self, keys: torch.Tensor, values: torch.Tensor, limit: int) -> None:
        n = keys.shape[2]
        end = self.length + n
        if end > self.keys.shape[2]:
            capacity = max(min(2 * self.keys.shape[2], limit), end)
            self.keys = torch.cat([self.keys[:, :, :self.length], keys.new_empty((*keys.shape[:2], capacity - self.length,
                                                                                   keys.shape[3]))], 2)
            self.values = torch.cat([self.values[:, :, :self.length],
                                     values.new_empty((*values.shape[:2], capacity - self.length, values.shape[3]))], 2)
        self.keys[:, :, self.length:end] = keys
        self.values[:, :, self.length:end] = values
        self.length = end


class RequestKV(Cache):
    def __init__(self, config):
        check_supported(config)
        super().__init__(layers=[])
        self.buffers: dict[int, dict[int, _Buffer]] = {}  # layer -> request id -> its buffer
        self.limits: dict[int, int] = {}  # request id -> its most tokens (prompt + max_tokens)
        self.segments: list[tuple[int, int, int]] = []  # this step: (request id, first row, rows), rows contiguous
        self.spans: list[tuple[int, int]] = []  # this step: (first key, keys) of each segment's request in `update`'s result

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Append a step's keys and values [1, H, T, d] to each request's buffers; return every request of the
        step's keys and values so far, one request after another ([1, H, sum of L, d]; `spans` says where each
        is). What the model stores may be a compressed form (DeepSeek's latent): it expands what this returns,
        so attention reads the request's keys from its input, at `spans`."""
        layer = self.buffers.setdefault(layer_idx, {})
        keys, values, spans, offset = [], [], [], 0
        for request, start, n in self.segments:
            limit = self.limits.get(request, UNLIMITED)
            buffer = layer.get(request)
            if buffer is None:
                buffer = layer[request] = _Buffer(key_states, value_states, max(min(MIN_CAPACITY, limit), n))
            buffer.append(key_states[:, :, start:start + n], value_states[:, :, start:start + n], limit)
            keys.append(buffer.keys[:, :, :buffer.length])
            values.append(buffer.values[:, :, :buffer.length])
            spans.append((offset, buffer.length))
            offset += buffer.length
        self.spans = spans
        if len(keys) == 1:
            return keys[0], values[0]  # views: one request needs no copy
        return torch.cat(keys, 2), torch.cat(values, 2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are given per token; no request's length is "the" length

    def free(self, requests: list[int]) -> None:
        """Drop these requests' buffers in every layer."""
        for layer in self.buffers.values():
            for request in requests:
                layer.pop(request, None)
        for request in requests:
            self.limits.pop(request, None)

    def held_by(self, request: int) -> int:
        """Tokens of `request` held (in the first layer)."""
        first = next(iter(self.buffers.values()), {})
        return first[request].length if request in first else 0

    @property
    def columns(self) -> int:
        """Tokens held, over all requests (in the first layer)."""
        return sum(b.length for b in next(iter(self.buffers.values()), {}).values())

    def reset(self) -> None:
        self.buffers.clear()
        self.limits.clear()
        self.segments, self.spans = [], []
