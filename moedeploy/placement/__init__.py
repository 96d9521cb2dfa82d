"""Expert placement over devices: which slots hold which experts (`plan.py`), per-batch replica choice
(`balance.py`). Pure NumPy over load statistics."""

from .plan import ModelShape, Placement, contiguous, load

__all__ = ["ModelShape", "Placement", "contiguous", "load"]
