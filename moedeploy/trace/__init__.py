"""Routing traces: record which experts every token used, store them as Parquet, import outside traces,
and characterise the workload (load, skew, batch coverage, locality, co-activation, domain shift,
memory, time shares).

    model run ──record.py──► Trace ──io.py──► trace.parquet (schema.py; docs/traces.md)
    ESFT text files ──esft.py──► Trace          OLMoE counts ──olmoe.py──► AggregateLoad
    Trace | AggregateLoad ──stats.py (NumPy)──► results ──plots.py, report.py──► report.md, PNGs, JSON

Glossary: a *request* is one sequence; a *step* is one model forward (a batch); the *phase* says
whether the step was a prefill (prompt, or teacher forcing) or a decode step.
"""

from .io import detect, load_trace, open_trace, read_trace, write_trace
from .record import Recorder, record
from .schema import Trace, TraceMeta

__all__ = ["Trace", "TraceMeta", "Recorder", "record", "read_trace", "write_trace", "open_trace", "load_trace",
           "detect"]
