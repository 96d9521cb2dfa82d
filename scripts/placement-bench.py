"""Expert placement: planning time at DeepSeek-V3 size, replicate vs DeepSeek's EPLB rule on ESFT traces, and
the per-batch replica split against its optimum.
The numbers in docs/benchmarks.md ("Expert placement") came from this script.

    PYTHONPATH=. python scripts/placement-bench.py [ESFT_DIR] [--json]

Split vs optimum: balance.balanced's busiest device against the exact fractional optimum of the split (the
LP SGLang solves), rounded up to whole tokens, on the same replicated placements and batches.

Timing: 58 layers x 256 experts, 288 slots on 32 devices, random Pareto loads (plan time does not depend
on the values), median of 7 runs after a warm-up. Anti-correlation also gets a [64, 58, 256] series.

EPLB: DeepSeek's global policy (github.com/deepseek-ai/EPLB, eplb.py, `rebalance_experts` with one group,
one node), re-implemented here from its description: the same replica rule as `replica_counts`
(largest load / replicas first), then replicas heaviest first to the least-loaded GPU with room, two
replicas of one expert on one GPU allowed (moedeploy's placements forbid it). Both are scored with the
fixed even split (fractional tokens, EPLB's runtime assumption), and replicate also with balance.balanced.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from moedeploy.placement import policies
from moedeploy.placement.evaluate import evaluate
from moedeploy.placement.load import LoadStats, batch_counts
from moedeploy.placement.plan import ModelShape

ESFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "esft-deepseek-v2-lite"


def timing() -> dict:
    rng = np.random.default_rng(0)
    model = ModelShape(58, 256, 8)
    load = rng.pareto(1.5, (58, 256)) * 100
    series = LoadStats(counts=rng.poisson(rng.pareto(1.5, (64, 58, 256)) * 4), batch=256, tokens=64 * 256)
    current = policies.replicate(load, model, 32, 288)
    runs = {"greedy (256 slots)": lambda: policies.greedy(load, model, 32),
            "anticorrelation (256 slots, 64-batch series)": lambda: policies.anticorrelation(series, model, 32),
            "replicate (288 slots)": lambda: policies.replicate(load, model, 32, 288),
            "migrate (288 slots, penalty 0.05)": lambda: policies.migrate(current, load[:, ::-1].copy(), 0.05)}
    out = {}
    for name, f in runs.items():
        f()
        times = []
        for _ in range(7):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        out[name] = round(statistics.median(times), 4)
    return out


def eplb_slots(load: np.ndarray, slots: int, devices: int) -> np.ndarray:
    """load [L, E] -> slots [L, S] by EPLB's global rule (duplicates on a device allowed)."""
    L, E = load.shape
    P = slots // devices
    reps = np.ones((L, E), dtype=np.int64)
    for _ in range(slots - E):
        reps[np.arange(L), (load / reps).argmax(1)] += 1
    out = np.empty((L, slots), dtype=np.int64)
    for l in range(L):
        items = np.repeat(np.arange(E), reps[l])
        items = items[np.argsort(-(load[l] / reps[l])[items], kind="stable")]
        packs = [[] for _ in range(devices)]
        weight = np.zeros(devices)
        for e in items:
            d = min((d for d in range(devices) if len(packs[d]) < P), key=lambda d: weight[d])
            packs[d].append(e)
            weight[d] += load[l, e] / reps[l, e]
        out[l] = np.concatenate(packs)
    return out


def even_split_max_mean(slots: np.ndarray, experts: np.ndarray, num_experts: int, devices: int, batch: int) -> float:
    """Mean over layers and batches of busiest / mean device, each expert's tokens split evenly (fractional)."""
    counts = batch_counts(experts, num_experts, batch).astype(np.float64)  # [T, L, E]
    L, S = slots.shape
    reps = np.stack([np.bincount(r, minlength=num_experts) for r in slots])  # [L, E]
    per_slot = np.take_along_axis(counts / reps, np.broadcast_to(slots, (counts.shape[0], L, S)), 2)
    dev = per_slot.reshape(counts.shape[0], L, devices, S // devices).sum(3)
    return float((dev.max(2) / dev.mean(2)).mean())


def eplb_compare(esft: Path) -> list[dict]:
    from moedeploy.trace import load_trace

    domains = load_trace(esft).by_domain()
    model = ModelShape(26, 64, 6)
    rows = []
    for name in ("intent", "translation", "law", "summary"):  # plan on the first half, score the second
        ex = domains[name].experts
        n = ex.shape[0] // 2
        load = LoadStats.of(ex[:n], 64).total
        mine = policies.replicate(load, model, 8, 72)
        ref = eplb_slots(load, 72, 8)
        dup = int(sum(len(set(r[d * 9:(d + 1) * 9].tolist())) < 9 for r in ref for d in range(8)))
        for B in (64, 1024):
            rows.append({"domain": name, "batch": B, "eplb_even": round(even_split_max_mean(ref, ex[n:], 64, 8, B), 4),
                         "replicate_even": round(even_split_max_mean(mine.slots, ex[n:], 64, 8, B), 4),
                         "replicate_balanced": round(evaluate(mine, ex[n:], B).balanced.max_mean_load, 4),
                         "eplb_devices_with_duplicates": dup})
    return rows


def optimal_split(counts: np.ndarray, slots: np.ndarray, devices: int) -> float:
    """The fractional optimum of the per-batch split (what SGLang's LP solves): counts [E], slots [S] ->
    the least possible busiest-device load. By max-flow duality it is the largest, over device subsets D,
    of the tokens of experts whose replicas all lie in D, divided by |D|; with 8 devices, 255 subsets."""
    P = slots.shape[0] // devices
    mask = np.zeros(counts.shape[0], dtype=np.int64)  # [E] bitmask of the devices holding each expert
    np.bitwise_or.at(mask, slots, 1 << (np.arange(slots.shape[0]) // P))
    subsets = np.arange(1, 1 << devices)  # [2^N - 1]
    confined = (mask[None, :] & ~subsets[:, None]) == 0  # [subsets, E]
    size = np.array([bin(m).count("1") for m in subsets])
    return float((confined @ counts / size).max())


def split_vs_optimum(esft: Path) -> list[dict]:
    """balance.balanced's busiest device against the LP optimum, same placements and batches."""
    from moedeploy.placement.balance import balanced
    from moedeploy.trace import load_trace

    domains = load_trace(esft).by_domain()
    model = ModelShape(26, 64, 6)
    rows = []
    for name in ("intent", "translation", "law", "summary"):
        ex = domains[name].experts
        n = ex.shape[0] // 2
        placement = policies.replicate(LoadStats.of(ex[:n], 64).total, model, 8, 72)
        for B in (64, 1024):
            counts = batch_counts(ex[n:], 64, B)  # [T, L, E]
            greedy, best, exact = [], [], 0
            for t in range(counts.shape[0]):
                for layer in range(26):
                    c, s = counts[t, layer], placement.slots[layer]
                    load = np.bincount(np.arange(72) // 9, weights=balanced(c, s, 8), minlength=8)
                    mean = load.mean()
                    greedy.append(load.max() / mean)
                    best.append(np.ceil(optimal_split(c, s, 8) - 1e-9) / mean)  # whole tokens
                    exact += bool(load.max() <= np.ceil(optimal_split(c, s, 8) - 1e-9))
            rows.append({"domain": name, "batch": B, "balanced": round(float(np.mean(greedy)), 4),
                         "optimum": round(float(np.mean(best)), 4), "optimal_share": round(exact / len(greedy), 4)})
    return rows


def main() -> None:
    esft = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else ESFT
    out = {"plan_seconds_deepseek_v3_size": timing()}
    if esft.is_dir():
        out["eplb"] = eplb_compare(esft)
        out["split_vs_optimum"] = split_vs_optimum(esft)
    if "--json" in sys.argv:
        print(json.dumps(out))
        return
    for k, v in out["plan_seconds_deepseek_v3_size"].items():
        print(f"{k}: {v * 1000:.1f} ms")
    for r in out.get("eplb", []) + out.get("split_vs_optimum", []):
        print(r)


if __name__ == "__main__":
    main()
