"""Expert parallelism over `torch.distributed`: the process group and its collectives (`group.py`),
the host-side exchange plan of a layer (`plan.py`), the layer's all-to-all path (`layer.py`), and
what the loader needs per rank (`shard.py`)."""

from .group import Group, close, current, init
from .shard import Sharding

__all__ = ["Group", "Sharding", "close", "current", "init"]
