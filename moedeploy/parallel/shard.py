"""`Sharding`: what the loader needs to build one rank of an expert-parallel model: the group, and the
placement (contiguous when none is given), checked against the model before any expert is read."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import OptionError, PlacementError
from ..placement import ModelShape, Placement, contiguous
from .group import Group
from .layer import EXCHANGES, ExpertParallel


@dataclass(frozen=True)
class Sharding:
    group: Group
    placement: Placement | None = None  # None: contiguous over the group's ranks
    exchange: str = "all_gather"  # how pairs reach their rank's experts and come back (parallel/layer.py)

    def __post_init__(self):
        if self.exchange not in EXCHANGES:
            raise OptionError(f"unknown exchange {self.exchange!r}; choose one of: {', '.join(EXCHANGES)}")

    def resolve(self, model: ModelShape) -> "Sharding":
        """This sharding with a placement for `model`: the given one, checked (layers and experts; top-k
        once a router is built), or the contiguous one."""
        if self.placement is None:
            return replace(self, placement=contiguous(model, self.group.world))
        self.placement.check_model(ModelShape(model.num_layers, model.num_experts, self.placement.model.top_k))
        if self.placement.devices != self.group.world:
            raise PlacementError(f"the placement is for {self.placement.devices} devices but {self.group.world} "
                                 f"ranks run; plan for {self.group.world} (`moedeploy place --devices "
                                 f"{self.group.world}`) or launch {self.placement.devices} ranks")
        return self

    def local(self, layer: int) -> np.ndarray:
        """[P] the experts in this rank's slots of MoE layer `layer`."""
        return self.placement.local(layer, self.group.rank)

    def layer(self, layer: int) -> ExpertParallel:
        """MoE layer `layer`'s expert-parallel path."""
        return ExpertParallel(self.group, self.placement.slots[layer], self.placement.model.num_experts, self.exchange)

