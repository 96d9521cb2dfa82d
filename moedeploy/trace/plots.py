"""Plots of a characterisation (matplotlib, Agg backend: no display needed). One function per figure;
each takes result dataclasses from stats.py / memory.py / profile.py and writes one small PNG.

This module computes nothing: see stats.py. Figures are sized to stay well under 200 KB.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .profile import CATEGORIES  # noqa: E402

_SIZE = (6.4, 3.6)
_DPI = 100


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def load_heatmap(load: np.ndarray, layer_labels: list[str], path: Path, title: str) -> Path:
    """load [L, E] -> heatmap of each layer's load share per expert (1/E is even)."""
    share = load / np.maximum(load.sum(-1, keepdims=True), 1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(6.4, max(2.2, min(0.16 * L + 1.2, 5.5))))
    im = ax.imshow(share * E, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(L // 8, 1)
    ax.set_yticks(range(0, L, step), [layer_labels[i] for i in range(0, L, step)], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="load / mean load")
    return _save(fig, path)


def skew(gini: np.ndarray, top_quarter: np.ndarray, path: Path, title: str, layer_ticks=None) -> Path:
    """gini, top_quarter [L] per layer."""
    fig, ax = plt.subplots(figsize=_SIZE)
    x = np.arange(len(gini)) if layer_ticks is None else np.asarray(layer_ticks)
    ax.plot(x, gini, "o-", label="Gini coefficient")
    ax.plot(x, top_quarter, "s-", label="share of the busiest 25% of experts")
    ax.axhline(0.25, color="grey", lw=0.8, ls=":", label="even load (top-quarter share)")
    ax.set_xlabel("MoE layer")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def coverage(cov, path: Path, title: str) -> Path:
    """Distinct experts per batch (mean over layers) vs batch size."""
    fig, ax = plt.subplots(figsize=_SIZE)
    b = cov.batch_sizes
    ax.plot(b, cov.contiguous.mean(1), "o-", label="consecutive tokens (a prompt)")
    ax.plot(b, cov.random.mean(1), "s-", label="random tokens (a decode batch)")
    ax.plot(b, cov.uniform, "k:", label="uniform routing")
    ax.axhline(cov.num_experts, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("distinct experts touched (mean over layers)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def cache(localities: dict, path: Path, title: str) -> Path:
    """Hit rate vs cache size (mean over layers): Belady solid, LRU dashed, one colour per domain."""
    fig, ax = plt.subplots(figsize=_SIZE)
    for i, (name, loc) in enumerate(localities.items()):
        c = f"C{i}"
        ax.plot(loc.cache_sizes, loc.belady.mean(1), "o-", color=c, label=f"{name or 'trace'}: Belady (optimal)")
        ax.plot(loc.cache_sizes, loc.lru.mean(1), "s--", color=c, label=f"{name or 'trace'}: LRU", alpha=0.8)
    ax.set_xlabel("experts per layer in the cache")
    ax.set_ylabel("hit rate (mean over layers)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def reuse(localities: dict, path: Path, title: str) -> Path:
    """CDF of reuse distance in tokens (all layers), one line per domain."""
    fig, ax = plt.subplots(figsize=_SIZE)
    for i, (name, loc) in enumerate(localities.items()):
        h = loc.reuse_histogram.sum(1)
        edges = 2.0 ** np.arange(len(h))
        ax.step(edges, np.cumsum(h) / max(h.sum(), 1), where="post", color=f"C{i}", label=name or "trace")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens since the same expert was last used (same layer)")
    ax.set_ylabel("share of reuses at most this far")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def coactivation(co, path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=_SIZE)
    x = np.arange(len(co.predictor))
    ax.plot(x, co.predictor, "o-", label="co-activation predictor (layer l -> l+1)")
    ax.plot(x, co.frequency, "s-", label="static guess: l+1's most used experts")
    ax.plot(x, co.pairwise, "^:", label="pairwise: partner among e's top-K")
    ax.set_xlabel("layer pair (l, l+1)")
    ax.set_ylabel("accuracy (share of K experts right)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def matrix(values: np.ndarray, labels: list[str], path: Path, title: str, xlabel: str, ylabel: str) -> Path:
    """A small annotated square matrix (domain x domain)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.4, 1.0 * n + 1.6))
    im = ax.imshow(values, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=30, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if values[i, j] < 0.6 else "black")
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def memory(mem, path: Path, title: str, tokens: int) -> Path:
    """Weights (routed experts vs the rest) next to activations for `tokens` tokens."""
    gib = 2.0 ** 30
    fig, ax = plt.subplots(figsize=_SIZE)
    rest = mem.weight_bytes - mem.expert_bytes
    ax.bar(["weights"], [mem.expert_bytes / gib], label="routed experts")
    ax.bar(["weights"], [rest / gib], bottom=[mem.expert_bytes / gib], label="everything else")
    ax.bar([f"activations\n({tokens} tokens)"], [mem.kv_bytes_per_token * tokens / gib], label="KV cache")
    ax.bar([f"activations\n({tokens} tokens)"], [mem.moe_activation_bytes_per_token * tokens / gib],
           bottom=[mem.kv_bytes_per_token * tokens / gib], label="one MoE layer's buffers")
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def time_shares(ts, path: Path, title: str) -> Path:
    """Stacked per-layer time by category, in milliseconds per profiled step."""
    fig, ax = plt.subplots(figsize=_SIZE)
    ms = ts.seconds * 1e3 / max(ts.steps, 1)  # [L, C]
    bottom = np.zeros(len(ms))
    x = np.arange(len(ms))
    for j, name in enumerate(CATEGORIES):
        if ms[:, j].any():
            ax.bar(x, ms[:, j], bottom=bottom, label=name)
            bottom += ms[:, j]
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("ms per step")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
