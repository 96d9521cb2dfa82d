"""Expert buffering (Huang et al. 2023, §4.2): only some experts live in device slots, under a budget.

    MoELayer ─ needed experts ─► SlotPool.acquire (policies.py picks victims) ─► copies into slots
             ◄─ slot of each needed expert ─┘

`policies.py` decides which resident expert leaves; `pool.py` owns the slots, their contents, the
copies and the statistics; `budget.py` turns a user's budget into slots. Read-only weights are never
copied back.
"""

from .attach import attach_cache
from .budget import CacheConfig, parse_budget
from .policies import POLICIES, make_policy
from .pool import CacheStats, SlotPool

__all__ = ["attach_cache", "CacheConfig", "parse_budget", "POLICIES", "make_policy", "SlotPool", "CacheStats"]
