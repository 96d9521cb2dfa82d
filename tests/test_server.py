"""The OpenAI-compatible server, started for real on loopback (`moedeploy serve --port 0`) and driven by the
official `openai` client and plain HTTP. Every server is stopped when the module ends; every wait is bounded."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

import moedeploy
from conftest import server_rss
from moedeploy.api import DEMO_MODEL

KEY = "test-key"
MODEL = "moedeploy-demo"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(serve):
    return serve("--dtype", "float32", "--api-key", KEY, "--max-batch-tokens", "128")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_MODEL)


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60, **kw)


def heldout_prompts(n: int) -> list[str]:
    """n prompts of 20 to about 400 characters from a play the demo model never saw."""
    text = (DEMO_MODEL.parent / "heldout" / "tempest.txt").read_text(encoding="utf-8")
    return [text[i * 997: i * 997 + 20 + (i * 67) % 380] for i in range(n)]


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics, keyed 'name{label=value,...}' (the model_name label left out)."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=10).text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_completions_chat_and_streams_equal_generate(server):
    model = moedeploy.load(None, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model.moedeploy.path)
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL]
    for prompt in heldout_prompts(3):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():  # what `moedeploy generate` runs
            out = model.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        want = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0)
        assert whole.choices[0].text == want
        assert whole.usage.prompt_tokens == ids.shape[1] and whole.usage.completion_tokens == out.shape[1] - ids.shape[1]
        chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    messages = [{"role": "system", "content": "Speak in verse."}, {"role": "user", "content": "Who goes there?"}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    plain = "SYSTEM.\nSpeak in verse.\n\nUSER.\nWho goes there?\n\nASSISTANT.\n"  # the documented plain template
    assert chat.choices[0].message.content == c.completions.create(
        model=MODEL, prompt=plain, max_tokens=12, temperature=0).choices[0].text
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens == len(tokenizer(plain).input_ids)
    deltas = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    seeded = [c.completions.create(model=MODEL, prompt="ROMEO.", max_tokens=12, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


BIG = "x" * (2 << 20)
BAD = [  # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ""}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/completions", {"model": "gpt-9" * 40, "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, 400, "input_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "ROMEO. " * 600}, 400, "input_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": BIG}, 413, None),
    ("/v1/nowhere", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[2]}-{b[3]}" for b in BAD])
def test_bad_requests_get_one_error_shape_and_the_server_keeps_serving(server, path, body, status, param):
    send = dict(content=body) if isinstance(body, bytes) else dict(json=body)
    r = httpx.post(f"{server.url}{path}", headers={**AUTH, "Content-Type": "application/json"}, timeout=30, **send)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert 0 < len(error["message"]) <= 300 and "xxxxxxxxxx" not in error["message"] and "gpt-9" * 20 not in error["message"]
    assert "/" not in error["message"].replace("Content-Type: application/json", ""), "no server paths in errors"
    ok = client(server).completions.create(model=MODEL, prompt="ROMEO.", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_api_key_is_required_when_set(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200  # health and metrics need no key
    assert "vllm:num_requests_running" in httpx.get(f"{server.url}/metrics", timeout=10).text


# -- the load test ---------------------------------------------------------------------------------

CLIENTS, REQUESTS = 16, 200
PROMPTS = heldout_prompts(20)
COMBOS = [(p, m) for p in PROMPTS for m in (8, 24)]  # (prompt, max_tokens), greedy


def kind(i: int) -> str:
    return {3: "stream-leave", 7: "leave"}.get(i % 10, "stream" if i % 3 == 0 else "whole")


async def drive(server, requests: list[int], clients: int) -> dict[int, tuple]:
    """Run requests (indices into the load pattern) from `clients` concurrent clients; i -> outcome."""
    c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    raw = httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120)
    todo, results = list(requests), {}

    async def one(i: int) -> tuple:
        prompt, max_tokens = COMBOS[i % len(COMBOS)]
        try:
            if kind(i) == "whole":
                r = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0)
                return ("done", r.choices[0].text, r.usage.completion_tokens)
            if kind(i) == "stream":
                text, usage = "", None
                async for ch in await c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                           temperature=0, stream=True,
                                                           stream_options={"include_usage": True}):
                    text += ch.choices[0].text if ch.choices else ""
                    usage = ch.usage or usage
                return ("done", text, usage.completion_tokens)
            long = dict(model=MODEL, prompt=prompt, max_tokens=600, temperature=0, ignore_eos=True)
            if kind(i) == "stream-leave":  # read two chunks, then hang up
                stream = await c.completions.create(stream=True, **{k: v for k, v in long.items() if k != "ignore_eos"},
                                                    extra_body={"ignore_eos": True})
                for _ in range(2):
                    await stream.__anext__()
                await stream.close()
                return ("left",)
            try:  # "leave": a non-streaming client that gives up waiting
                await raw.post("/v1/completions", json=long, timeout=httpx.Timeout(120, read=0.3))
            except httpx.ReadTimeout:
                return ("left",)
            return ("finished before leaving",)
        except openai.APIStatusError as ex:
            return ("error", ex.status_code)

    async def worker():
        while todo:
            i = todo.pop(0)
            results[i] = await one(i)

    await asyncio.wait_for(asyncio.gather(*[worker() for _ in range(clients)]), timeout=600)
    await c.close()
    await raw.aclose()
    return results


def settle(server, timeout: float = 10) -> dict[str, float]:
    """Metrics once the engine holds nothing (aborts land at the next step); bounded."""
    end = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["vllm:num_requests_running"] == m["vllm:num_requests_waiting"] == m["moedeploy:kv_cache_tokens"] == 0
        if idle or time.monotonic() > end:
            return m
        time.sleep(0.1)


def test_load_16_clients_200_requests(server, tokenizer):
    asyncio.run(drive(server, list(range(32)), CLIENTS))  # warm-up: the allocator and caches reach steady state
    before, rss_before = settle(server), server_rss(server)
    results = asyncio.run(drive(server, list(range(REQUESTS)), CLIENTS))
    after, rss_after = settle(server), server_rss(server)

    errors = {i: r for i, r in results.items() if r[0] == "error"}
    assert not errors, f"failed requests: {errors}"
    assert all(r[0] == "left" for i, r in results.items() if "leave" in kind(i))
    done = {i: r for i, r in results.items() if r[0] == "done"}
    assert len(done) == REQUESTS - 40
    # Nothing is held: no running or waiting request, no KV column.
    assert after["vllm:num_requests_running"] == after["vllm:num_requests_waiting"] == 0
    assert after["moedeploy:kv_cache_tokens"] == 0
    # Every completed greedy response equals the same request served alone.
    alone = {}
    c = client(server)
    for prompt, max_tokens in COMBOS:
        alone[prompt, max_tokens] = c.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                         temperature=0).choices[0].text
    differ = [i for i, r in done.items() if r[1] != alone[COMBOS[i % len(COMBOS)]]]
    assert not differ, f"{len(differ)} of {len(done)} batched answers differ from the same request alone"
    # The counters agree with what the clients saw.
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    finished = {reason: delta.get(f"vllm:request_success_total{{finished_reason={reason}}}", 0)
                for reason in ("stop", "length", "abort", "timeout", "error")}
    assert finished["stop"] + finished["length"] == len(done)
    assert finished["abort"] == delta["moedeploy:client_disconnects_total"] == 40
    assert finished["timeout"] == finished["error"] == 0
    assert delta["vllm:e2e_request_latency_seconds_count"] == REQUESTS
    prompt_tokens = sum(len(tokenizer(COMBOS[i % len(COMBOS)][0]).input_ids) for i in range(REQUESTS))
    assert delta["vllm:prompt_tokens_total"] == prompt_tokens
    received = sum(r[2] for r in done.values())
    assert received <= delta["vllm:generation_tokens_total"] <= received + 40 * 600
    assert len(done) <= delta["vllm:time_to_first_token_seconds_count"] <= REQUESTS
    # Memory is back near its level after warm-up.
    assert rss_after <= 1.10 * rss_before, f"RSS {rss_before / 2**20:.0f} MiB after warm-up, {rss_after / 2**20:.0f} after"


def test_budgeted_server_answers_as_the_resident_one(server, serve):
    budgeted = serve("--dtype", "float32", "--api-key", KEY, "--expert-memory", "0.25", "--policy", "lifo")
    pattern = [i for i in range(40) if kind(i) in ("whole", "stream")]
    want = asyncio.run(drive(server, pattern, 8))
    got = asyncio.run(drive(budgeted, pattern, 8))
    assert got == want
    m = metrics(budgeted)
    assert m["moedeploy:expert_cache_misses_total"] > 0 and m["moedeploy:expert_cache_hits_total"] > 0
    assert 0 < m["moedeploy:expert_resident_bytes"] <= 0.25 * metrics(server)["moedeploy:expert_resident_bytes"] + 1


# -- limits, timeouts, shutdown --------------------------------------------------------------------

def test_full_queue_timeouts_and_sigterm(serve):
    # the long request must outlast the time limit on a fast machine (1000 demo tokens took under 3 s on an
    # AVX-512 EPYC), and the queued one, sent 0.3 s after it, finish within its own limit once the long one ends
    small = serve("--dtype", "float32", "--max-running", "1", "--max-queue", "1", "--request-timeout", "1",
                  "--shutdown-grace", "1")
    c = openai.OpenAI(base_url=f"{small.url}/v1", api_key="none", max_retries=0, timeout=60)
    long = dict(model=MODEL, prompt="ROMEO.", max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})
    start = time.monotonic()
    stream = c.completions.create(stream=True, **long)  # runs, then times out
    next(iter(stream))
    time.sleep(0.3)
    with httpx.Client(base_url=small.url, timeout=60) as raw:
        waiting = []
        import threading

        t = threading.Thread(target=lambda: waiting.append(raw.post("/v1/completions", json={
            "model": MODEL, "prompt": "ROMEO.", "max_tokens": 4, "temperature": 0})))
        t.start()
        end = time.monotonic() + 10
        while metrics(small)["vllm:num_requests_waiting"] < 1 and time.monotonic() < end:
            time.sleep(0.02)
        refused = httpx.post(f"{small.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=10)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.APIError, match="time limit"):
            for _ in stream:
                pass
        assert 0.9 < time.monotonic() - start < 30
        t.join(30)
        assert waiting[0].status_code == 200, waiting[0].text  # it ran once the long one ended
    assert metrics(small)["vllm:request_success_total{finished_reason=timeout}"] == 1
    # SIGTERM: intake stops, what is in flight is aborted after the grace, the process exits 0.
    stream = c.completions.create(stream=True, **long)
    next(iter(stream))
    small.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    with pytest.raises((openai.APIError, httpx.HTTPError)):  # an error event, or the connection closed
        for _ in stream:
            pass
    assert small.proc.wait(30) == 0 and time.monotonic() - sent < 20
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{small.url}/health", timeout=5)


def test_the_listening_socket_says_it_is_tcp():
    """asyncio sets TCP_NODELAY only on sockets created with IPPROTO_TCP; without it, Nagle's algorithm held every
    streamed token on a kept-alive connection until the client's delayed ACK (about 40 ms each)."""
    import socket

    from moedeploy.server.cli import _listen

    sock = _listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_bench_serve_runs_and_reports_one_json_object():
    """The benchmark's smoke run: a server and the one-by-one baseline, a few requests, one JSON line."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "moedeploy", "bench", "serve", "--requests", "4", "--concurrency", "1,2",
                          "--max-tokens", "4", "--baselines", "transformers", "--request-rate", "50", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = {(r["system"], r["concurrency"]): r for r in report["rows"]}
    assert set(rows) == {("moedeploy", 1), ("moedeploy", 2), ("transformers", 1)}
    assert all(r["completed"] == 4 and r["failed"] == 0 for r in rows.values())
    assert rows["moedeploy", 2]["same_as_alone"] == 1.0 and rows["moedeploy", 2]["tokens_per_step"] > 0
    assert "moedeploy @ c=2 / transformers one by one" in report["ratios"]
    assert report["skipped"] == {} and report["machine"]["cores"] >= 1
