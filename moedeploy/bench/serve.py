"""`moedeploy bench serve`: moedeploy's server against transformers and llama.cpp on the same requests, in one run.

    workload: N prompts of mixed lengths from a text, greedy, max_tokens each, streamed
    for each system: start its server (its own process) ─► warm up ─► for each concurrency: N requests from
    `concurrency` client tasks (optionally Poisson arrivals) ─► requests/s, output tokens/s, TTFT, TPOT, ITL
    ─► stop it

Systems: `moedeploy` (one row set per `--expert-memory`), `transformers-serve` (`transformers serve
--continuous-batching`, its own server), `llama-server` (with `--llama-server BIN --gguf FILE`), and
`transformers` generating the requests one by one in this process (concurrency 1). Every server gets the same
number of threads (`--threads`; OMP_NUM_THREADS for transformers serve), and the client runs beside them.

What `vllm bench serve` reports, computed as it does: TTFT from sending to the first streamed token; TPOT =
(latency - TTFT) / (output tokens - 1), per request; ITL = the gaps between streamed chunks. Each as mean, median
and p99 in milliseconds. `same_as_alone` is the share of a row's answers equal to the same system's answers at
concurrency 1 (batch invariance; greedy). For moedeploy the server's /metrics add tokens per engine step, the
share of experts a step activates, and the expert cache's hit rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..cliargs import at_least

CONCURRENCY = (1, 2, 4, 8, 16, 32)
START_S = 300  # the longest a server may take to load and answer its first request


@dataclass(frozen=True)
class Workload:
    prompts: tuple[str, ...]
    max_tokens: int
    request_rate: float = math.inf  # requests/s with Poisson arrivals; inf: as fast as concurrency allows


def mixed_prompts(text: str, n: int, seed: int = 0) -> tuple[str, ...]:
    """n slices of `text`, 20 to 600 characters (log-uniform: many short, some long; with the demo model's tokenizer
    about 5 to 150 tokens), at random places."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = int(math.exp(rng.uniform(math.log(20), math.log(600))))
        start = rng.randrange(0, max(len(text) - length, 1))
        out.append(text[start:start + length])
    return tuple(out)


@dataclass
class Sample:
    """One request as the client saw it."""

    text: str = ""
    tokens: int = 0
    ttft: float = math.nan
    latency: float = math.nan
    itl: list[float] = field(default_factory=list)
    error: str | None = None


# -- the client ----------------------------------------------------------------------------------------

async def _one(client, model: str, prompt: str, max_tokens: int, count_tokens) -> Sample:
    import openai

    sample = Sample()
    start = last = time.perf_counter()
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage is not None:
                sample.tokens = chunk.usage.completion_tokens
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            if math.isnan(sample.ttft):
                sample.ttft = now - start
            else:
                sample.itl.append(now - last)
            last = now
            sample.text += chunk.choices[0].text
    except openai.APIError as ex:
        sample.error = f"{type(ex).__name__}: {str(ex)[:200]}"
        return sample
    sample.latency = time.perf_counter() - start
    sample.tokens = sample.tokens or count_tokens(sample.text)
    return sample


async def drive(url: str, model: str, load: Workload, concurrency: int, count_tokens, seed: int = 0):
    """Every prompt of `load` once, at most `concurrency` in flight; returns (samples in prompt order, seconds)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)

    async def request(i: int, delay: float) -> Sample:
        await asyncio.sleep(delay)
        async with gate:
            return await _one(client, model, load.prompts[i], load.max_tokens, count_tokens)

    delays, t = [], 0.0
    for _ in load.prompts:
        delays.append(t)
        t += 0 if math.isinf(load.request_rate) else rng.expovariate(load.request_rate)
    start = time.perf_counter()
    samples = await asyncio.gather(*[request(i, d) for i, d in enumerate(delays)])
    seconds = time.perf_counter() - start
    await client.close()
    return list(samples), seconds


# -- the systems -----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on loopback: started, waited for (bounded), stopped; its output goes to a log file."""

    def __init__(self, name: str, command: list[str], model: str, url: str | None = None, env: dict | None = None):
        self.name, self.model, self.url = name, model, url
        self.log = Path(tempfile.mkstemp(prefix=f"bench-serve-{name}-", suffix=".log")[1])
        self.proc = subprocess.Popen(command, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait(self, health: str) -> Server:
        import httpx

        from ..errors import MoeDeployError

        end = time.monotonic() + START_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise MoeDeployError(f"bench serve: {self.name} exited with {self.proc.returncode}; its log "
                                     f"({self.log}) ends with:\n{self.log.read_text()[-1500:]}")
            if self.url is None and (found := re.search(r"at (http://[\d.]+:\d+)/v1", self.log.read_text())):
                self.url = found.group(1)
            try:
                if self.url and httpx.get(f"{self.url}{health}", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop(keep_log=True)
        raise MoeDeployError(f"bench serve: {self.name} was not ready within {START_S} s (log: {self.log})")

    def metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels.keys()
                - {"model_name"}}

    def stop(self, keep_log: bool = False) -> None:
        """SIGTERM, then SIGKILL after 30 s; the log is removed unless asked to keep it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not keep_log:
            self.log.unlink(missing_ok=True)


def start_moedeploy(args, budget: float | None) -> Server:
    command = [sys.executable, "-m", "moedeploy", "serve", "--port", "0", "--dtype", args.dtype, "--threads",
               str(args.threads), "--served-model-name", "bench", "--max-running", str(max(args.concurrency))]
    if args.model:
        command += ["--model", args.model]
    if budget is not None:
        command += ["--expert-memory", str(budget), "--expert-store", "host"]  # the cache's cost, not disk reads
    return Server("moedeploy" if budget is None else f"moedeploy {budget:g}", command, "bench").wait("/health")


def start_transformers_serve(args, path: Path) -> Server:
    port = _free_port()
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(path), "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", args.dtype]
    env = {"OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    return Server("transformers-serve", command, str(path), f"http://127.0.0.1:{port}", env).wait("/v1/models")


def start_llama_server(args, context: int) -> Server:
    port = _free_port()
    slots = max(args.concurrency)
    command = [args.llama_server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", str(args.threads),
               "-np", str(slots), "-c", str(slots * context), "--no-webui", "--no-warmup"]
    return Server("llama-server", command, "gguf", f"http://127.0.0.1:{port}").wait("/health")


def transformers_one_by_one(path: Path, load: Workload, dtype: str, threads: int) -> tuple[list[Sample], float]:
    """The requests through `transformers` generate, one after another, in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..timing import TokenClock

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype) if dtype != "auto" else "auto").eval()
    samples = []

    def run(prompt: str) -> Sample:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        clock = TokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=load.max_tokens, do_sample=False, streamer=clock,
                                 pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:]
        times = clock.times[1:]  # [0] is the prompt
        return Sample(text=tokenizer.decode(new, skip_special_tokens=True), tokens=len(new), ttft=times[0] - start,
                      latency=times[-1] - start, itl=[b - a for a, b in zip(times, times[1:])])

    run(load.prompts[0])  # warm-up
    start = time.perf_counter()
    samples = [run(p) for p in load.prompts]
    return samples, time.perf_counter() - start


# -- the report ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stat:
    mean: float
    median: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> Stat | None:
        values = sorted(v * 1e3 for v in values if not math.isnan(v))
        if not values:
            return None
        p99 = values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]
        return cls(round(statistics.fmean(values), 2), round(statistics.median(values), 2), round(p99, 2))


@dataclass(frozen=True)
class Row:
    system: str
    concurrency: int
    completed: int
    failed: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    ttft_ms: Stat | None
    tpot_ms: Stat | None
    itl_ms: Stat | None
    same_as_alone: float | None = None  # share of answers equal to this system's at concurrency 1
    tokens_per_step: float | None = None  # moedeploy: mean tokens in an engine step
    active_expert_share: float | None = None  # moedeploy: mean share of a layer's experts a step activates
    hit_rate: float | None = None  # moedeploy under a budget: expert-cache hits / (hits + misses)
    first_error: str | None = None  # what the first failed request got


def row(system: str, concurrency: int, samples: list[Sample], seconds: float, alone: list[Sample] | None,
        engine: dict | None = None) -> Row:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    same = None
    if alone is not None:
        same = round(sum(a.error is None and a.text == s.text for s, a in zip(samples, alone)) / len(samples), 3)
    return Row(system=system, concurrency=concurrency, completed=len(ok), failed=len(samples) - len(ok),
               seconds=round(seconds, 3), requests_per_s=round(len(ok) / seconds, 3),
               output_tokens_per_s=round(tokens / seconds, 2), ttft_ms=Stat.of([s.ttft for s in ok]),
               tpot_ms=Stat.of([(s.latency - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]),
               itl_ms=Stat.of([g for s in ok for g in s.itl]), same_as_alone=same,
               first_error=next((s.error for s in samples if s.error is not None), None), **(engine or {}))


def engine_stats(before: dict, after: dict) -> dict:
    """Per-step expert activity and cache hit rate between two scrapes of moedeploy's /metrics."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    steps = d.get("moedeploy:engine_steps_total", 0)
    if not steps:
        return {}
    lookups = d["moedeploy:expert_cache_hits_total"] + d["moedeploy:expert_cache_misses_total"]
    return {"tokens_per_step": round(d["moedeploy:engine_step_tokens_total"] / steps, 2),
            "active_expert_share": round(d["moedeploy:active_experts_total"] / steps / after["moedeploy:experts"], 3),
            "hit_rate": round(d["moedeploy:expert_cache_hits_total"] / lookups, 3) if lookups else None}


def bench_server(server: Server, args, load: Workload, count_tokens, progress) -> list[Row]:
    warm = Workload(load.prompts[: max(args.concurrency)], min(load.max_tokens, 8))
    asyncio.run(drive(server.url, server.model, warm, max(args.concurrency), count_tokens))
    rows, alone = [], None
    for c in args.concurrency:
        before = server.metrics() if server.name.startswith("moedeploy") else {}
        samples, seconds = asyncio.run(drive(server.url, server.model, load, c, count_tokens, seed=args.seed))
        engine = engine_stats(before, server.metrics()) if before else None
        alone = samples if c == 1 else alone
        rows.append(row(server.name, c, samples, seconds, alone, engine))
        progress(f"bench serve: {server.name} c={c}: {rows[-1].output_tokens_per_s:.0f} output tok/s, "
                 f"{rows[-1].failed} failed")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory; default: the embedded demo model")
    parser.add_argument("--text", help="a UTF-8 text to cut prompts from (default: the demo model's held-out plays)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="requests in flight, a list")
    parser.add_argument("--requests", type=at_least(1), default=64, help="requests per concurrency level (default 64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (greedy; default 32)")
    parser.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals, requests/s (default: all at once)")
    parser.add_argument("--expert-memory", default="none", help="moedeploy budgets to run: none (all resident), fractions "
                        "(0.25), a list (none,0.25,1.0)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16, for every system")
    parser.add_argument("--threads", type=int, default=max(len(os.sched_getaffinity(0)) - 1, 1),
                        help="threads per server (default: every core but one; the client needs the other)")
    parser.add_argument("--baselines", default="transformers,transformers-serve,llama-server",
                        help="which baselines to run beside moedeploy")
    parser.add_argument("--llama-server", help="a llama.cpp llama-server binary (for the llama-server baseline)")
    parser.add_argument("--gguf", help="the model converted to GGUF, for --llama-server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the JSON report to this file")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..api import DEMO_MODEL
    from ..cliargs import int_list, read_text
    from ..errors import MoeDeployError
    from .layer import machine

    args.concurrency = int_list(args.concurrency, "--concurrency")
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1 or args.max_tokens < 1:
        raise MoeDeployError("--concurrency, --requests and --max-tokens take positive integers")
    baselines = {b.strip() for b in args.baselines.split(",") if b.strip()}
    unknown = baselines - {"transformers", "transformers-serve", "llama-server"}
    if unknown:
        raise MoeDeployError(f"unknown baselines {sorted(unknown)}; choose from transformers, transformers-serve, llama-server")
    try:
        budgets = [None if b.strip() == "none" else float(b) for b in args.expert_memory.split(",") if b.strip()]
    except ValueError as ex:
        raise MoeDeployError(f"--expert-memory takes none or fractions, got {args.expert_memory!r}") from ex
    path = Path(args.model) if args.model else DEMO_MODEL
    text = read_text(args.text, "--text") if args.text else "\n".join(
        p.read_text(encoding="utf-8") for p in sorted((DEMO_MODEL.parent / "heldout").glob("*.txt")))
    load = Workload(mixed_prompts(text, args.requests, args.seed), args.max_tokens, args.request_rate)
    tokenizer = AutoTokenizer.from_pretrained(path)
    count_tokens = lambda s: len(tokenizer(s, add_special_tokens=False).input_ids)  # noqa: E731
    prompt_tokens = [len(tokenizer(p).input_ids) for p in load.prompts]
    progress = (lambda line: None) if args.json else lambda line: print(line, file=sys.stderr, flush=True)
    skipped = {}
    if "llama-server" in baselines and not (args.llama_server and args.gguf):
        skipped["llama-server"] = "no --llama-server BIN --gguf FILE given"
        baselines.discard("llama-server")
    if "llama-server" in baselines and not shutil.which(args.llama_server):
        raise MoeDeployError(f"--llama-server {args.llama_server} is not an executable")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows: list[Row] = []
    starts = [("moedeploy" if b is None else f"moedeploy {b:g}", lambda b=b: start_moedeploy(args, b)) for b in budgets]
    if "transformers-serve" in baselines:
        starts.append(("transformers-serve", lambda: start_transformers_serve(args, path)))
    if "llama-server" in baselines:
        starts.append(("llama-server", lambda: start_llama_server(args, max(prompt_tokens) + args.max_tokens + 16)))
    for name, start in starts:
        progress(f"bench serve: starting {name} ...")
        server = start()
        try:
            rows += bench_server(server, args, load, count_tokens, progress)
        finally:
            server.stop()
    if "transformers" in baselines:
        progress("bench serve: transformers, one request after another ...")
        samples, seconds = transformers_one_by_one(path, load, args.dtype, args.threads)
        rows.append(row("transformers", 1, samples, seconds, None))
    report = {"benchmark": "moedeploy bench serve", "date": started, "machine": asdict(machine()), "model": str(path),
              "dtype": args.dtype, "threads": args.threads, "requests": args.requests, "max_tokens": args.max_tokens,
              "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
              "prompt_tokens": {"min": min(prompt_tokens), "median": statistics.median(prompt_tokens),
                                "max": max(prompt_tokens)},
              "skipped": skipped, "rows": [asdict(r) for r in rows], "ratios": ratios(rows)}
    if not args.json:
        print_table(rows, skipped)
    line = json.dumps(report)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0 if all(r.failed == 0 for r in rows) else 1


def ratios(rows: list[Row]) -> dict:
    """moedeploy's output tokens/s over each baseline's, at each concurrency (one by one: the same number)."""
    by = {(r.system, r.concurrency): r for r in rows}
    out = {}
    for (system, c), r in by.items():
        if not system.startswith("moedeploy"):
            continue
        for base in ("transformers-serve", "llama-server"):
            if (base, c) in by:
                out[f"{system} / {base} @ c={c}"] = round(r.output_tokens_per_s / by[base, c].output_tokens_per_s, 2)
        if ("transformers", 1) in by:
            out[f"{system} @ c={c} / transformers one by one"] = round(
                r.output_tokens_per_s / by["transformers", 1].output_tokens_per_s, 2)
    return out


def print_table(rows: list[Row], skipped: dict) -> None:
    fmt = lambda s: "-" if s is None else f"{s.mean:7.1f} {s.median:7.1f} {s.p99:7.1f}"  # noqa: E731
    opt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"{'system':>20s} {'conc':>4s} {'ok':>4s} {'req/s':>7s} {'out tok/s':>9s} "
          f"{'TTFT mean/med/p99 ms':>23s} {'TPOT mean/med/p99 ms':>23s} {'ITL mean/med/p99 ms':>23s} "
          f"{'same':>5s} {'tok/step':>8s} {'active':>6s} {'hit':>5s}")
    for r in rows:
        print(f"{r.system:>20s} {r.concurrency:4d} {r.completed:4d} {r.requests_per_s:7.2f} {r.output_tokens_per_s:9.1f} "
              f"{fmt(r.ttft_ms):>23s} {fmt(r.tpot_ms):>23s} {fmt(r.itl_ms):>23s} {opt(r.same_as_alone, '.2f'):>5s} "
              f"{opt(r.tokens_per_step, '.1f'):>8s} {opt(r.active_expert_share, '.2f'):>6s} {opt(r.hit_rate, '.3f'):>5s}")
    for r in rows:
        if r.first_error:
            print(f"{r.system} c={r.concurrency}: {r.failed} failed, the first with: {r.first_error}")
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
