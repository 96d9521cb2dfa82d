"""Reading and writing routing traces, and telling formats apart.

    write_trace(Trace, path)    -> Parquet, one row per (token, layer) (schema.py, docs/traces.md)
    read_trace(path)            -> Trace, from Parquet only
    open_trace(path)            -> Trace or AggregateLoad, whatever `path` holds:
        *.parquet (or any file starting with PAR1)  a moedeploy trace
        a directory of expert_weights_<L>.txt       one ESFT domain (esft.py)
        a directory of such directories             several ESFT domains
        an OLMoE counts directory or JSON file       aggregate load only (olmoe.py)
    load_trace(path)            -> Trace, or a TraceError when the source is aggregate-only

Every way a file can be wrong (missing, empty, truncated, not Parquet, wrong columns or types,
layers missing for some tokens) ends in a `TraceError` that names the file and the problem.

This module does not analyse anything (stats.py) and does not record (record.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import replaced
from ..errors import TraceError
from .schema import COLUMNS, META_KEY, PHASES, Trace, TraceMeta, arrow_schema

MAGIC = b"PAR1"
REQUIRED = ("request", "position", "layer", "experts", "weights")  # the rest have defaults (docs/traces.md)


def write_trace(trace: Trace, path: str | Path) -> Path:
    """Write `trace` as Parquet (zstd). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    N, L, K = trace.experts.shape
    per_token = lambda a: np.repeat(a, L)  # noqa: E731  [N] -> [N*L], token-major rows
    cols = {
        "request": pa.array(per_token(trace.request).astype(np.int32)),
        "position": pa.array(per_token(trace.position).astype(np.int32)),
        "phase": pa.DictionaryArray.from_arrays(pa.array(per_token(trace.phase).astype(np.int8)), pa.array(PHASES)),
        "step": pa.array(per_token(trace.step).astype(np.int32)),
        "token": pa.array(per_token(trace.token).astype(np.int32)),
        "domain": pa.DictionaryArray.from_arrays(pa.array(per_token(trace.domain).astype(np.int16)),
                                                 pa.array(list(trace.domains), pa.string())),
        "layer": pa.array(np.tile(np.arange(L, dtype=np.int16), N)),
        "experts": pa.FixedSizeListArray.from_arrays(pa.array(trace.experts.reshape(-1).astype(np.int16)), K),
        "weights": pa.FixedSizeListArray.from_arrays(pa.array(trace.weights.reshape(-1).astype(np.float32)), K),
    }
    table = pa.Table.from_arrays(list(cols.values()), schema=arrow_schema(trace.meta))
    with replaced(path) as f:
        pq.write_table(table, f, compression="zstd")
    return path


def _check_file(path: Path) -> None:
    if not path.exists():
        raise TraceError(f"trace {path} does not exist")
    if path.is_dir():
        raise TraceError(f"trace {path} is a directory, not a Parquet file")
    size = path.stat().st_size
    if size == 0:
        raise TraceError(f"trace {path} is empty (0 bytes)")
    with path.open("rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if head != MAGIC:
        raise TraceError(f"trace {path} is not a Parquet file (it does not start with PAR1)")
    if tail != MAGIC or size < 12:
        raise TraceError(f"trace {path} is truncated or corrupt: its Parquet footer is missing")


def read_trace(path: str | Path) -> Trace:
    """Read a Parquet routing trace; rows may come in any order (e.g. rewritten by DuckDB)."""
    path = Path(path)
    _check_file(path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as ex:
        raise TraceError(f"trace {path} is unreadable Parquet (truncated or corrupt?): {ex}") from ex
    return _from_table(table, path)


def _int_column(table: pa.Table, name: str, path: Path, default=None) -> np.ndarray:
    if name not in table.column_names:
        if default is None:
            raise TraceError(f"trace {path} has no column {name!r}; a trace needs {', '.join(REQUIRED)}")
        return np.full(table.num_rows, default, np.int64)
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise TraceError(f"trace {path}: column {name!r} is {col.type}, expected an integer "
                         f"({COLUMNS[name][0]}): wrong schema")
    return col.to_numpy().astype(np.int64)


def _list_column(table: pa.Table, name: str, path: Path, kind) -> tuple[np.ndarray, int]:
    """A list column as [rows, K]; K from a fixed-size type or from equal list lengths."""
    if name not in table.column_names:
        raise TraceError(f"trace {path} has no column {name!r}; a trace needs {', '.join(REQUIRED)}")
    col = table.column(name).combine_chunks()
    typ = col.type
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) \
            or not kind(typ.value_type):
        raise TraceError(f"trace {path}: column {name!r} is {typ}, expected a list of "
                         f"{'integers' if name == 'experts' else 'floats'}: wrong schema")
    if col.null_count:
        raise TraceError(f"trace {path}: column {name!r} has null rows")
    if pa.types.is_fixed_size_list(typ):
        K = typ.list_size
    else:
        lengths = col.value_lengths().to_numpy()
        K = int(lengths[0]) if len(lengths) else 0
        if (lengths != K).any():
            raise TraceError(f"trace {path}: rows of {name!r} have different lengths; every row needs K entries")
    values = col.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(-1, K) if K else values.reshape(len(col), 0), K


def _categories(table: pa.Table, name: str, path: Path, known: tuple[str, ...] | None) -> tuple[np.ndarray, tuple]:
    """A string or dictionary column as (codes [rows], names); codes index `known` when given."""
    if name not in table.column_names:
        return np.zeros(table.num_rows, np.int64), known or ("",)
    col = table.column(name).combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise TraceError(f"trace {path}: column {name!r} is {col.type}, expected strings: wrong schema")
    encoded = col.dictionary_encode()
    codes = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    names = tuple(encoded.dictionary.to_pylist())
    if known is None:
        return codes, names
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TraceError(f"trace {path}: column {name!r} has the value {unknown[0]!r}; expected one of {known}")
    return np.array([known.index(n) for n in names], np.int64)[codes], known


def _from_table(table: pa.Table, path: Path) -> Trace:
    if table.num_rows == 0:
        raise TraceError(f"trace {path} has no rows")
    raw_meta = (table.schema.metadata or {}).get(META_KEY)
    experts, K = _list_column(table, "experts", path, pa.types.is_integer)
    weights, Kw = _list_column(table, "weights", path, pa.types.is_floating)
    if K != Kw or K == 0:
        raise TraceError(f"trace {path}: experts have {K} entries per row, weights {Kw}")
    layer = _int_column(table, "layer", path)
    request = _int_column(table, "request", path)
    position = _int_column(table, "position", path)
    step = _int_column(table, "step", path, default=-1)
    if "step" not in table.column_names:
        step = request.copy()  # without steps, each request is its own step
    token = _int_column(table, "token", path, default=-1)
    phase, _ = _categories(table, "phase", path, PHASES)
    domain, domains = _categories(table, "domain", path, None)
    if raw_meta is not None:
        meta = TraceMeta.from_json(raw_meta)
    else:  # written by another tool: infer the shape from the rows
        L = int(layer.max()) + 1
        meta = TraceMeta(num_experts=int(experts.max()) + 1, top_k=K, layer_names=tuple(f"layer {i}" for i in range(L)),
                         source=str(path), extra={"note": "no moedeploy metadata; shape inferred from the rows"})
    L = meta.num_layers
    if K != meta.top_k:
        raise TraceError(f"trace {path}: rows have {K} experts each, the metadata says top-{meta.top_k}")
    if layer.min() < 0 or layer.max() >= L:
        raise TraceError(f"trace {path}: layer ids run {layer.min()}..{layer.max()}, the model has {L} MoE layers")
    if experts.min() < 0 or experts.max() > meta.num_experts:
        raise TraceError(f"trace {path}: expert ids run {experts.min()}..{experts.max()}, "
                         f"the model has {meta.num_experts} experts")
    order = np.lexsort((layer, position, request, step))  # processing order, layers inside each token
    if len(order) % L or (layer[order] != np.tile(np.arange(L), len(order) // L)).any():
        raise TraceError(f"trace {path}: some tokens lack some of the {L} MoE layers (truncated rows?)")
    first = order[::L]  # [N] the first row of each token
    for name, col in (("request", request), ("position", position), ("step", step)):
        if (col[order].reshape(-1, L) != col[first][:, None]).any():
            raise TraceError(f"trace {path}: the {L} layer rows of a token disagree on {name}")
    N = len(first)
    return Trace(
        meta=meta,
        experts=experts[order].reshape(N, L, K).astype(np.int16),
        weights=weights[order].reshape(N, L, K).astype(np.float32),
        request=request[first].astype(np.int32), position=position[first].astype(np.int32),
        phase=phase[first].astype(np.int8), step=step[first].astype(np.int32), token=token[first].astype(np.int32),
        domain=domain[first].astype(np.int16), domains=domains,
    )


def detect(path: str | Path) -> str:
    """'parquet', 'esft' or 'olmoe' for what `path` holds; TraceError when none fits."""
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace {path} does not exist")
    if path.is_file():
        if path.suffix == ".json" and path.parent.name.startswith("expert_counts"):
            return "olmoe"
        if path.suffix == ".txt" and path.name.startswith("expert_weights_"):
            raise TraceError(f"{path} is one ESFT layer file; pass its domain directory ({path.parent})")
        return "parquet"  # read_trace says precisely what is wrong with it
    if (path / "expert_weights_1.txt").is_file() or any((d / "expert_weights_1.txt").is_file() for d in path.iterdir()
                                                         if d.is_dir()):
        return "esft"
    if (path / "expert_counts").is_dir() or path.name.startswith("expert_counts"):
        return "olmoe"
    raise TraceError(f"{path} holds no trace moedeploy knows: give a Parquet trace, an ESFT domain directory "
                     f"(expert_weights_<L>.txt), or an OLMoE routing-counts directory")


def open_trace(path: str | Path):
    """A `Trace` (Parquet, ESFT) or an `AggregateLoad` (OLMoE counts), detected from `path`."""
    kind = detect(path)
    if kind == "esft":
        from .esft import read_esft

        return read_esft(path)
    if kind == "olmoe":
        from .olmoe import read_olmoe

        return read_olmoe(path)
    return read_trace(path)


def load_trace(path: str | Path) -> Trace:
    """A per-token `Trace` from a Parquet file or ESFT directory; aggregate-only sources are refused."""
    trace = open_trace(path)
    if not isinstance(trace, Trace):
        raise TraceError(f"{path} holds aggregate expert counts, not per-token routing; this command needs "
                         f"a per-token trace (Parquet or ESFT)")
    return trace
