"""Expert placement over devices, pure NumPy over load statistics:

    trace experts [N, L, K] ─► load.py (per-batch counts [T, L, E])
        ─► policies.py (contiguous, round_robin, greedy, anticorrelation, replicate, migrate) ─► Placement (plan.py)
        ─► evaluate.py (future batches; replicas split per batch by balance.py)
    online.py: re-plan from a sliding window of the past, moves spread over batches; cli.py: `moedeploy place`.

Glossary: a logical expert is the model's expert e; a physical slot s holds one (slots [L, S]); replicas
are the slots of one expert, each with a share of its tokens. The runtime (parallel/) reads a
placement file and calls `balance.balanced`; it never plans.
"""

from .plan import ModelShape, Placement, contiguous, read_placement

__all__ = ["ModelShape", "Placement", "contiguous", "read_placement"]
