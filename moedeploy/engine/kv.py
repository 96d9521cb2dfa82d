"""The KV cache of every running request, packed along one sequence.

All running requests share one transformers `DynamicCache` of batch 1: a step's tokens, whichever request
they belong to, are appended as new columns, and `owner` / `pos` record each column's request and position.
The attention mask lets a token see only its own request's columns at positions up to its own, so a
packed step computes what each request would alone, and nothing is padded. A request's columns are
dropped the moment it ends (`free`), so its memory goes with it.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from ..errors import UnsupportedModelError


def check_supported(config) -> None:
    """Refuse what a packed full-attention cache cannot serve exactly, with the reason."""
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{config.model_type} is an encoder-decoder model; the engine serves decoder-only models")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if kinds != {"full_attention"} or sliding:
        raise UnsupportedModelError(f"{config.model_type} uses sliding-window or hybrid attention "
                                    f"({', '.join(sorted(kinds))}); the engine packs full-attention caches only")


class PackedKV:
    def __init__(self, config, device):
        check_supported(config)
        self.config = config
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config)
        if any(isinstance(layer, DynamicSlidingWindowLayer) for layer in self.cache.layers):
            raise UnsupportedModelError(f"{self.config.model_type}: transformers builds a sliding-window cache for it")
        self.owner = torch.empty(0, dtype=torch.long, device=self.device)  # [L] request id of each column
        self.pos = torch.empty(0, dtype=torch.long, device=self.device)  # [L] its position in that request

    @property
    def columns(self) -> int:
        return self.owner.numel()

    def extend(self, owner: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Columns for a step's T tokens (owner, pos: [T]); returns the additive mask [1, 1, T, L + T]."""
        self.owner = torch.cat([self.owner, owner])
        self.pos = torch.cat([self.pos, pos])
        allowed = (owner[:, None] == self.owner[None]) & (self.pos[None] <= pos[:, None])  # [T, L + T]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]

    def free(self, owners: list[int]) -> None:
        """Drop the columns of these requests from every layer."""
        if not owners:
            return
        keep = ~torch.isin(self.owner, torch.tensor(owners, device=self.device))
        if not keep.any():
            self.reset()  # nothing left: give every buffer back
            return
        index = keep.nonzero()[:, 0]
        for layer in self.cache.layers:  # transformers' DynamicLayer keeps [B, H, L, d] tensors as .keys / .values
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys.index_select(-2, index)
                layer.values = layer.values.index_select(-2, index)
        self.owner, self.pos = self.owner[index], self.pos[index]

    def held_by(self, owner: int) -> int:
        return int((self.owner == owner).sum())
