"""Per-layer time shares of a MoE model: routing, dispatch, expert compute, combine, shared experts.

`MoELayer.moe` labels its phases with `torch.profiler.record_function` ("moe.route", "moe.dispatch",
"moe.experts", "moe.combine", "moe.shared"; "moe.static" for static gating). `profile_run` runs a
callable under the profiler and attributes the labelled ranges to layers by order: layers run in model
order, each opening with its "moe.route".

Times are host-side (CPU) durations of the labelled ranges. On CPU that is the compute; on CUDA it is
launch time unless the run synchronises. Expert transfers do not exist yet (no expert cache: every
expert is resident), so "transfer" is reported as 0.

This module does not record routing (record.py) and does not plot (plots.py).

Legend: L = MoE layers, C = categories.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch.profiler import ProfilerActivity, profile

from ..errors import TraceError

CATEGORIES = ("route", "dispatch", "experts", "combine", "shared", "static", "transfer")


@dataclass(frozen=True)
class TimeShares:
    layer_names: tuple[str, ...]
    seconds: np.ndarray  # [L, C] time in each category, summed over the profiled steps
    model_seconds: float  # wall time of the profiled run (all layers, attention included)
    steps: int  # forward steps profiled

    def as_dict(self) -> dict:
        return {"layer_names": list(self.layer_names), "categories": list(CATEGORIES),
                "seconds": self.seconds.round(6).tolist(), "model_seconds": round(self.model_seconds, 6),
                "steps": self.steps,
                "note": "host-side durations of record_function ranges; transfer is 0: no expert cache exists yet"}

    @classmethod
    def from_dict(cls, d: dict) -> "TimeShares":
        seconds = np.zeros((len(d["layer_names"]), len(CATEGORIES)))
        for j, name in enumerate(d["categories"]):
            if name in CATEGORIES:
                seconds[:, CATEGORIES.index(name)] = np.asarray(d["seconds"])[:, j]
        return cls(tuple(d["layer_names"]), seconds, float(d["model_seconds"]), int(d["steps"]))


def attribute(events: list[tuple[str, float, float]], layer_names: tuple[str, ...]) -> np.ndarray:
    """events: (label, start, duration in s) of "moe.*" ranges -> seconds [L, C], by order of start."""
    L = len(layer_names)
    out = np.zeros((L, len(CATEGORIES)))
    layer = -1
    for label, _, duration in sorted(events, key=lambda e: e[1]):
        category = label.removeprefix("moe.")
        if category not in CATEGORIES:
            continue
        if category == "route":
            layer += 1
        if layer < 0:
            raise TraceError(f"profiled range {label} ran before any routing; cannot attribute it to a layer")
        out[layer % L, CATEGORIES.index(category)] += duration
    if (layer + 1) % L:
        raise TraceError(f"profiled {layer + 1} routing calls, not a multiple of the {L} MoE layers")
    return out


def profile_run(model, run, steps: int) -> TimeShares:
    """Run `run()` (which makes `steps` forward calls of `model`) under the profiler."""
    names = tuple(model.moedeploy.layers)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    events = [(e.name, e.time_range.start, e.time_range.elapsed_us() / 1e6) for e in prof.events()
              if e.name.startswith("moe.")]
    if not events:
        raise TraceError("the profiled run executed no moedeploy MoE layer")
    return TimeShares(names, attribute(events, names), wall, steps)
