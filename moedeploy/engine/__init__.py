"""Serving many requests at once: continuous batching with chunked prefill over a packed KV cache.

    request.py (what a request asks and its state) ─► scheduler.py (who runs this step, how many tokens)
    ─► runner.py (one batched model step over kv.py's packed cache) ─► sampler.py, detok.py ─► engine.py (the loop)
"""

from .engine import ContextTooLong, Engine, EngineConfig, Output, QueueFull, StepStats
from .request import SamplingParams, Update

__all__ = ["ContextTooLong", "Engine", "EngineConfig", "Output", "QueueFull", "SamplingParams", "StepStats", "Update"]
