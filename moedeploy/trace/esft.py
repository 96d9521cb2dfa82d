"""Import DeepSeek ESFT expert-score files (deepseek-ai/ESFT, results/expert_scores) as a `Trace`.

Layout: `<domain>/expert_weights_<L>.txt`, MoE layer L = 1..26 of ESFT-vanilla-lite (DeepSeek-V2-Lite
architecture: 64 routed experts, top-6, 2 shared experts not logged). One line per sequence:
the top-6 expert ids of every token, token-major, tab-separated; two tabs; the matching gate weights.
Line n of every layer file is the same sequence.

Imported as: one request per line (numbered across domains in the order given), position = token
index in the line, phase prefill (the authors ran teacher-forced forward passes), step = request,
token id -1 (not logged), domain = the directory name, layer names "layer 1".."layer 26".

This module does not write Parquet (io.py) or analyse (stats.py).

Legend: N = tokens, L = MoE layers, K = experts per token (6).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import TraceError
from .schema import PHASES, Trace, TraceMeta, concat

NUM_EXPERTS = 64  # DeepSeek-V2-Lite routed experts
TOP_K = 6
_FILE = re.compile(r"expert_weights_(\d+)\.txt")

# DeepSeek-V2-Lite's published config (config.json of deepseek-ai/DeepSeek-V2-Lite), for the memory view.
DEEPSEEK_V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
                        n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
                        q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                        topk_method="greedy", n_group=1, topk_group=1, tie_word_embeddings=False,
                        dtype="bfloat16")


def domain_dirs(path: Path) -> list[Path]:
    """`path` itself when it is one domain, else its domain subdirectories, sorted by name."""
    if (path / "expert_weights_1.txt").is_file():
        return [path]
    dirs = sorted(d for d in path.iterdir() if d.is_dir() and (d / "expert_weights_1.txt").is_file())
    if not dirs:
        raise TraceError(f"{path} is not an ESFT directory: no expert_weights_1.txt in it or in its subdirectories")
    return dirs


def read_esft(path: str | Path, num_experts: int = NUM_EXPERTS, top_k: int = TOP_K) -> Trace:
    """All domains under `path` (or the one domain `path` is) as one trace, domains labelled."""
    path = Path(path)
    if not path.is_dir():
        raise TraceError(f"ESFT trace {path} is not a directory")
    dirs = domain_dirs(path)
    files = sum(len(_layer_files(d)) for d in dirs)
    with tqdm(total=files, desc="moedeploy: reading ESFT", unit="file", disable=None, leave=False) as bar:
        traces = [_read_domain(d, num_experts, top_k, bar) for d in dirs]
    return concat(traces)


def _layer_files(domain: Path) -> list[Path]:
    found = {int(m.group(1)): f for f in domain.iterdir() if (m := _FILE.fullmatch(f.name))}
    L = max(found, default=0)
    missing = sorted(set(range(1, L + 1)) - set(found))
    if not found or missing:
        raise TraceError(f"ESFT domain {domain} lacks layer files {missing or [1]} (expected expert_weights_1..{L}.txt)")
    return [found[i] for i in range(1, L + 1)]


def _read_layer(file: Path, num_experts: int, top_k: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """-> tokens per sequence, ids [N, K] int16, weights [N, K] float32."""
    lines = [line for line in file.read_text().split("\n") if line.strip()]
    if not lines:
        raise TraceError(f"ESFT file {file} is empty")
    lengths, ids, weights = [], [], []
    for n, line in enumerate(lines, 1):
        parts = line.split("\t\t")
        if len(parts) != 2:
            raise TraceError(f"{file}:{n}: expected 'ids<TAB><TAB>weights', found {len(parts) - 1} double tabs")
        try:
            i = np.array(parts[0].split("\t"), dtype=np.int64)
            w = np.array(parts[1].split("\t"), dtype=np.float32)
        except ValueError as ex:
            raise TraceError(f"{file}:{n}: not a number ({ex})") from ex
        if len(i) != len(w) or len(i) % top_k:
            raise TraceError(f"{file}:{n}: {len(i)} ids and {len(w)} weights; expected equal multiples of {top_k}")
        if i.min() < 0 or i.max() >= num_experts:
            raise TraceError(f"{file}:{n}: expert id {i.max()} outside 0..{num_experts - 1}")
        lengths.append(len(i) // top_k)
        ids.append(i.astype(np.int16))
        weights.append(w)
    return lengths, np.concatenate(ids).reshape(-1, top_k), np.concatenate(weights).reshape(-1, top_k)


def _read_domain(domain: Path, num_experts: int, top_k: int, bar) -> Trace:
    files = _layer_files(domain)
    lengths = None
    ids, weights = [], []  # L x [N, K]
    for file in files:
        n, i, w = _read_layer(file, num_experts, top_k)
        if lengths is None:
            lengths = n
        elif n != lengths:
            raise TraceError(f"{file} does not line up with {files[0].name}: sequences or their token counts differ")
        ids.append(i)
        weights.append(w)
        bar.update()
    N = sum(lengths)
    request = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)  # [N]
    starts = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    meta = TraceMeta(num_experts=num_experts, top_k=top_k, layer_names=tuple(f"layer {i}" for i in range(1, len(files) + 1)),
                     source=f"ESFT {domain.parent}", family="deepseek_v2",
                     extra={"model": "ESFT-vanilla-lite (DeepSeek-V2-Lite architecture)", "config": DEEPSEEK_V2_LITE})
    return Trace(meta=meta, experts=np.stack(ids, 1), weights=np.stack(weights, 1), request=request,
                 position=(np.arange(N) - starts).astype(np.int32), phase=np.full(N, PHASES.index("prefill"), np.int8),
                 step=request.copy(), token=np.full(N, -1, np.int32), domain=np.zeros(N, np.int16),
                 domains=(domain.name,))
