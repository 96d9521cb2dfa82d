"""Workload characterisation of routing traces: pure NumPy functions over expert-id arrays.

    load [L, E] ──skew()──────────► Gini, entropy, top-quarter share per layer
    experts [N, L, K] ──coverage()──► distinct experts a batch of b tokens touches (idle = E - distinct)
                      ──locality()──► reuse distance; hit rate of Belady's optimal cache and of LRU vs size
                      ──coactivation()► how well layer l's experts predict layer l+1's
    load_a, load_b ──domain_shift()─► which hot experts differ between two workloads

Every function takes arrays and returns a frozen dataclass of arrays; nothing here reads files, plots
or knows about models. Results keep full precision; report.py rounds.

Per-token analyses (coverage, locality, per-token co-activation) need per-token traces (recorded,
Parquet, ESFT). Aggregate counts (OLMoE) support load, skew, domain shift and the pairwise
co-activation measure only.

Legend: N = tokens in processing order, L = MoE layers, K = experts per token, E = experts per layer,
B = batch sizes, C = cache sizes. An expert id equal to E marks a dropped pair and is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm


# -- load and skew -------------------------------------------------------------------------------------
def expert_load(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """experts [N, L, K] -> load [L, E]: (token, expert) pairs per expert, dropped pairs not counted."""
    N, L, K = experts.shape
    flat = experts.transpose(1, 0, 2).reshape(L, -1).astype(np.int64) + np.arange(L)[:, None] * (num_experts + 1)
    return np.bincount(flat.ravel(), minlength=L * (num_experts + 1)).reshape(L, num_experts + 1)[:, :num_experts]


def gini(x: np.ndarray) -> np.ndarray:
    """Gini coefficient over the last axis: x [..., E] >= 0 -> [...]. 0 = perfectly even, (E-1)/E = one expert."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=-1)
    E = x.shape[-1]
    total = x.sum(-1)
    ranks = np.arange(1, E + 1)
    # G = sum_i (2i - E - 1) x_(i) / (E * sum x), x sorted ascending
    return np.divide(((2 * ranks - E - 1) * x).sum(-1), E * total, out=np.zeros_like(total), where=total > 0)


@dataclass(frozen=True)
class Skew:
    gini: np.ndarray  # [L]
    entropy_bits: np.ndarray  # [L] entropy of the load distribution
    normalized_entropy: np.ndarray  # [L] entropy / log2(E); 1 = even
    top_quarter_share: np.ndarray  # [L] share of pairs taken by the busiest E/4 experts (even: 0.25)
    max_over_mean: np.ndarray  # [L] busiest expert's load / mean load (what a static placement must absorb)


def skew(load: np.ndarray) -> Skew:
    """load [L, E] -> Skew (each field [L])."""
    load = np.asarray(load, dtype=np.float64)
    E = load.shape[-1]
    total = load.sum(-1, keepdims=True)
    p = np.divide(load, total, out=np.zeros_like(load), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log2(p), 0.0).sum(-1)
    quarter = max(E // 4, 1)
    top = np.sort(p, -1)[:, ::-1][:, :quarter].sum(-1)
    mean = load.mean(-1)
    return Skew(gini=gini(load), entropy_bits=entropy, normalized_entropy=entropy / np.log2(E) if E > 1 else entropy,
                top_quarter_share=top, max_over_mean=np.divide(load.max(-1), mean, out=np.zeros_like(mean), where=mean > 0))


# -- batch coverage (idle experts) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Coverage:
    batch_sizes: np.ndarray  # [B]
    contiguous: np.ndarray  # [B, L] mean distinct experts in batches of b consecutive tokens (a prompt)
    random: np.ndarray  # [B, L] ... of b tokens drawn at random over the trace (a decode batch of b requests)
    uniform: np.ndarray  # [B] expected distinct experts if routing were uniform: E (1 - (1 - K/E)^b)
    num_experts: int


def _distinct(experts: np.ndarray, num_experts: int, b: int) -> np.ndarray:
    """experts [N, L, K] -> [L] mean number of distinct experts in consecutive chunks of b tokens."""
    N, L, K = experts.shape
    n = N // b
    chunk = experts[: n * b].reshape(n, b, L, K)
    present = np.zeros((n, L, num_experts + 1), bool)  # [n, L, E+1], the last column catches dropped pairs
    present[np.arange(n)[:, None, None, None], np.arange(L)[None, None, :, None], chunk] = True
    return present[..., :num_experts].sum(-1).mean(0)


def coverage(experts: np.ndarray, num_experts: int, batch_sizes=None, seed: int = 0) -> Coverage:
    """Distinct experts touched by a batch, as the batch grows. experts [N, L, K]."""
    N, L, K = experts.shape
    if batch_sizes is None:
        batch_sizes = [b for b in 2 ** np.arange(0, 13) if b <= N]
    batch_sizes = np.array([b for b in batch_sizes if 1 <= b <= N], dtype=np.int64)
    shuffled = experts[np.random.default_rng(seed).permutation(N)]
    contiguous = np.stack([_distinct(experts, num_experts, int(b)) for b in batch_sizes])
    random = np.stack([_distinct(shuffled, num_experts, int(b)) for b in batch_sizes])
    uniform = num_experts * (1 - (1 - K / num_experts) ** batch_sizes.astype(np.float64))
    return Coverage(batch_sizes, contiguous, random, uniform, num_experts)


# -- temporal locality -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Locality:
    cache_sizes: np.ndarray  # [C] experts per layer the cache holds (all >= K)
    belady: np.ndarray  # [C, L] hit rate of Belady's optimal (offline) cache, cold start
    lru: np.ndarray  # [C, L] hit rate of LRU (from stack distances), cold start
    reuse_percentiles: np.ndarray  # [3, L] 50th, 90th, 99th percentile of reuse distance in tokens
    reuse_histogram: np.ndarray  # [H, L] reuse distances (tokens) per log2 bin: [1], [2,3], [4,7], ...
    mean_reuse: np.ndarray  # [L, E] mean tokens between two uses of each expert (nan: used at most once)
    accesses: int  # N * K per layer (hit rates are hits / accesses; dropped pairs count as accesses)


def default_cache_sizes(num_experts: int, top_k: int) -> np.ndarray:
    sizes = {top_k, num_experts} | {int(round(num_experts * f)) for f in (1 / 8, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4)}
    return np.array(sorted(s for s in sizes if top_k <= s <= num_experts), dtype=np.int64)


def _next_and_prev(ids: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer, ids [N, K] -> next use after t [N, K] (N if never), previous use before t [N, K] (-1 if
    none), and next_incl [N+1, E]: the first use of each expert at or after time t (N if none)."""
    N, K = ids.shape
    t = np.arange(N)
    used = np.zeros((N + 1, num_experts + 1), bool)  # [N+1, E+1]; the last row and column are sentinels
    used[t[:, None], ids] = True
    at = np.where(used, np.arange(N + 1)[:, None], N)
    next_incl = np.minimum.accumulate(at[::-1], axis=0)[::-1]  # [N+1, E+1]
    last_incl = np.maximum.accumulate(np.where(used, np.arange(N + 1)[:, None], -1), axis=0)  # [N+1, E+1]
    nxt = next_incl[t[:, None] + 1, ids]  # [N, K]
    prev = np.where(t[:, None] > 0, last_incl[np.maximum(t - 1, 0)[:, None], ids], -1)  # [N, K]
    return nxt, prev, next_incl[:, :num_experts]


def _lru_distance(ids: np.ndarray, prev: np.ndarray, next_incl: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """LRU stack distance of every access: distinct other experts used strictly between its previous use
    and now. ids, prev [N, K]; -> [N, K], -1 for first uses."""
    N, K = ids.shape
    out = np.full((N, K), -1, np.int64)
    t = np.arange(N)
    for s in range(0, N, chunk):
        p = prev[s:s + chunk]  # [n, K]
        rows = next_incl[np.maximum(p, 0) + 1]  # [n, K, E] first use of each expert after the previous use
        between = rows < t[s:s + chunk, None, None]  # used in (prev, t)
        d = between.sum(-1)  # the expert itself is not used in (prev, t), so it is not counted
        out[s:s + chunk] = np.where(p >= 0, d, -1)
    return out


def _belady(experts: np.ndarray, nxt: np.ndarray, first: np.ndarray, num_experts: int, sizes: np.ndarray,
            progress: bool) -> np.ndarray:
    """Hits of Belady's MIN for every cache size and layer at once, a token's K experts at a time.

    experts, nxt [N, L, K]; first [L, E] first use of each expert; -> hits [C, L].
    At each token the K needed experts must all be resident: misses are loaded, and if the cache
    overflows, the resident experts not needed now whose next use is furthest away are evicted.
    """
    N, L, K = experts.shape
    E, C = num_experts, len(sizes)
    lidx = np.arange(L)[:, None]  # [L, 1]
    cached = np.zeros((C, L, E + 1), bool)  # [C, L, E+1]; column E (dropped pairs) is never cached
    next_use = np.broadcast_to(np.append(first, np.full((L, 1), N), 1), (C, L, E + 1)).copy()  # [C, L, E+1]
    hits = np.zeros((C, L), np.int64)
    cap = sizes[:, None]  # [C, 1]
    rank = np.arange(E + 1)
    for t in tqdm(range(N), desc="moedeploy: Belady cache", unit="token", disable=None if progress else True,
                  leave=False, mininterval=1.0):
        ids = experts[t]  # [L, K]
        hit = cached[:, lidx, ids]  # [C, L, K]
        hits += hit.sum(-1)
        need = np.zeros((L, E + 1), bool)
        need[lidx, ids] = True
        need[:, E] = False
        n_miss = need.sum(-1) - hit.sum(-1)  # [C, L] (dropped pairs are not loaded)
        n_evict = cached.sum(-1) + n_miss - cap  # [C, L]
        if (n_evict > 0).any():
            score = np.where(cached & ~need, next_use, -1)  # [C, L, E+1]
            order = np.argsort(-score, axis=-1, kind="stable")  # furthest next use first
            evict = np.zeros_like(cached)
            np.put_along_axis(evict, order, rank < n_evict[..., None], -1)
            cached &= ~evict
        cached |= need
        next_use[:, lidx, ids] = nxt[t]
    return hits


def locality(experts: np.ndarray, num_experts: int, cache_sizes=None, progress: bool = True) -> Locality:
    """Temporal locality of each layer's expert stream, tokens taken in trace order. experts [N, L, K]."""
    N, L, K = experts.shape
    E = num_experts
    sizes = default_cache_sizes(E, K) if cache_sizes is None else np.array(sorted(cache_sizes), dtype=np.int64)
    if len(sizes) == 0 or sizes.min() < K:
        raise ValueError(f"cache sizes must be at least top-k = {K} (a token's experts must fit), got {sizes.tolist()}")
    ids = experts.astype(np.int64)
    nxt = np.empty((N, L, K), np.int64)
    first = np.empty((L, E), np.int64)
    lru = np.zeros((len(sizes), L))
    H = max(int(np.ceil(np.log2(max(N, 2)))) + 1, 1)
    hist = np.zeros((H, L), np.int64)
    pct = np.full((3, L), np.nan)
    mean_reuse = np.full((L, E), np.nan)
    for l in range(L):
        n, prev, next_incl = _next_and_prev(ids[:, l], E)
        nxt[:, l], first[l] = n, next_incl[0]
        valid = ids[:, l] < E
        dist = _lru_distance(ids[:, l], prev, next_incl)  # [N, K]
        for c, size in enumerate(sizes):
            lru[c, l] = ((dist >= 0) & (dist < size) & valid).sum() / (N * K)
        gaps = (np.arange(N)[:, None] - prev)[(prev >= 0) & valid]  # tokens since the last use
        if gaps.size:
            hist[:, l] = np.bincount(np.floor(np.log2(gaps)).astype(np.int64), minlength=H)[:H]
            pct[:, l] = np.percentile(gaps, [50, 90, 99])
            sums = np.bincount(ids[:, l][(prev >= 0) & valid], weights=gaps, minlength=E)[:E]
            counts = np.bincount(ids[:, l][(prev >= 0) & valid], minlength=E)[:E]
            mean_reuse[l] = np.divide(sums, counts, out=np.full(E, np.nan), where=counts > 0)
    belady = _belady(ids, nxt, first, E, sizes, progress) / (N * K)
    return Locality(sizes, belady, lru, pct, hist, mean_reuse, N * K)


# -- cross-layer co-activation ---------------------------------------------------------------------------
def cooccurrence(a: np.ndarray, b: np.ndarray, num_experts: int) -> np.ndarray:
    """a, b [N, K] experts of the same tokens at two layers -> counts [E, E]: tokens using e at a and e' at b."""
    E = num_experts
    pairs = (a[:, :, None].astype(np.int64) * (E + 1) + b[:, None, :]).ravel()  # every (e, e') of a token
    return np.bincount(pairs, minlength=(E + 1) ** 2).reshape(E + 1, E + 1)[:E, :E]


def pairwise_accuracy(co: np.ndarray, k: int) -> float:
    """Share of co-activations (e at l, e' at l') where e' is among the k most frequent partners of e.
    co [E, E] -> float. Works on aggregate counts too (OLMoE's cross-layer counts)."""
    top = np.sort(co, axis=1)[:, ::-1][:, :k]
    total = co.sum()
    return float(top.sum() / total) if total else float("nan")


@dataclass(frozen=True)
class CoActivation:
    predictor: np.ndarray  # [L-1] accuracy of predicting layer l+1's K experts from layer l's (held-out tokens)
    frequency: np.ndarray  # [L-1] the same for a static guess: layer l+1's K most used experts
    pairwise: np.ndarray  # [L-1] pairwise_accuracy of the l -> l+1 co-occurrence counts (all tokens)
    train_tokens: int
    test_tokens: int


def coactivation(experts: np.ndarray, num_experts: int, train: np.ndarray) -> CoActivation:
    """How well layer l's experts predict layer l+1's. experts [N, L, K]; train [N] bool marks the tokens
    the co-occurrence counts are built from; accuracy = |predicted top-K ∩ actual| / K on the others."""
    N, L, K = experts.shape
    E = num_experts
    test = ~train
    pred_acc, freq_acc, pair_acc = np.zeros(L - 1), np.zeros(L - 1), np.zeros(L - 1)
    for l in range(L - 1):
        a, b = experts[:, l].astype(np.int64), experts[:, l + 1].astype(np.int64)
        co = cooccurrence(a[train], b[train], E).astype(np.float64)  # [E, E]
        pair_acc[l] = pairwise_accuracy(cooccurrence(a, b, E), K)
        co_padded = np.vstack([co, np.zeros((1, E))])  # dropped id E contributes nothing
        score = co_padded[a[test]].sum(1)  # [n, E]
        guess = np.argsort(-score, axis=1, kind="stable")[:, :K]  # [n, K]
        pred_acc[l] = _overlap(guess, b[test], E) / K
        hot = np.argsort(-np.bincount(b[train].ravel(), minlength=E + 1)[:E], kind="stable")[:K]
        freq_acc[l] = _overlap(np.broadcast_to(hot, (int(test.sum()), K)), b[test], E) / K
    return CoActivation(pred_acc, freq_acc, pair_acc, int(train.sum()), int(test.sum()))


def _overlap(guess: np.ndarray, actual: np.ndarray, num_experts: int) -> float:
    """Mean |guess ∩ actual| per row. guess [n, K'], actual [n, K]."""
    if len(actual) == 0:
        return float("nan")
    hit = (guess[:, :, None] == actual[:, None, :]) & (actual[:, None, :] < num_experts)
    return float(hit.any(1).sum(1).mean())


# -- domain shift ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainShift:
    hot: int  # experts per layer in a "hot set" (the busiest E/4)
    jaccard: np.ndarray  # [L] |hot_a ∩ hot_b| / |hot_a ∪ hot_b|
    total_variation: np.ndarray  # [L] 0.5 * sum |p_a - p_b| of the load distributions
    transfer_coverage: np.ndarray  # [L] share of b's load that a's hot set serves
    own_coverage: np.ndarray  # [L] share of b's load that b's own hot set serves (the best static choice)
    only_a: tuple  # L tuples: hot experts of a that are not hot in b
    only_b: tuple  # L tuples: hot experts of b that are not hot in a


def _hot(load: np.ndarray, n: int) -> np.ndarray:
    return np.argsort(-load, axis=-1, kind="stable")[:, :n]  # [L, n]


def domain_shift(load_a: np.ndarray, load_b: np.ndarray, hot: int | None = None) -> DomainShift:
    """Compare two workloads' expert load. load_a, load_b [L, E] -> DomainShift (fields [L])."""
    load_a, load_b = np.asarray(load_a, np.float64), np.asarray(load_b, np.float64)
    L, E = load_a.shape
    n = hot or max(E // 4, 1)
    ha, hb = _hot(load_a, n), _hot(load_b, n)
    pa = load_a / np.maximum(load_a.sum(-1, keepdims=True), 1)
    pb = load_b / np.maximum(load_b.sum(-1, keepdims=True), 1)
    sa, sb = [set(r.tolist()) for r in ha], [set(r.tolist()) for r in hb]
    return DomainShift(
        hot=n,
        jaccard=np.array([len(x & y) / len(x | y) for x, y in zip(sa, sb)]),
        total_variation=0.5 * np.abs(pa - pb).sum(-1),
        transfer_coverage=np.take_along_axis(pb, ha, -1).sum(-1),
        own_coverage=np.take_along_axis(pb, hb, -1).sum(-1),
        only_a=tuple(tuple(sorted(x - y)) for x, y in zip(sa, sb)),
        only_b=tuple(tuple(sorted(y - x)) for x, y in zip(sa, sb)),
    )
