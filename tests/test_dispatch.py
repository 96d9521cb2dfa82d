"""Dynamic gating's plan and expert kernels, property-tested against a plain per-pair loop."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from moedeploy import kernels
from moedeploy.dispatch import combine, count_without_sync, gather, plan
from moedeploy.errors import OptionError
from moedeploy.experts import Activation, ExpertBank
from moedeploy.kernels import native
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


def eager_pairs(x, expert, bank):
    """Each row through its expert in eager torch, in the bank's dtype: what the fused kernels stand for."""
    return torch.stack([F.linear(bank.activation(F.linear(x[p], bank.w_in[e])), bank.w_out[e])
                        for p, e in enumerate(expert.tolist())])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "portable"])
def test_the_native_kernel_matches_eager_on_odd_shapes(dtype, isa):
    """moedeploy's C++ decode kernel (each instruction set this CPU runs, down to the plain loops a CPU without
    AVX2 runs) against eager torch per row, 1 to 33 rows, on shapes whose inputs are and are not whole blocks of
    16, 32 and 64 (the inner steps of AVX2, AVX-512 and the bfloat16 dot product)."""
    assert native.available(), native.why_not()
    if isa not in native.isas():
        pytest.skip(f"this CPU does not run {isa} (it runs {', '.join(native.isas())})")
    for E, D, I in ((3, 37, 19), (5, 64, 32), (4, 48, 40), (2, 160, 8), (2, 200, 72)):
        bank = random_bank(E, D, I, gated=True, bias=False, seed=D)
        bank = ExpertBank(bank.w_in.to(dtype), bank.w_out.to(dtype), bank.activation)
        for P in (1, 2, 7, 16, 33):
            g = torch.Generator().manual_seed(P)
            x, expert = torch.randn(P, D, generator=g).to(dtype), torch.randint(0, E, (P,), generator=g)
            got = torch.ops.moedeploy.expert_ffn(x, expert, bank.w_in, bank.w_out, isa)
            want = eager_pairs(x, expert, bank)
            assert got.dtype == dtype and got.shape == (P, D)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err <= (2e-6 if dtype == torch.float32 else 8e-3), (E, D, I, P, err)  # bf16: one rounding apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["best", "avx2"])
def test_the_native_kernel_bits_do_not_depend_on_threads_rows_or_slots(dtype, isa):
    """A row's bits are its own: the same with 1 or 2 threads, alone or beside other rows, whichever slot of the
    bank holds its expert (what makes a budgeted layer bit-identical to the resident one)."""
    assert native.available(), native.why_not()
    if isa not in native.isas() + ["best"]:
        pytest.skip(f"this CPU does not run {isa}")
    E, D, I = 6, 160, 64
    bank = random_bank(E, D, I, gated=True, bias=False, seed=5)
    w_in, w_out = bank.w_in.to(dtype), bank.w_out.to(dtype)
    x, expert = torch.randn(9, D).to(dtype), torch.tensor([0, 3, 3, 5, 1, 0, 2, 4, 5])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.moedeploy.expert_ffn(x, expert, w_in, w_out, isa)
        torch.set_num_threads(2)
        two = torch.ops.moedeploy.expert_ffn(x, expert, w_in, w_out, isa)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    alone = torch.cat([torch.ops.moedeploy.expert_ffn(x[p:p + 1], expert[p:p + 1], w_in, w_out, isa) for p in range(9)])
    assert torch.equal(alone, one)
    where = torch.randperm(E, generator=torch.Generator().manual_seed(1))  # slot s holds expert where[s]
    slot = torch.argsort(where)[expert]
    assert torch.equal(torch.ops.moedeploy.expert_ffn(x, slot, w_in[where], w_out[where], isa), one)


def test_the_native_kernel_names_the_instruction_sets_it_runs_when_asked_for_another():
    assert native.available(), native.why_not()
    assert native.isas()[-1] == "portable"
    assert native.isas()[0] in ("avx512_vnni", "avx2_int8", "portable")  # the integer paths where the CPU has AVX2
    bank = random_bank(2, 32, 16, gated=True, bias=False, seed=0)
    with pytest.raises(RuntimeError, match=r"isa 'sse9' is not one this CPU runs; it runs: (\w+, )*portable$"):
        torch.ops.moedeploy.expert_ffn(torch.randn(1, 32), torch.tensor([0]), bank.w_in, bank.w_out, "sse9")
    for isa in native.INTEGER_ISAS:
        if isa in native.isas():
            with pytest.raises(RuntimeError, match=rf"isa '{isa}' multiplies quantized experts"):
                torch.ops.moedeploy.expert_ffn(torch.randn(1, 32), torch.tensor([0]), bank.w_in, bank.w_out, isa)


@pytest.mark.parametrize("bad", [2, 3, -1, 10**8])
def test_the_native_kernel_refuses_an_expert_the_bank_does_not_hold(bad):
    """An id past the bank read outside the weights (garbage, NaN, or a crash at 10**8)."""
    assert native.available(), native.why_not()
    bank = random_bank(2, 32, 16, gated=True, bias=False, seed=0)
    with pytest.raises(RuntimeError, match=f"row 1 names expert {bad}; the bank holds 2"):
        torch.ops.moedeploy.expert_ffn(torch.randn(2, 32), torch.tensor([0, bad]), bank.w_in, bank.w_out)
    q, s = torch.zeros(2, 32, 32, dtype=torch.int8), torch.ones(2, 32, 1)
    with pytest.raises(RuntimeError, match=f"row 1 names expert {bad}"):
        torch.ops.moedeploy.expert_ffn_int8(torch.randn(2, 32), torch.tensor([0, bad]), q, s,
                                            torch.zeros(2, 32, 16, dtype=torch.int8), torch.ones(2, 32, 1))


def test_auto_decodes_with_the_native_kernel_and_it_matches_the_loop():
    """"auto" hands a decode-sized CPU step to the native kernel (no plan), whatever the experts' size; a plan's
    rows through it give the per-pair reference."""
    bank = random_bank(8, 64, 32, gated=True, bias=False, seed=2)
    x = torch.randn(1, 64)
    assert kernels.for_step("auto", x, 4, bank) == "native"
    assert kernels.direct("native", random_routing(1, 4, 8, drop=False, seed=3).ids) is kernels.native_pairs
    assert kernels.for_step("auto", x, kernels.COMPILED_ROWS + 1, bank) == "auto"  # a prompt: the loop or grouped_mm
    assert kernels.for_step("loop", x, 4, bank) == "loop"
    assert kernels.select("native", bank) == "native"
    for T, K, drop in ((1, 4, False), (3, 2, True), (2, 8, False)):
        routing = random_routing(T, K, 8, drop, seed=T)
        x = torch.randn(T, 64, generator=torch.Generator().manual_seed(T))
        p = plan(routing, 8, may_drop=drop)
        y = combine(kernels.BACKENDS["native"](gather(x, p), p, bank), p)
        torch.testing.assert_close(y, per_pair_reference(x, routing, bank), rtol=1e-5, atol=1e-4)
    with pytest.raises(OptionError, match="SiLU-gated"):
        kernels.select("native", random_bank(4, 16, 8, gated=True, bias=True, seed=0))


def test_the_kernel_finds_the_ninja_moedeploy_installs_where_path_has_none(monkeypatch):
    """torch's extension builder runs `ninja` from PATH, and `.venv/bin/python -m ...` does not put the venv's
    scripts folder there: without a system ninja the build failed ("Ninja is required")."""
    import os
    import shutil

    import ninja

    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("ninja") is None
    native._ninja()
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")


def test_without_a_compiler_auto_says_so_and_native_is_refused(tmp_path):
    """A machine whose C++ compiler fails (CXX=false, an empty extensions folder): "auto" warns once and decodes
    with the torch.compile kernel; backend="native" is refused with the reason."""
    script = """
import warnings, torch
from moedeploy import kernels
from moedeploy.errors import OptionError
from moedeploy.experts import Activation, ExpertBank
bank = ExpertBank(torch.randn(4, 2048, 1024), torch.randn(4, 1024, 1024), Activation(torch.nn.SiLU(), gated=True))
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    picked = kernels.for_step("auto", torch.randn(1, 1024), 2, bank)
    kernels.for_step("auto", torch.randn(1, 1024), 2, bank)
assert picked == "compiled", picked
assert len([w for w in seen if "could not be built" in str(w.message)]) == 1, [str(w.message) for w in seen]
try:
    kernels.select("native", bank)
except OptionError as ex:
    assert "could not be built" in str(ex) and "C++ compiler" in str(ex), ex
    print("refused")
"""
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "refused"


@pytest.mark.parametrize("backend", ["native", "compiled"])
def test_a_step_with_no_tokens_gives_no_rows(backend):
    """An expert-parallel rank can get no tokens in a step: the plan-free decode kernels return [0, D]."""
    bank = random_bank(4, 32, 16, gated=True, bias=False, seed=0)
    run = {"native": kernels.native_pairs, "compiled": kernels.compiled_pairs}[backend]
    assert run(torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.long), bank).shape == (0, 32)



def test_a_build_lock_left_by_a_killed_build_is_removed_not_waited_on_forever(tmp_path):
    """Before torch 2.14 the extension builder waits without limit for the `lock` file a killed build leaves
    behind: the next load removes a lock older than a build can take and says so (here the compiler then fails at
    once, CXX=false), and a failed build leaves none; a younger one is waited on, as another process may be
    building. torch 2.14 locks the file with the OS instead (it stays, and means nothing): there moedeploy leaves
    it alone, and an old one does not block either."""
    folder = tmp_path / native._name()
    folder.mkdir()
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - native.STALE_LOCK_S - 60,) * 2)
    script = "from moedeploy.kernels import native; print(native.available())"
    env = dict(os.environ, CXX="false", TORCH_EXTENSIONS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", (done.stdout, done.stderr)
    if not native._lock_is_a_file():
        assert "removed a build lock" not in done.stderr, done.stderr
        return
    assert "removed a build lock" in done.stderr and str(lock) in done.stderr, done.stderr
    assert not lock.exists()
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False" and "removed a build lock" not in done.stderr, (done.stdout, done.stderr)
    assert not lock.exists()  # nor left by the failed build
    lock.touch()  # a build in progress elsewhere: waited on until it is older than `stale_after`
    started = time.monotonic()
    native._clear_stale_lock(folder, stale_after=0.5, poll=0.05)
    assert not lock.exists() and time.monotonic() - started >= 0.4


def test_torch_locks_its_build_folder_by_a_file_before_2_14_and_by_the_os_from_it():
    """The internal `_lock_is_a_file` reads: torch.utils.cpp_extension's `FileBaton` (before 2.14) or `FileLock`."""
    from torch.utils import cpp_extension

    newer = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
    assert native._lock_is_a_file() is (not newer)
    assert hasattr(cpp_extension, "FileLock" if newer else "FileBaton")
