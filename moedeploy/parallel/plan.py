"""Who sends which (token, expert) pair to which rank: the host-side plan of one expert-parallel MoE layer.

Every rank routes every token of the step (the router is small and replicated, and capacity routers
need the whole batch), so every rank can compute every rank's sizes: no count exchange is needed
before the all-to-all. Rank r is the source of a contiguous shard of the step's tokens:

    ids [T, K] ──shard──► rank r's pairs (tokens lo..hi)
         │
         ├─ counts [E] ──balance.balanced──► tokens per slot [S]  (replicas split per batch)
         │
         └─ pairs sorted by expert, global token order ──np.repeat(slots by expert, quota)──► slot of each pair
                  slot ─► rank = slot // P, local slot = slot % P

    send: rank r's pairs ordered by (slot, pair)   recv: every rank's pairs for r, by (source, slot, pair)

Within one slot the rows reach its rank in global token order, so a non-replicated expert computes
exactly the rows, in the order, a single process would.

`gathered` is the other exchange: since every rank holds every token's hidden state, rank r computes
its slots' pairs over all tokens, and one all-gather of the rows replaces the two all-to-alls and the
gather of outputs (one collective per layer instead of three; K times the output rows travel).

Legend: T tokens, K experts per token, E experts, S slots, P slots per rank, W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..placement.balance import balanced


@dataclass(frozen=True)
class Exchange:
    lo: int  # this rank's tokens are lo..hi-1
    hi: int
    send_pairs: np.ndarray  # [Ps] flat pair index t*K + k of each row this rank sends, in send order
    send_splits: list[int]  # [W] rows sent to each rank
    recv_splits: list[int]  # [W] rows received from each rank
    recv_slots: np.ndarray  # [Pr] local slot of each received row, receive order
    slot_tokens: np.ndarray  # [S] pairs each slot computes in this step (the replicas' split)


def shard(T: int, world: int, rank: int) -> tuple[int, int]:
    """Rank r's contiguous share of T tokens: lo..hi-1 (sizes differ by at most one)."""
    return rank * T // world, (rank + 1) * T // world


def _assign(ids: np.ndarray, slots: np.ndarray, world: int, num_experts: int):
    """ids [T, K] -> valid [V] flat pair indices (dropped pairs left out), slot [V] of each pair, quota [S]
    pairs per slot (the per-batch replica split)."""
    flat = ids.reshape(-1).astype(np.int64, copy=False)  # [T*K]
    valid = np.flatnonzero(flat < num_experts)  # dropped pairs go nowhere
    experts = flat[valid]
    quota = balanced(np.bincount(experts, minlength=num_experts), slots, world)  # [S]
    by_expert = np.argsort(experts, kind="stable")  # valid pairs by expert, global order within
    slot_order = np.argsort(slots, kind="stable")  # slots grouped by expert, ascending
    slot = np.empty_like(experts)
    slot[by_expert] = np.repeat(slot_order, quota[slot_order])  # [V] the slot of each valid pair
    return valid, slot, quota


def exchange(ids: np.ndarray, slots: np.ndarray, world: int, rank: int, num_experts: int) -> Exchange:
    """ids [T, K] (E marks a dropped pair), slots [S] the layer's placement -> this rank's Exchange."""
    T, K = ids.shape
    P = slots.shape[0] // world
    valid, slot, quota = _assign(ids, slots, world, num_experts)
    dest = slot // P
    starts = np.array([shard(T, world, r)[0] for r in range(world)])  # [W]
    source = np.searchsorted(starts, valid // K, side="right") - 1  # the rank whose shard holds the pair's token
    lo, hi = shard(T, world, rank)
    mine = np.flatnonzero(source == rank)
    mine = mine[np.lexsort((valid[mine], slot[mine]))]  # by slot, then pair
    to_me = np.flatnonzero(dest == rank)
    to_me = to_me[np.lexsort((valid[to_me], slot[to_me], source[to_me]))]  # by source, slot, pair
    return Exchange(
        lo=lo, hi=hi,
        send_pairs=valid[mine],
        send_splits=np.bincount(dest[mine], minlength=world).tolist(),
        recv_splits=np.bincount(source[to_me], minlength=world).tolist(),
        recv_slots=slot[to_me] % P,
        slot_tokens=quota,
    )


@dataclass(frozen=True)
class Gathered:
    pairs: np.ndarray  # [V] every routed pair's flat index t*K + k, by computing rank, then slot, then pair
    sizes: list[int]  # [W] pairs each rank computes (its stretch of `pairs`)
    slots: np.ndarray  # [V] the local slot of each pair on its rank
    slot_tokens: np.ndarray  # [S] pairs each slot computes in this step


def gathered(ids: np.ndarray, slots: np.ndarray, world: int, num_experts: int) -> Gathered:
    """The all-gather exchange: every rank computes its slots' pairs over every token (it holds them all),
    and the rows are gathered everywhere. ids [T, K], slots [S] -> who computes which pair, in what order
    (per slot the pairs in global token order, as in `exchange` and in one process)."""
    P = slots.shape[0] // world
    valid, slot, quota = _assign(ids, slots, world, num_experts)
    order = np.lexsort((valid, slot))  # by slot (so by rank: slot = rank * P + local), then pair
    return Gathered(pairs=valid[order], sizes=np.bincount(slot[order] // P, minlength=world).tolist(),
                    slots=slot[order] % P, slot_tokens=quota)
