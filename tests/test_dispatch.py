"""Dynamic gating's plan and expert kernels, property-tested against a plain per-pair loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moedeploy import kernels
from moedeploy.dispatch import combine, count_without_sync, gather, plan
from moedeploy.errors import OptionError
from moedeploy.experts import Activation, ExpertBank
from moedeploy.routing import Routing


def random_routing(T, K, E, drop, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, K), generator=g)
    if drop:
        ids = ids.masked_fill(torch.rand(T, K, generator=g) < 0.3, E)  # E is the dropped sentinel
    return Routing(ids, torch.rand(T, K, generator=g))


def random_bank(E, D, I, gated, bias, seed):
    g = torch.Generator().manual_seed(seed)
    N = 2 * I if gated else I
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return ExpertBank(rnd(E, N, D), rnd(E, D, I), Activation(fn=torch.nn.SiLU(), gated=gated),
                      rnd(E, N) if bias else None, rnd(E, D) if bias else None)


def per_pair_reference(x, routing, bank):
    """y[t] = sum_k w[t,k] * FFN_{ids[t,k]}(x[t]), skipping dropped pairs."""
    y = torch.zeros_like(x)
    T, K = routing.ids.shape
    for t in range(T):
        for k in range(K):
            e = int(routing.ids[t, k])
            if e == bank.num_experts:
                continue
            h = F.linear(x[t], bank.w_in[e], None if bank.b_in is None else bank.b_in[e])
            out = F.linear(bank.activation(h), bank.w_out[e], None if bank.b_out is None else bank.b_out[e])
            y[t] += routing.weights[t, k] * out
    return y


shapes = dict(T=st.integers(0, 33), K=st.integers(1, 8), E=st.integers(1, 12), drop=st.booleans(),
              seed=st.integers(0, 2**16))


@settings(max_examples=150, deadline=None)
@given(**shapes)
def test_plan_sorts_every_pair_exactly_once(T, K, E, drop, seed):
    routing = random_routing(T, K, E, drop, seed)
    p = plan(routing, E, may_drop=drop)
    flat = routing.ids.reshape(-1)
    assert sorted(p.order.tolist()) == list(range(T * K))  # a permutation: every pair once
    sorted_ids = flat[p.order]
    assert torch.all(sorted_ids[1:] >= sorted_ids[:-1])  # grouped by expert, dropped pairs last
    kept = flat[flat < E]
    assert torch.equal(p.counts, torch.bincount(kept, minlength=E))
    assert torch.equal(count_without_sync(routing.ids, E), p.counts)  # the CUDA path's count, run here
    assert torch.equal(p.offsets.long(), torch.cumsum(p.counts, 0))
    assert torch.equal(p.tokens, p.order // K)
    assert torch.equal(p.order[p.inverse], torch.arange(T * K))


@settings(max_examples=80, deadline=None)
@given(gated=st.booleans(), bias=st.booleans(), backend=st.sampled_from(["loop", "grouped_mm", "auto"]), **shapes)
def test_kernels_match_per_pair_loop(T, K, E, drop, seed, gated, bias, backend):
    D, I = 16, 8  # rows of 64 and 32 bytes: grouped_mm applies
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    routing = random_routing(T, K, E, drop, seed)
    bank = random_bank(E, D, I, gated, bias, seed + 2)
    p = plan(routing, E, may_drop=drop)
    y = combine(kernels.BACKENDS[kernels.select(backend, bank)](gather(x, p), p, bank), p)
    torch.testing.assert_close(y, per_pair_reference(x, routing, bank), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("T", [0, 1, 2, 37])
def test_odd_sizes_fall_back_to_the_loop(T):
    bank = random_bank(5, 7, 3, gated=True, bias=False, seed=0)  # 28-byte rows: no grouped_mm
    assert kernels.select("auto", bank) == "loop"
    with pytest.raises(OptionError, match="multiples of 16 bytes"):
        kernels.select("grouped_mm", bank)
    routing = random_routing(T, 2, 5, drop=False, seed=T)
    x = torch.randn(T, 7)
    p = plan(routing, 5)
    y = combine(kernels.BACKENDS["loop"](gather(x, p), p, bank), p)
    torch.testing.assert_close(y, per_pair_reference(x, routing, bank), rtol=1e-5, atol=1e-5)


def test_experts_with_no_tokens_are_skipped():
    bank = random_bank(6, 16, 8, gated=True, bias=True, seed=1)
    routing = Routing(torch.tensor([[4, 1], [1, 4], [4, 1]]), torch.rand(3, 2))  # experts 0, 2, 3, 5 idle
    x = torch.randn(3, 16)
    p = plan(routing, 6)
    assert p.counts.tolist() == [0, 3, 0, 0, 3, 0]
    for backend in ("loop", "grouped_mm"):
        y = combine(kernels.BACKENDS[backend](gather(x, p), p, bank), p)
        torch.testing.assert_close(y, per_pair_reference(x, routing, bank), rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(backend=st.sampled_from(["loop", "grouped_mm"]), **shapes)
def test_output_does_not_depend_on_how_pairs_are_grouped(T, K, E, drop, seed, backend):
    """Relabelling the experts (and permuting the bank to match) regroups the pairs; every row keeps
    its value, so the output is bitwise the same. Expert caching relies on this: grouping by cache
    slot instead of expert id must not change a bit."""
    D, I = 16, 8
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    routing = random_routing(T, K, E, drop, seed)
    bank = random_bank(E, D, I, gated=True, bias=True, seed=seed + 2)
    relabel = torch.cat([torch.randperm(E, generator=torch.Generator().manual_seed(seed)), torch.tensor([E])])
    where = torch.argsort(relabel[:E])  # new label -> old expert
    moved = ExpertBank(bank.w_in[where], bank.w_out[where], bank.activation, bank.b_in[where], bank.b_out[where])
    run = kernels.BACKENDS[backend]
    p1, p2 = plan(routing, E, may_drop=drop), plan(Routing(relabel[routing.ids], routing.weights), E, may_drop=drop)
    y1 = combine(run(gather(x, p1), p1, bank), p1)
    y2 = combine(run(gather(x, p2), p2, moved), p2)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_kernel_matches_the_loop_and_ignores_grouping(dtype):
    """The inductor-generated gather-GEMV (decode steps on large experts) against the per-pair reference,
    and bitwise the same rows whichever labels the experts carry (how a budgeted layer groups by slot)."""
    E, D, I = 12, 64, 32
    bank = random_bank(E, D, I, gated=True, bias=False, seed=3)
    bank = ExpertBank(bank.w_in.to(dtype), bank.w_out.to(dtype), bank.activation)
    assert kernels.select("compiled", bank) == "compiled"
    run = kernels.BACKENDS["compiled"]
    for T, K, drop in ((1, 1, False), (1, 4, False), (3, 2, True), (2, 8, False)):
        routing = random_routing(T, K, E, drop, seed=T * K)
        x = torch.randn(T, D, generator=torch.Generator().manual_seed(T)).to(dtype)
        p = plan(routing, E, may_drop=drop)
        y = combine(run(gather(x, p), p, bank), p)
        ref = per_pair_reference(x.float(), routing, ExpertBank(bank.w_in.float(), bank.w_out.float(), bank.activation))
        err = (y.float() - ref).abs().max() / ref.abs().max()  # relative to the largest output
        assert err <= (1e-6 if dtype == torch.float32 else 8e-3), f"{err:.2e}"  # bf16: the loop is at 3e-3..5e-3
        relabel = torch.cat([torch.randperm(E, generator=torch.Generator().manual_seed(T)), torch.tensor([E])])
        where = torch.argsort(relabel[:E])
        moved = ExpertBank(bank.w_in[where], bank.w_out[where], bank.activation)
        p2 = plan(Routing(relabel[routing.ids], routing.weights), E, may_drop=drop)
        assert torch.equal(combine(run(gather(x, p2), p2, moved), p2), y)


def test_the_compiled_kernel_is_refused_where_it_does_not_apply():
    with pytest.raises(OptionError, match="SiLU-gated"):
        kernels.select("compiled", random_bank(4, 16, 8, gated=True, bias=True, seed=0))
    small = random_bank(4, 16, 8, gated=True, bias=False, seed=0)
    assert not kernels.worth_compiling(small)  # "auto" keeps the loop for small experts: no compile at start-up
