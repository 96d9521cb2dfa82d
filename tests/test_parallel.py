"""Expert parallelism over torch.distributed (gloo) under torchrun: ranks agree with one process for
every placement, with and without replicas and with an expert cache per rank; failures end the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moedeploy import load
from moedeploy.api import DEMO_MODEL
from moedeploy.errors import OptionError, PlacementError
from moedeploy.loader import build_model
from moedeploy.options import LoadOptions
from moedeploy.parallel import Group, Sharding
from moedeploy.parallel.plan import exchange
from moedeploy.placement import ModelShape, Placement
from moedeploy.store import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("ep_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
RUN_LIMIT_S = 240  # a launch that takes longer has hung: the test fails instead of waiting


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(n: int, *args: str, timeout: float = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    return subprocess.run([*TORCHRUN, f"--nproc-per-node={n}", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


def said(run: subprocess.CompletedProcess) -> str:
    """What a failed launch said: its error lines first (rank tracebacks, aborts), then the end of stderr."""
    lines = run.stderr.splitlines()
    errors = [line for line in lines if any(w in line for w in ("Error", "error:", "terminate", "exitcode"))]
    return "\n".join(errors[-20:]) + "\n---\n" + "\n".join(lines[-30:])


# --- placements for the tests -------------------------------------------------------------------------

def shuffled(shape: ModelShape, devices: int, seed: int = 0) -> Placement:
    """Every layer's experts in a random order over the devices, one replica each."""
    rng = np.random.default_rng(seed)
    slots = np.stack([rng.permutation(shape.num_experts) for _ in range(shape.num_layers)])
    return Placement(shape, devices, slots, np.ones(slots.shape), algorithm="shuffled")


def replicated(shape: ModelShape, devices: int, extra_per_device: int = 1, seed: int = 1) -> Placement:
    """A shuffled placement plus `extra_per_device` replicas on each device of experts it lacks."""
    rng = np.random.default_rng(seed)
    E, P = shape.num_experts, shape.num_experts // devices
    layers = []
    for base in shuffled(shape, devices, seed).slots:
        per_device = base.reshape(devices, P).tolist()
        for d in range(devices):
            others = [e for e in rng.permutation(E).tolist() if e not in per_device[d]]
            per_device[d] += others[:extra_per_device]
        layers.append(np.concatenate(per_device))
    slots = np.stack(layers)
    replicas = np.stack([np.bincount(row, minlength=E)[row] for row in slots])
    return Placement(shape, devices, slots, 1.0 / replicas, algorithm="replicated")


# --- the exchange plan (host side, no processes) ---------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.data())
def test_exchange_sends_every_pair_once_to_a_slot_of_its_expert(data):
    world = data.draw(st.integers(1, 4))
    per = data.draw(st.integers(1, 3))
    E = world * per
    extra = data.draw(st.integers(0, min(2, E - per)))
    shape = ModelShape(1, E, 1)
    placement = replicated(shape, world, extra, seed=data.draw(st.integers(0, 99))) if extra else shuffled(shape, world)
    slots, P = placement.slots[0], placement.slots_per_device
    T, K = data.draw(st.integers(0, 12)), data.draw(st.integers(1, min(E, 3)))
    ids = np.array([data.draw(st.permutations(list(range(E + 1))))[:K] for _ in range(T)], dtype=np.int64).reshape(T, K)
    plans = [exchange(ids, slots, world, r, E) for r in range(world)]
    received = []
    for dest in range(world):
        rows = []
        for src in range(world):
            assert plans[src].send_splits[dest] == plans[dest].recv_splits[src]
            start = sum(plans[src].send_splits[:dest])
            rows += plans[src].send_pairs[start:start + plans[src].send_splits[dest]].tolist()
        assert len(rows) == len(plans[dest].recv_slots)
        for pair, local in zip(rows, plans[dest].recv_slots):
            assert slots[dest * P + local] == ids.reshape(-1)[pair]  # the slot holds the pair's expert
        for local in range(P):  # a slot computes its rows in global token order, as one process would
            mine = [pair for pair, s in zip(rows, plans[dest].recv_slots) if s == local]
            assert mine == sorted(mine)
        received += rows
    assert sorted(received) == [i for i, e in enumerate(ids.reshape(-1)) if e < E]  # dropped pairs go nowhere
    for p in plans:
        assert all(p.lo * K <= pair < p.hi * K for pair in p.send_pairs)  # a rank sends its own tokens only


# --- ranks agree with one process -------------------------------------------------------------------------

def _reference(path) -> dict:
    from tests.ep_worker import IDS, engine_tokens

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load(path, dtype="float32")
        with torch.inference_mode():
            logits = model(IDS).logits
            tokens = model.generate(IDS[:, :4], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                    attention_mask=torch.ones(1, 4, dtype=torch.long))
        engine = engine_tokens(model)
    finally:
        torch.set_num_threads(threads)
    return {"logits": logits, "tokens": tokens, "engine": engine}


def _shape(path) -> ModelShape:
    model = load(path, dtype="float32")
    layers = list(model.moedeploy.layers.values())
    return ModelShape(len(layers), layers[0].router.num_experts, layers[0].router.top_k)


@pytest.fixture(scope="module")
def deepseek(tiny):
    return tiny("deepseek_v3", num_hidden_layers=3)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("which", ["demo", "deepseek"])
def test_ranks_match_one_process_for_every_placement(which, world, deepseek, tmp_path):
    path = DEMO_MODEL if which == "demo" else deepseek
    shape = _shape(path)
    files = {"shuffled": shuffled(shape, world), "replicated": replicated(shape, world, 2 if which == "demo" else 1)}
    args = [str(WORKER), "--model", str(path), "--out", str(tmp_path / "out.pt")]
    for name, placement in files.items():
        args += ["--placement", f"{name}={placement.save(tmp_path / f'{name}.json')}"]
    if world == 2:
        args += ["--budget", "0.5"]  # an expert cache on each rank
    args += ["--rebalance"]  # the last placement, moved online while it runs
    run = torchrun(world, *args)
    assert run.returncode == 0, said(run)
    results = torch.load(tmp_path / "out.pt")
    assert set(results) >= {f"{name}/{x}" for name in ("contiguous", "shuffled", "replicated")
                            for x in ("all_gather", "all_to_all")}
    ref = _reference(path)
    for name, got in results.items():
        if name.startswith(("contiguous", "shuffled")):  # one replica per expert: the same rows, the same bits
            assert torch.equal(got["logits"], ref["logits"]), name
        else:  # rows split over replicas go through matmuls of other sizes, whose kernels round differently
            err = (got["logits"] - ref["logits"]).norm() / ref["logits"].norm()
            assert err <= 1e-6, f"{name}: logits differ by {err:.2e} relative"
        assert torch.equal(got["tokens"], ref["tokens"]), name
        assert got["engine"] == ref["engine"], name  # the serving engine's batched steps too
        stats = got["parallel"]
        assert stats["world"] == world and stats["collectives"] > 0 and stats["rows_sent"] > 0
    moves = results["rebalanced"]["parallel"]["rebalance"]
    assert moves["replans"] > 0 and moves["layer_moves"] > 0 and moves["moved_slots"] > 0, moves


def test_eval_ppl_under_torchrun_prints_one_json_and_matches(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3)
    common = ["eval-ppl", "--text", str(text), "--context", "32", "--dtype", "float32", "--json"]
    run = torchrun(2, "-m", "moedeploy", *common)
    assert run.returncode == 0, said(run)
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    got = json.loads(lines[0])
    alone = subprocess.run([sys.executable, "-m", "moedeploy", *common], capture_output=True, text=True,
                           timeout=RUN_LIMIT_S, env=_env(), cwd=ROOT)
    want = json.loads(alone.stdout)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)
    assert got["parallel"]["world"] == 2 and want["parallel"] is None


# --- failures end the run -----------------------------------------------------------------------------------

def _spin(tmp_path, world: int, timeout: float, *extra: str) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([*TORCHRUN, f"--nproc-per-node={world}", str(WORKER), "--model", str(DEMO_MODEL),
                             "--spin", "120", "--ready", str(tmp_path), "--timeout", str(timeout), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    deadline = time.monotonic() + 90
    while len(list(tmp_path.glob("rank*.pid"))) < world:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail(f"the ranks did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)
    time.sleep(1.0)  # into the forward loop
    return proc, [int((tmp_path / f"rank{r}.pid").read_text()) for r in range(world)]


def _finish(proc: subprocess.Popen, pids: list[int], limit: float) -> tuple[int, str, float]:
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in pids:
            with _quiet():
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the run did not end within {limit} s: it hung")
    return proc.returncode, err, time.monotonic() - start


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is ProcessLookupError


def test_a_killed_rank_ends_the_run_on_every_rank(tmp_path):
    proc, pids = _spin(tmp_path, 2, timeout=60)
    os.kill(pids[1], signal.SIGKILL)
    code, err, took = _finish(proc, pids, limit=60)
    assert code != 0 and took < 60
    for pid in pids:  # no rank is left behind
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_stalled_rank_times_out_with_a_clear_error(tmp_path):
    proc, pids = _spin(tmp_path, 2, 5, "--stall")  # rank 1 stays alive and silent
    code, err, took = _finish(proc, pids, limit=60)
    assert code != 0 and took < 60
    assert "rank 0 of 2" in err and "timeout 5 s" in err, err[-2000:]


# --- bad input ---------------------------------------------------------------------------------------------------

def test_a_placement_for_another_model_is_refused(deepseek):
    demo = Placement(ModelShape(4, 32, 4), 2, np.tile(np.arange(32), (4, 1)), np.ones((4, 32)))
    opts = replace(LoadOptions.build(dtype="float32"), sharding=Sharding(Group(0, 2, 10.0), demo))
    with pytest.raises(PlacementError, match="another model .*MoE layers 4 vs 2.*experts 32 vs 8"):
        build_model(Checkpoint(deepseek), opts)


def test_a_placement_for_other_devices_is_refused():
    shape = ModelShape(4, 32, 4)
    opts = replace(LoadOptions.build(dtype="float32"), sharding=Sharding(Group(0, 2, 10.0), shuffled(shape, 4)))
    with pytest.raises(PlacementError, match="for 4 devices but 2 ranks run"):
        build_model(Checkpoint(DEMO_MODEL), opts)


def test_a_placement_outside_torchrun_is_refused(tmp_path):
    placement = shuffled(ModelShape(4, 32, 4), 2).save(tmp_path / "p.json")
    with pytest.raises(OptionError, match="torchrun"):
        load(placement=placement)


def test_two_replicas_on_one_device_are_refused():
    slots = np.array([[0, 1, 2, 0]])  # device 0 holds expert 0 twice
    with pytest.raises(PlacementError, match="expert 0 has two replicas on device 0"):
        Placement(ModelShape(1, 3, 1), 1, slots, np.array([[0.5, 1, 1, 0.5]]))


def test_an_unknown_exchange_is_refused():
    with pytest.raises(OptionError, match="unknown exchange 'ring'; choose one of: all_gather, all_to_all"):
        Sharding(Group(0, 2, 10.0), None, "ring")


# --- serving ------------------------------------------------------------------------------------------------------

def test_an_expert_parallel_server_answers_as_one_process_and_stops_cleanly(tmp_path):
    """`torchrun -m moedeploy serve`: rank 0 serves, rank 1 follows its steps; concurrent requests through the
    official client equal the one-process engine's answers; SIGTERM to rank 0 drains, and every rank and
    torchrun exit 0."""
    import asyncio

    import openai
    from transformers import AutoTokenizer

    from moedeploy.bench.serve import Server
    from moedeploy.engine import Engine, SamplingParams

    command = [*TORCHRUN, "--nproc-per-node=2", "-m", "moedeploy", "serve", "--port", "0", "--dtype", "float32",
               "--placement", str(replicated(ModelShape(4, 32, 4), 2).save(tmp_path / "p.json"))]
    server = Server("torchrun serve", command, model="moedeploy-demo", env=_env()).wait("/health")
    try:
        prompts = ["To be, or not to be", "Now is the winter", "O Romeo, Romeo", "Friends, Romans"]

        async def ask():
            c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
            return await asyncio.gather(*[c.completions.create(model="moedeploy-demo", prompt=p, max_tokens=8,
                                                               temperature=0) for p in prompts])

        got = [r.choices[0].text for r in asyncio.run(ask())]
    finally:
        import re

        found = re.search(r"pid (\d+): SIGTERM it", server.log.read_text())
        os.kill(int(found.group(1)), signal.SIGTERM) if found else server.proc.terminate()
        try:
            code = server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.stop()
            pytest.fail("the expert-parallel server did not stop within 60 s of SIGTERM")
    log = server.log.read_text()
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    engine = Engine(load(dtype="float32"), tokenizer)
    want = [o.text for o in engine.generate([tokenizer(p)["input_ids"] for p in prompts],
                                            SamplingParams(max_tokens=8, temperature=0))]
    assert got == want
    assert code == 0, log[-2000:]
    assert "rank 1 stopped after" in log, log[-2000:]
