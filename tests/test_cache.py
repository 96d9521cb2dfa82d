"""Expert buffering: under every budget and policy the outputs are bit-identical to the fully
resident model, resident bytes stay within the budget, and bad budgets get clear errors."""

from __future__ import annotations

import gc

import json
import warnings

import numpy as np
import pytest
import torch

import moedeploy
from moedeploy import CheckpointError, OptionError
from moedeploy.cache.policies import make_policy

FAMILIES = ["qwen3_moe", "gpt_oss", "deepseek_v3", "switch_transformers"]  # plain, biases, shared, capacity
SEQ2SEQ = {"switch_transformers"}


def run(model, family, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the streaming notice
        if family in SEQ2SEQ:
            logits = model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        else:
            logits = model(input_ids=ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=12, min_new_tokens=12, do_sample=False)
    return logits, tokens


def one_expert_per_layer(model) -> int:
    layer = next(iter(model.moedeploy.layers.values()))
    return layer.experts.expert_bytes() * len(model.moedeploy.layers)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lifo"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_budget_is_bit_identical(tiny, family, policy):
    path = tiny(family)
    ids = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(0))
    full = moedeploy.load(path, dtype="float32")
    want_logits, want_tokens = run(full, family, ids)
    smallest = one_expert_per_layer(full)
    for budget in (smallest, 0.5, 1.0):
        model = moedeploy.load(path, dtype="float32", expert_memory=budget, policy=policy)
        logits, tokens = run(model, family, ids)
        assert torch.equal(logits, want_logits), (budget, policy)
        assert torch.equal(tokens, want_tokens), (budget, policy)
        stats = model.moedeploy.cache_stats()
        budget_bytes = stats["budget_bytes"]
        for pool in model.moedeploy.pools:
            assert pool.stats.peak_resident_bytes <= budget_bytes // len(model.moedeploy.pools)
        if budget == smallest:
            assert stats["slots"] == len(model.moedeploy.layers) and stats["streamed_calls"] > 0



def test_a_budget_that_changes_the_kernel_keeps_the_bits(tiny):
    """"auto" picks the loop or grouped_mm by the plan's experts, and under a budget the plan is over the pool's
    slots: a decode step of GPT-OSS (biased experts, 64 of them) takes the loop resident and grouped_mm
    buffered. The two compute in the same steps (biases after the products, the activation over all rows), so
    the logits stay bit-identical (they differed in the last bits before)."""
    path = tiny("gpt_oss", num_local_experts=64)
    resident = moedeploy.load(path, dtype="float32")
    for budget in (0.1, 0.25):
        model = moedeploy.load(path, dtype="float32", expert_memory=budget)
        for shape in ((1, 1), (1, 3), (4, 1)):
            ids = torch.randint(3, 200, shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert torch.equal(model(ids).logits, resident(ids).logits), (budget, shape)


@pytest.mark.parametrize("backend", ["compiled", "native", "auto"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_fused_decode_kernels_are_bit_identical_under_budgets(tiny, dtype, backend):
    """The fused gather-GEMVs ("auto" picks the native one for decode steps on the CPU) over the pool's slots
    give the resident model's bits; their greedy tokens are the loop's."""
    path = tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32)
    ids = torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        want = moedeploy.load(path, dtype=dtype, backend=backend).generate(ids, **gen)
        loop = moedeploy.load(path, dtype=dtype, backend="loop").generate(ids, **gen)
        assert torch.equal(want.sequences, loop.sequences)
        for budget in (0.25, 0.5):
            got = moedeploy.load(path, dtype=dtype, backend=backend, expert_memory=budget).generate(ids, **gen)
            assert torch.equal(got.sequences, want.sequences), budget
            assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits)), budget

def test_global_pool_is_bit_identical_and_within_budget(tiny):
    path = tiny("mixtral")
    ids = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(1))
    want = run(moedeploy.load(path, dtype="float32"), "mixtral", ids)
    model = moedeploy.load(path, dtype="float32", expert_memory=0.3, cache_scope="global", policy="lifo")
    got = run(model, "mixtral", ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    (pool,) = model.moedeploy.pools
    assert pool.stats.peak_resident_bytes <= model.moedeploy.options.cache.budget_bytes
    assert pool.stats.hits > 0 and pool.stats.misses > 0 and pool.stats.bytes_moved == pool.stats.misses * pool.expert_bytes


@pytest.mark.parametrize("family,fused", [("qwen3_moe", False), ("qwen3_moe", True), ("gpt_oss", False),
                                          ("deepseek_v3", False), ("switch_transformers", False), ("flex_olmo", False)])
def test_disk_store_is_bit_identical_and_holds_no_experts_in_memory(tiny, family, fused):
    """The disk tier reads each missed expert from the memory-mapped checkpoint (per-expert and fused
    layouts, biases, shared experts, capacity drops, and a generic family checked against transformers
    at load); the layers' own banks hold shapes only."""
    path = tiny(family, fused=fused)
    ids = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(2))
    full = moedeploy.load(path, dtype="float32")
    want = run(full, family, ids)
    for budget in (one_expert_per_layer(full), 0.5):
        model = moedeploy.load(path, dtype="float32", expert_memory=budget, expert_store="disk")
        assert all(layer.experts.w_in.is_meta for layer in model.moedeploy.layers.values())
        got = run(model, family, ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), budget
        stats = model.moedeploy.cache_stats()
        assert stats["store"] == "disk" and stats["misses"] > 0
        assert stats["bytes_moved"] == stats["misses"] * one_expert_per_layer(full) // len(model.moedeploy.layers)


def two_moe_layers(family: str) -> dict:
    """Config overrides that give the tiny model two MoE layers, so the lookahead has a layer to prefetch
    for (tiny DeepSeek-V3's first layer is dense)."""
    return {"num_hidden_layers": 3} if family == "deepseek_v3" else {}


@pytest.mark.parametrize("family", FAMILIES + ["mixtral"])
def test_lookahead_prefetch_is_bit_identical(tiny, family):
    path = tiny(family, **two_moe_layers(family))
    ids = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(4))
    full = moedeploy.load(path, dtype="float32")
    want = run(full, family, ids)
    scopes = ["layer", "global"] if family == "mixtral" else ["layer"]
    for scope in scopes:
        for budget in (one_expert_per_layer(full), 0.5):
            model = moedeploy.load(path, dtype="float32", expert_memory=budget, prefetch="lookahead", cache_scope=scope)
            got = run(model, family, ids)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (scope, budget)
            stats = model.moedeploy.cache_stats()
            assert stats["prefetch"] == "lookahead" and stats["prefetched"] > 0
            assert stats["bytes_moved"] == (stats["misses"] + stats["prefetched"]) * full.moedeploy.layers[
                next(iter(full.moedeploy.layers))].experts.expert_bytes()
            assert stats["peak_resident_bytes"] <= stats["budget_bytes"]


def test_lookahead_prefetch_on_the_demo_model_saves_demand_misses():
    """The demo model's next router, applied to the current hidden states, guesses well: most
    prefetched experts are used, and demand misses fall."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(moedeploy.api.DEMO_MODEL)("KING HENRY.\nNow, lords, for France!",
                                                                  return_tensors="pt").input_ids
    stats, tokens = {}, {}
    for prefetch in (None, "lookahead"):
        model = moedeploy.load(expert_memory=0.25, prefetch=prefetch)
        tokens[prefetch] = run(model, "qwen3_moe", ids)[1]
        stats[prefetch] = model.moedeploy.cache_stats()
    assert torch.equal(tokens[None], tokens["lookahead"])
    assert stats["lookahead"]["prefetch_hits"] > stats["lookahead"]["prefetched"] / 2
    assert stats["lookahead"]["misses"] < stats[None]["misses"]


def test_demo_model_under_a_small_budget_is_bit_identical():
    from transformers import AutoTokenizer

    full = moedeploy.load()
    ids = AutoTokenizer.from_pretrained(full.moedeploy.path)("ROMEO.\nBut soft", return_tensors="pt").input_ids
    want = run(full, "qwen3_moe", ids)
    for policy in ("lru", "lifo"):
        got = run(moedeploy.load(expert_memory=0.125, policy=policy), "qwen3_moe", ids)  # 4 of 32 experts per layer
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lifo"])
def test_policies_pick_their_victim(policy):
    p = make_policy(policy)
    for t, e in enumerate([1, 2, 3]):
        p.on_insert((0, e), t)
    p.on_use((0, 1), 3)  # 1 is now the most recent; 1 used twice
    p.on_use((0, 2), 4)
    p.on_use((0, 1), 5)
    p.on_use((0, 2), 6)
    # uses: 1 -> 3, 2 -> 3, 3 -> 1; last use: 1 -> 5, 2 -> 6, 3 -> 2; inserted: 1 -> 0, 2 -> 1, 3 -> 2
    candidates = [(0, 1), (0, 2), (0, 3)]
    expected = {"lru": (0, 3), "lfu": (0, 3), "fifo": (0, 1), "lifo": (0, 3)}[policy]
    assert p.victim(candidates) == expected
    assert p.victim([(0, 1), (0, 2)]) == {"lru": (0, 1), "lfu": (0, 1), "fifo": (0, 1), "lifo": (0, 2)}[policy]


def test_generate_json_reports_cache_stats(tiny, capsys):
    from moedeploy.cli import main

    with pytest.warns(UserWarning, match="experts stream through the slots in chunks"):  # it says so
        assert main(["generate", "--model", str(tiny("qwen3_moe")), "--prompt", "experts", "--max-new-tokens", "6",
                     "--expert-memory", "0.5", "--policy", "lfu", "--json"]) == 0
    cache = json.loads(capsys.readouterr().out)["stats"]["cache"]
    assert cache["policy"] == "lfu" and cache["hits"] + cache["misses"] > 0 and 0 <= cache["miss_rate"] <= 1
    assert cache["peak_resident_bytes"] <= cache["budget_bytes"]
    series = cache["resident_bytes_over_time"]  # [seconds, bytes] of all pools together
    assert series and all(0 < b <= cache["budget_bytes"] for _, b in series)
    assert [t for t, _ in series] == sorted(t for t, _ in series) and series[0][0] == 0


def test_resident_series_is_capped_at_its_points():
    from moedeploy.api import SERIES_POINTS, downsample

    long = [(i / 10, i) for i in range(199)]  # 199 points: the old stride of len // 100 kept all of them
    short = downsample(long, SERIES_POINTS)
    assert len(short) == SERIES_POINTS and short[0] == long[0] and short[-1] == long[-1]
    assert short == sorted(short) and len(set(short)) == SERIES_POINTS
    assert downsample(long[:50], SERIES_POINTS) == long[:50]


@pytest.mark.parametrize("options,message", [
    (dict(expert_memory=0), "is not valid"),
    (dict(expert_memory=-5), "is not valid"),
    (dict(expert_memory="lots"), "is not valid"),
    (dict(expert_memory="1PiB"), "is not valid"),
    (dict(expert_memory="1000000GB"), "larger than the cpu device"),
    (dict(expert_memory=10), "holds no expert per layer"),
    (dict(expert_memory=0.5, policy="random"), "unknown cache policy 'random'"),
    (dict(expert_memory=0.5, cache_scope="node"), "unknown cache scope 'node'"),
    (dict(policy="lru"), "apply only with an expert_memory budget"),
    (dict(expert_store="disk"), "apply only with an expert_memory budget"),
    (dict(expert_memory=0.5, expert_store="nvme"), "unknown expert store 'nvme'"),
    (dict(expert_memory=0.5, prefetch="oracle"), "unknown prefetcher 'oracle'"),
    (dict(prefetch="lookahead"), "apply only with an expert_memory budget"),
    (dict(expert_memory=0.5, gating="static"), "needs gating='dynamic'"),
])
def test_bad_budgets(tiny, options, message):
    with pytest.raises(OptionError, match=message):
        moedeploy.load(tiny("qwen3_moe"), **options)


def test_bench_cache_smoke(tiny, capsys):
    from moedeploy.cli import main

    assert main(["bench", "cache", "--model", str(tiny("qwen3_moe")), "--budgets", "0.5", "--policies", "lru",
                 "--new-tokens", "4", "--rounds", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["budget"] for r in rows] == [None, 0.5] and all(r["identical"] for r in rows)
    assert rows[1]["peak_resident_bytes"] <= rows[1]["budget_bytes"]


def _profile(model, ids, path):
    from moedeploy.trace import record, write_trace

    with torch.inference_mode(), record(model) as rec:
        model(input_ids=ids)
    return write_trace(rec.trace(), path)


def test_pinned_experts_from_a_profile_stay_resident_and_outputs_stay_identical(tmp_path):
    from moedeploy.trace import load_trace
    from moedeploy.trace.stats import expert_load

    full = moedeploy.load()
    ids = torch.randint(3, 4000, (2, 40), generator=torch.Generator().manual_seed(3))
    profile = _profile(full, ids, tmp_path / "profile.parquet")
    want = run(full, "qwen3_moe", ids)
    model = moedeploy.load(expert_memory=0.25, pin=profile, pin_fraction=0.5)  # 8 slots per layer, 4 pinned
    load = expert_load(load_trace(profile).experts, 32)  # [L, E]
    for i, pool in enumerate(model.moedeploy.pools):
        hottest = set(np.argsort(-load[i], kind="stable")[:4].tolist())
        assert {e for _, e in pool.pinned} == hottest
    got = run(model, "qwen3_moe", ids)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    stats = model.moedeploy.cache_stats()
    assert stats["pinned"] == 4 * len(model.moedeploy.pools) and stats["streamed_calls"] > 0
    for pool in model.moedeploy.pools:
        assert pool.pinned <= set(pool.slot_of)  # never evicted, even while experts streamed through
        assert pool.stats.peak_resident_bytes <= stats["budget_bytes"] // len(model.moedeploy.pools)
        pool.reset()
        assert pool.pinned <= set(pool.slot_of) and len(pool.slot_of) == len(pool.pinned)


@pytest.mark.parametrize("options,message", [
    (dict(pin_fraction=1.0), "below 1"),
    (dict(pin_fraction=-0.1), "at least 0"),
    (dict(pin_fraction="0.5"), "must be a number"),  # a TypeError inside the comparison before
])
def test_bad_pin_fractions(tmp_path, options, message):
    profile = _profile(moedeploy.load(), torch.arange(3, 20).view(1, -1), tmp_path / "p.parquet")
    with pytest.raises(OptionError, match=message):
        moedeploy.load(expert_memory=0.25, pin=profile, **options)


def test_a_profile_of_another_model_is_refused(tiny, tmp_path):
    profile = _profile(moedeploy.load(tiny("mixtral")), torch.arange(3, 20).view(1, -1), tmp_path / "p.parquet")
    with pytest.raises(OptionError, match="recorded from another model"):
        moedeploy.load(expert_memory=0.25, pin=profile)
    with pytest.raises(OptionError, match="needs pin="):
        moedeploy.load(expert_memory=0.25, pin_fraction=0.5)


def test_bench_offload_runs_every_configuration_in_its_own_process(capsys):
    from moedeploy.cli import main

    assert main(["bench", "offload", "--budgets", "0.5", "--new-tokens", "4", "--rounds", "1", "--json",
                 "--timeout", "300"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {r["config"]: r for r in report["rows"]}
    assert list(rows) == ["resident", "transformers", "moedeploy 0.5", "accelerate 0.5"]  # resident twice: one key
    assert rows["moedeploy 0.5"]["identical"] and rows["moedeploy 0.5"]["miss_rate"] is not None
    assert all(r["peak_anon_mb"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert report["expert_bytes"] > report["dense_bytes"] > 0


def test_bench_offload_counts_the_decode_steps_and_compares_each_dtype_with_its_own_resident(monkeypatch):
    """A configuration's cache figures are its decode steps' (the prompt step left out, like the rate): two
    decode steps of the demo model (4 MoE layers, top-4) ask for 32 experts. A quantized row's ratio is to the
    resident model of its own expert dtype."""
    import argparse

    from moedeploy.api import DEMO_MODEL
    from moedeploy.bench import offload

    cfg = offload.Config("moedeploy", 0.5, store="host", prefetch=None)
    cache = offload.child(cfg, DEMO_MODEL, "ROMEO.\nBut soft, what light", new_tokens=3, rounds=1, threads=1)["cache"]
    assert cache["hits"] + cache["misses"] == 2 * 4 * 4

    rates = {None: 10.0, "int4": 20.0}  # resident rates; budgets run at half of them

    def spawn(cfg, args, timeout):
        rate = rates[cfg.expert_dtype] * (0.5 if cfg.kind == "moedeploy" else 1.0)
        return dict(rate=rate, tokens=[1, 2, 3], load_s=0.0, cache=None, peak_anon=0, peak_rss=0, peak_device=None,
                    h2d=None)

    monkeypatch.setattr(offload, "_spawn", spawn)
    args = argparse.Namespace(new_tokens=3, device="cpu", dtype=None, baselines=False, expert_dtypes=[None, "int4"],
                              budgets=[0.5], store="disk", prefetch=["lookahead"], timeout=1)
    rows, _ = offload.bench(args, progress=lambda line: None)
    assert {r.config: r.ratio_to_resident for r in rows} == {"resident": 1.0, "resident int4": 1.0,
                                                             "moedeploy 0.5": 0.5, "moedeploy 0.5 int4": 0.5}


def test_a_prefetch_still_copying_is_waited_for_and_counted_as_a_stall():
    """Copies on the copier thread: an acquire that needs a slot whose copy is in flight waits for it
    (the CPU form of a CUDA event), reads the right weights, and reports the wait as stall time."""
    import threading

    from moedeploy.cache.pool import SlotPool
    from moedeploy.experts import Activation, ExpertBank
    from moedeploy.store import HostStore

    bank = ExpertBank(torch.randn(4, 6, 3), torch.randn(4, 3, 3), Activation(torch.nn.SiLU(), gated=True))
    release = threading.Event()

    class GatedStore(HostStore):  # the copy of expert 2 waits until the test lets it go
        def read(self, expert):
            if expert == 2:
                release.wait(5)
            return super().read(expert)

    pool = SlotPool(2, make_policy("lru"), bank, torch.device("cpu"), prefetch=True)
    pool.register(0, GatedStore(bank))
    pool.prefetch([(0, 2)])
    assert pool.in_flight and pool.stats.prefetched == 1
    threading.Timer(0.05, release.set).start()
    (slot,) = pool.acquire([(0, 2)])
    assert torch.equal(pool.slots.w_in[slot], bank.w_in[2]) and torch.equal(pool.slots.w_out[slot], bank.w_out[2])
    assert pool.stats.hits == 1 and pool.stats.prefetch_hits == 1 and pool.stats.misses == 0
    assert pool.stats.stall_s >= 0.02 and not pool.in_flight


@pytest.mark.parametrize("prefetched", [False, True])
def test_a_failed_copy_leaves_no_expert_behind(prefetched):
    """A copy that fails (a demand miss, or a prefetch whose error surfaces when its slot is waited for) raises,
    and its key is not resident afterwards: the next acquire misses and copies again, never a hit on a
    half-written slot."""
    from moedeploy.cache.pool import SlotPool
    from moedeploy.experts import Activation, ExpertBank
    from moedeploy.store import HostStore

    bank = ExpertBank(torch.randn(4, 6, 3), torch.randn(4, 3, 3), Activation(torch.nn.SiLU(), gated=True))
    broken = {2}

    class FailingStore(HostStore):
        def read(self, expert):
            if expert in broken:
                raise OSError("the disk went away")
            return super().read(expert)

    pool = SlotPool(2, make_policy("lru"), bank, torch.device("cpu"), prefetch=prefetched)
    pool.register(0, FailingStore(bank))
    if prefetched:
        pool.prefetch([(0, 2)])
    with pytest.raises(OSError, match="went away"):
        pool.acquire([(0, 2)])
    assert (0, 2) not in pool.slot_of and not pool.in_flight and len(pool.free) == 2
    broken.clear()
    misses = pool.stats.misses
    (slot,) = pool.acquire([(0, 2)])
    assert pool.stats.misses == misses + 1
    assert torch.equal(pool.slots.w_in[slot], bank.w_in[2]) and torch.equal(pool.slots.w_out[slot], bank.w_out[2])


@pytest.mark.parametrize("store", ["host", "disk"])
def test_a_budgeted_model_keeps_its_experts_in_the_store_when_it_moves(tiny, store):
    """Under a budget only the slots belong on the device: moving the model leaves the layers' expert
    banks in host memory (on CUDA, pinned), where the slots copy from, or as shapes only (disk)."""
    model = moedeploy.load(tiny("mixtral"), dtype="float32", expert_memory=0.5, expert_store=store)
    layer = next(iter(model.moedeploy.layers.values()))
    model.to(torch.float64)  # a move the experts must not follow (the slots keep the model's dtype)
    kept = layer.experts.on_host if store == "host" else layer.experts.w_in.is_meta
    assert kept and layer.experts.w_in.dtype == torch.float32
    assert layer.router.weight.dtype == torch.float64
    resident = moedeploy.load(tiny("mixtral"), dtype="float32")
    assert not next(iter(resident.moedeploy.layers.values())).experts.on_host


# Expert buffering on CUDA: experts in pinned host memory (or on disk), slots on the GPU, demand copies
# on the compute stream and prefetches on a side stream (cache/transfer.py); bit-identical to the same
# model fully resident on the GPU. They need a CUDA device and skip without one.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("prefetch", [None, "lookahead"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "lifo"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_cuda_budgets_are_bit_identical(tiny, family, policy, prefetch, store):
    path = tiny(family, **two_moe_layers(family))
    ids = torch.randint(3, 320, (2, 11), generator=torch.Generator().manual_seed(0)).cuda()
    full = moedeploy.load(path, dtype="float32", device="cuda")
    want = run(full, family, ids)
    for budget in (one_expert_per_layer(full), 0.5):
        model = moedeploy.load(path, dtype="float32", device="cuda", expert_memory=budget, policy=policy,
                               prefetch=prefetch, expert_store=store)
        got = run(model, family, ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), (budget, policy, prefetch, store)
        stats = model.moedeploy.cache_stats()
        assert stats["misses"] > 0 and stats["stall_s"] > 0
        assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
        if prefetch and budget == 0.5:
            assert stats["prefetched"] > 0 and stats["prefetch_s"] > 0
        for pool in model.moedeploy.pools:
            assert pool.slots.w_in.is_cuda and not pool.in_flight


@cuda
def test_cuda_host_experts_are_pinned_and_stay_on_the_host(tiny):
    model = moedeploy.load(tiny("mixtral"), device="cuda", expert_memory=0.25)
    for layer in model.moedeploy.layers.values():
        assert layer.experts.w_in.device.type == "cpu" and layer.experts.w_in.is_pinned()
        assert layer.router.weight.is_cuda
    assert next(model.parameters()).is_cuda


@pytest.mark.parametrize("options", [{}, {"expert_memory": 0.5, "expert_store": "host"},
                                     {"expert_memory": 0.5, "expert_store": "disk"}])
def test_the_checkpoint_is_never_left_mapped(tiny, options):
    """Weights are read into memory of their own, never through a mapping of the checkpoint (its pages would
    stay in the process's memory for nothing): not when loading, and not when the disk store reads misses."""
    path = tiny("qwen3_moe")
    gc.collect()  # models of earlier tests in reference cycles may still hold mappings of their own
    model = moedeploy.load(path, dtype="float32", **options)
    ids = torch.randint(3, 320, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids)
    assert options.get("expert_store") != "disk" or model.moedeploy.cache_stats()["misses"] > 0
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if str(path) in line]
    assert not mapped, mapped


def test_a_cpu_budget_keeps_its_experts_on_disk_unless_told(tiny):
    """On the CPU the slots are host memory, so a host store (every expert in host memory, plus the slots) would
    hold more than no budget: a budget there waits on disk unless a store is named."""
    path = tiny("qwen3_moe")
    stores = {name: {type(m.store).__name__ for m in moedeploy.load(path, expert_memory=0.5, **options).moedeploy
                     .layers.values()}
              for name, options in (("default", {}), ("host", {"expert_store": "host"}),
                                    ("disk", {"expert_store": "disk"}))}
    assert stores == {"default": {"DiskStore"}, "host": {"HostStore"}, "disk": {"DiskStore"}}


@pytest.mark.parametrize("positional", [True, False])
def test_the_checkpoint_reader_reads_what_safetensors_reads(tmp_path, monkeypatch, positional):
    """Views of the mapping (`read`) and reads into a tensor of the caller's (`read_into`: positional reads, or
    through the mapping where the OS has no `preadv`) of whole tensors and of one index along the first axis
    give safetensors' own tensors, in every dtype a checkpoint holds."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    from moedeploy.store.tensorfile import TensorFile

    if not positional:
        monkeypatch.delattr(os, "preadv")
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}": (torch.randn(5, 3, 7, generator=g) * 50).to(dtype)
               for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64,
                             torch.float8_e4m3fn)}
    tensors["scalar"] = torch.tensor(3.5)
    save_file(tensors, tmp_path / "x.safetensors")
    f = TensorFile(tmp_path / "x.safetensors")

    def same(a, b):
        return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))

    with safe_open(tmp_path / "x.safetensors", framework="pt") as want:
        for name in want.keys():
            expected = want.get_tensor(name)
            into = torch.empty_like(expected)
            f.read_into(name, None, into)
            assert same(f.read(name), expected) and same(into, expected), name
            for i in (0, 4) if expected.dim() else ():
                row = torch.empty_like(expected[i])
                f.read_into(name, i, row)
                assert same(f.read(name, i), want.get_slice(name)[i]) and same(row, expected[i]), (name, i)
    with pytest.raises(CheckpointError, match="has no index 5"):
        f.read("t.torch.int8", 5)
    with pytest.raises(ValueError, match="does not fit"):
        f.read_into("t.torch.int8", 0, torch.empty(3, 7, dtype=torch.uint8))
    f.close()


def test_a_checkpoint_replaced_while_in_use_is_refused_not_read_at_its_old_offsets(tmp_path):
    """The file is reopened after `close` (a disk store's misses after loading): a file replaced in between is
    refused, whatever its size."""
    import os

    from safetensors.torch import save_file

    from moedeploy.store.tensorfile import TensorFile

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 8), "b": torch.ones(4, 8)}, path)
    f = TensorFile(path)
    assert torch.equal(f.read("b"), torch.ones(4, 8))
    f.close()
    save_file({"b": torch.full((4, 8), 2.0), "a": torch.zeros(4, 8)}, tmp_path / "new.safetensors")  # same size
    os.replace(tmp_path / "new.safetensors", path)
    with pytest.raises(CheckpointError, match="changed on disk since it was opened"):
        f.read_into("b", None, torch.empty(4, 8))
    with pytest.raises(CheckpointError, match="changed on disk since it was opened"):
        f.read("b")


def test_a_tensor_in_a_dtype_moedeploy_does_not_read_is_refused_only_when_read(tmp_path):
    from safetensors.torch import save_file

    from moedeploy.store.tensorfile import TensorFile

    save_file({"w": torch.ones(2, 3), "ids": torch.arange(6, dtype=torch.int32).to(torch.uint32)}, tmp_path / "x.safetensors")
    f = TensorFile(tmp_path / "x.safetensors")
    assert torch.equal(f.read("w"), torch.ones(2, 3)) and "ids" in f.entries
    with pytest.raises(CheckpointError, match="'ids' has dtype U32, which moedeploy does not read"):
        f.read("ids")
    f.close()


@pytest.mark.parametrize("family,fused,direct", [("qwen3_moe", False, True), ("qwen3_moe", True, True),
                                                 ("mixtral", False, True), ("gpt_oss", False, False)])
def test_the_disk_store_reads_misses_straight_into_the_slots(tiny, family, fused, direct):
    """Where the checkpoint stores an expert as the slots hold it (per-expert or fused tensors, the same dtype), a
    miss is read straight into its slot; elsewhere (GPT-OSS's transposed, interleaved tensors; another dtype)
    the store says so and the pool copies `read`'s tensors. Either way the slot gets `read`'s bits."""
    path = tiny(family, fused=fused)
    for dtype, expect in (("float32", direct), ("bfloat16", False)):  # the tiny checkpoints are float32
        model = moedeploy.load(path, dtype=dtype, expert_memory=0.5, expert_store="disk")
        layer = next(iter(model.moedeploy.layers.values()))
        store, pool = layer.store, model.moedeploy.pools[0]
        for e in range(store.size):
            views = [t[0] for t in pool.slots.tensors()]
            assert store.read_into(e, views) == expect, (dtype, e)
            if expect:
                assert all(torch.equal(v, t) for v, t in zip(views, store.read(e), strict=True))


def test_a_long_run_keeps_a_bounded_resident_series_and_an_exact_peak():
    """A pool records its resident bytes at every acquire; a server runs for days, so the series thins itself
    out past SERIES_CAP points (every 2nd acquire, then every 4th...) instead of growing without end, and the
    peak and the count stay exact."""
    from moedeploy.cache.pool import SERIES_CAP, SlotPool

    pool = SlotPool(4, make_policy("lru"), None, expert_bytes=10)
    rng = np.random.default_rng(0)
    n = 5 * SERIES_CAP
    for _ in range(n):
        pool.acquire([(0, int(e)) for e in rng.choice(16, 2, replace=False)])
    stats = pool.stats
    assert stats.acquires == n and stats.peak_resident_bytes == 40
    assert SERIES_CAP // 2 <= len(stats.resident_bytes) == len(stats.resident_at) < SERIES_CAP
    assert stats.resident_at == sorted(stats.resident_at)
    assert stats.as_dict()["acquires"] == n and "resident_bytes" not in stats.as_dict()
