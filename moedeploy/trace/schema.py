"""The routing-trace schema, in one place: Parquet columns, file metadata, and the in-memory `Trace`.

On disk a trace is one Parquet file with one row per (token, MoE layer), rows token-major:

    request  position  phase  step  token  domain  layer  experts [K]      weights [K]
    int32    int32     str    int32 int32  str     int16  fixed list int16 fixed list float32

and a JSON object under the schema metadata key `moedeploy.trace` (`TraceMeta`). docs/traces.md is
the user-facing description of every column; keep the two in step.

In memory a trace is dense and token-major (`Trace`): every token of a decoder-only model passes
every MoE layer, so experts and weights are [N, L, K] arrays and the per-token columns are [N].

This module does not read or write files (see `io.py`) and does not record (see `record.py`).

Legend: N = tokens, L = MoE layers, K = experts per token, E = experts per layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import pyarrow as pa

from ..errors import TraceError

SCHEMA_VERSION = 1
META_KEY = b"moedeploy.trace"
PHASES = ("prefill", "decode")  # phase codes 0, 1 in `Trace.phase`

# Column name -> (Arrow type without K, meaning). Fixed-size list columns get K from the metadata.
COLUMNS = {
    "request": (pa.int32(), "request (sequence) id, unique within the trace"),
    "position": (pa.int32(), "position of the token in its request, 0-based, padding not counted"),
    "phase": (pa.dictionary(pa.int8(), pa.string()), "'prefill' (prompt / teacher forcing) or 'decode'"),
    "step": (pa.int32(), "forward step (batch) that computed the token, in processing order"),
    "token": (pa.int32(), "token id; -1 where the source does not say (ESFT)"),
    "domain": (pa.dictionary(pa.int16(), pa.string()), "workload label, e.g. the input file's stem"),
    "layer": (pa.int16(), "MoE layer index 0..L-1 in model order (see metadata layer_names)"),
    "experts": (pa.int16(), "the K expert ids chosen for the token, router order; E marks a dropped pair"),
    "weights": (pa.float32(), "the K gate weights, same order as experts"),
}


@dataclass(frozen=True)
class TraceMeta:
    """What the rows do not say: the model's shape and where the trace came from."""

    num_experts: int  # E; the id E in `experts` marks a pair dropped by capacity
    top_k: int  # K
    layer_names: tuple[str, ...]  # L names, model order (module paths, or "layer 1".. for imports)
    source: str = ""  # model directory or imported data set
    family: str = ""  # model family, when known
    extra: dict = field(default_factory=dict)  # optional: "memory", "profile" (see report.py), notes

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["layer_names"] = list(self.layer_names)
        return json.dumps({"version": SCHEMA_VERSION, **d}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "TraceMeta":
        d = json.loads(raw)
        version = d.pop("version", None)
        if version != SCHEMA_VERSION:
            raise TraceError(f"trace schema version {version!r}; this moedeploy reads version {SCHEMA_VERSION}")
        try:
            return cls(num_experts=int(d["num_experts"]), top_k=int(d["top_k"]),
                       layer_names=tuple(d["layer_names"]), source=d.get("source", ""), family=d.get("family", ""),
                       extra=d.get("extra", {}))
        except (KeyError, TypeError, ValueError) as ex:
            raise TraceError(f"trace metadata is incomplete ({ex!r})") from ex


def arrow_schema(meta: TraceMeta) -> pa.Schema:
    fields = []
    for name, (typ, _) in COLUMNS.items():
        if name in ("experts", "weights"):
            typ = pa.list_(typ, meta.top_k)
        fields.append(pa.field(name, typ, nullable=False))
    return pa.schema(fields, metadata={META_KEY: meta.to_json()})


@dataclass(frozen=True)
class Trace:
    """A dense, token-major routing trace. Tokens are in processing order (step, request, position)."""

    meta: TraceMeta
    experts: np.ndarray  # [N, L, K] int16
    weights: np.ndarray  # [N, L, K] float32
    request: np.ndarray  # [N] int32
    position: np.ndarray  # [N] int32
    phase: np.ndarray  # [N] int8, index into PHASES
    step: np.ndarray  # [N] int32
    token: np.ndarray  # [N] int32, -1 unknown
    domain: np.ndarray  # [N] int16, index into `domains`
    domains: tuple[str, ...] = ("",)

    def __post_init__(self):
        N, L, K = self.experts.shape
        if (L, K) != (self.meta.num_layers, self.meta.top_k) or self.weights.shape != (N, L, K):
            raise TraceError(f"trace arrays {self.experts.shape} / {self.weights.shape} do not match the metadata "
                             f"({self.meta.num_layers} layers, top-{self.meta.top_k})")
        for name in ("request", "position", "phase", "step", "token", "domain"):
            if getattr(self, name).shape != (N,):
                raise TraceError(f"trace column {name} has shape {getattr(self, name).shape}, expected ({N},)")

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    def select(self, mask: np.ndarray) -> "Trace":
        """The tokens where mask [N] is True, in the same order."""
        cols = {n: getattr(self, n)[mask] for n in ("experts", "weights", "request", "position", "phase", "step",
                                                      "token", "domain")}
        return replace(self, **cols)

    def by_domain(self) -> dict[str, "Trace"]:
        """domain name -> the sub-trace of that domain (domains without tokens left out)."""
        return {name: self.select(self.domain == i) for i, name in enumerate(self.domains) if (self.domain == i).any()}


def concat(traces: list[Trace]) -> Trace:
    """Tokens of several traces of the same model shape, one after another; domains merged by name."""
    if not traces:
        raise TraceError("no traces to concatenate")
    first = traces[0].meta
    for t in traces[1:]:
        if (t.meta.num_experts, t.meta.top_k, t.meta.num_layers) != (first.num_experts, first.top_k, first.num_layers):
            raise TraceError(f"traces of different model shapes cannot be combined: {first.num_layers} layers x "
                             f"{first.num_experts} experts, top-{first.top_k} vs {t.meta.num_layers} x "
                             f"{t.meta.num_experts}, top-{t.meta.top_k}")
    domains: list[str] = []
    parts, req_base, step_base = [], 0, 0
    for t in traces:
        remap = np.array([_index(domains, d) for d in t.domains], dtype=np.int16)
        parts.append(dict(experts=t.experts, weights=t.weights, request=t.request + req_base, position=t.position,
                          phase=t.phase, step=t.step + step_base, token=t.token, domain=remap[t.domain]))
        req_base += int(t.request.max(initial=-1)) + 1
        step_base += int(t.step.max(initial=-1)) + 1
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return Trace(meta=first, domains=tuple(domains), **cols)


def _index(items: list[str], item: str) -> int:
    if item not in items:
        items.append(item)
    return items.index(item)
