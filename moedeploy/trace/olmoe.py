"""Import OLMoE's routing counts (allenai/OLMoE scripts/routing_output, as JSON) as an `AggregateLoad`.

    <model>/expert_counts/<domain>.json             {"0": {expert: tokens}, "7": {...}, "15": {...}}
    <model>/expert_counts_crosslayer/<domain>.json  {"0->7": [[e_at_0, e_at_7, count], ...], "7->15": [...]}
    (and the same under *_top1 for first choices only)

These are aggregate counts, not per-token routing: they support expert load and skew, domain shift,
and the pairwise cross-layer co-activation measure, but not batch coverage, temporal locality or
per-token prediction, which need the order of tokens (stats.py says which is which).

Accepted paths: a model directory (olmoe, mixtral-8x7b, ...), its expert_counts[_top1] directory, or
one domain's JSON file. This module does not analyse anything.

Legend: D = domains, L' = the counted layers (e.g. 0, 7, 15), E = experts, P = counted layer pairs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import TraceError

# Model directory -> (experts, top-k), from the models' configs (see ../shared/data/README.md).
MODELS = {"olmoe": (64, 8), "olmoe-sft": (64, 8), "olmoe-dpo": (64, 8), "mixtral-8x7b": (8, 2)}


@dataclass(frozen=True)
class AggregateLoad:
    source: str
    model: str
    num_experts: int
    top_k: int
    layers: tuple[int, ...]  # the model layers that were counted
    domains: tuple[str, ...]
    load: np.ndarray  # [D, L', E] token-expert pairs per expert
    # domain -> {(layer_a, layer_b): [E, E]}; domains without cross-layer data are absent. Rank-aligned:
    # OLMoE's script zips a token's r-th choice at layer a with its r-th choice at layer b (K pairs per
    # token, choices ranked by router logit), unlike stats.cooccurrence's all K*K pairs.
    cooccurrence: dict


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise TraceError(f"OLMoE counts {path} do not exist")
    if path.stat().st_size == 0:
        raise TraceError(f"OLMoE counts {path} are empty")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as ex:
        raise TraceError(f"OLMoE counts {path} are not valid JSON (truncated?): {ex}") from ex


def _counts(path: Path) -> dict[int, dict[int, int]]:
    raw = _read_json(path)
    try:
        return {int(layer): {int(e): int(n) for e, n in experts.items()} for layer, experts in raw.items()}
    except (AttributeError, TypeError, ValueError) as ex:
        raise TraceError(f"{path}: expected {{layer: {{expert: count}}}}, found something else ({ex})") from ex


def _crosslayer(path: Path, E: int) -> dict[tuple[int, int], np.ndarray]:
    out = {}
    for key, rows in _read_json(path).items():
        try:
            a, b = (int(x) for x in key.split("->"))
            arr = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
        except ValueError as ex:
            raise TraceError(f"{path}: expected {{'a->b': [[e_a, e_b, count], ...]}} ({ex})") from ex
        co = np.zeros((E, E), np.int64)
        np.add.at(co, (arr[:, 0], arr[:, 1]), arr[:, 2])
        out[(a, b)] = co
    return out


def read_olmoe(path: str | Path, top_k: int | None = None) -> AggregateLoad:
    """Counts of every domain under `path` (or the one JSON file `path` is)."""
    path = Path(path)
    if path.is_file():
        files, counts_dir = [path], path.parent
    else:
        counts_dir = path / "expert_counts" if (path / "expert_counts").is_dir() else path
        files = sorted(counts_dir.glob("*.json"))
        if not files:
            raise TraceError(f"{counts_dir} holds no OLMoE count files (*.json)")
    model_dir = counts_dir.parent
    raw = {f.stem: _counts(f) for f in files}
    layers = sorted({layer for per in raw.values() for layer in per})
    known = MODELS.get(model_dir.name)
    E = known[0] if known else 1 + max(e for per in raw.values() for c in per.values() for e in c)
    load = np.zeros((len(raw), len(layers), E), np.int64)
    for d, per in enumerate(raw.values()):
        for layer, experts in per.items():
            for e, n in experts.items():
                if not 0 <= e < E:
                    raise TraceError(f"{counts_dir}: expert id {e} outside 0..{E - 1}")
                load[d, layers.index(layer), e] = n
    cross_dir = model_dir / counts_dir.name.replace("expert_counts", "expert_counts_crosslayer")
    co = {d: _crosslayer(cross_dir / f"{d}.json", E) for d in raw if (cross_dir / f"{d}.json").is_file()}
    if counts_dir.name.endswith("_top1"):
        top_k = 1
    elif top_k is None and known is None:
        raise TraceError(f"unknown OLMoE-format model {model_dir.name!r}: say its top-k (known: {', '.join(MODELS)})")
    K = top_k or known[1]
    return AggregateLoad(source=str(path), model=model_dir.name, num_experts=E, top_k=K, layers=tuple(layers),
                         domains=tuple(raw), load=load, cooccurrence=co)

