"""PhiMoE: the sparsemixer router (always two experts), Mixtral-style expert names on disk."""

from __future__ import annotations

from ..routing import SparseMixer
from .base import Family


class Phimoe(Family):
    name = "phimoe"
    model_types = ("phimoe",)

    def rule(self, config, block):
        return SparseMixer(jitter_eps=config.router_jitter_noise)
