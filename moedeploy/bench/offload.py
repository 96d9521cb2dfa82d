"""`moedeploy bench offload`: end-to-end decoding under a memory budget, with peak memory, against
the same model fully resident and against transformers + accelerate offloading, in one run.

Every configuration runs in its own process, so its peak memory is its own:

- `resident`: moedeploy, every expert in memory (the baseline; run first and last, and ratios are
  to the mean of the two, so drift during the run shows instead of hiding);
- `transformers`: the transformers model as users load it, every weight in memory;
- `moedeploy f`: an expert budget of fraction f of all expert bytes, the rest in `--store` (disk:
  the checkpoint, read per miss; host: memory), LRU, lookahead prefetch (and, with
  `--prefetch lookahead,none`, also `moedeploy f no-prefetch`);
- `accelerate f`: transformers with `device_map="auto"`, `max_memory` = the dense weights plus the
  same fraction f of the expert bytes, the rest offloaded to disk by accelerate (`offload_folder`).

`--expert-dtype none,int4` repeats the resident and moedeploy rows with quantized experts (the budget
is then a fraction of the quantized expert bytes, and misses move the small form); each such row is
compared with the resident model of its own expert dtype (its rate and its tokens). The cache's figures
(miss rate, MB moved, stall and transfer bound per token) are the decode steps', like the rate: the prompt
step is left out. `--dtype` sets the model dtype (default: the
checkpoint's); `--no-baselines` leaves out transformers and accelerate.

On a CPU the "device" is host memory, so the comparison is memory budget vs disk. With `--device
cuda` the device is the GPU: the budget is GPU memory for experts, moedeploy's other experts wait in
pinned host memory (`--store host`) or on disk, and accelerate offloads to host memory
(`max_memory={0: dense + f * experts, "cpu": ...}`); the run also measures the host-to-device
bandwidth of pinned memory, and each budget's transfer bound: bytes moved per token / that bandwidth.
Decode rate is the median over rounds of tokens after the first per second; peak memory is sampled
from /proc (anonymous resident memory: what the process holds, not the reclaimable page cache of
memory-mapped files), and on CUDA also the peak of GPU memory allocated by torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..cliargs import at_least
from .layer import machine

BUDGETS = (0.1, 0.25, 0.5, 1.0)


class PeakMemory(threading.Thread):
    """Samples this process's resident memory (/proc/self/status) every `every` seconds."""

    def __init__(self, every: float = 0.002):
        super().__init__(daemon=True)
        self.every, self.peak_anon, self.peak_rss = every, 0, 0

    @staticmethod
    def now() -> tuple[int, int]:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        kib = lambda key: int(fields.get(key, "0 kB").split()[0]) * 1024  # noqa: E731
        return kib("RssAnon"), kib("VmRSS")

    def run(self):
        while True:
            anon, rss = self.now()
            self.peak_anon, self.peak_rss = max(self.peak_anon, anon), max(self.peak_rss, rss)
            time.sleep(self.every)


@dataclass(frozen=True)
class Config:
    kind: str  # "resident", "transformers", "moedeploy", "accelerate"
    budget: float | None = None  # fraction of all expert bytes
    store: str = "disk"
    prefetch: str | None = "lookahead"  # moedeploy only
    device: str = "cpu"
    expert_dtype: str | None = None  # resident and moedeploy: "int8" / "int4" quantized experts
    dtype: str | None = None  # the model dtype; None: the checkpoint's

    @property
    def name(self) -> str:
        name = self.kind if self.budget is None else f"{self.kind} {self.budget:g}"
        name += f" {self.expert_dtype}" if self.expert_dtype else ""
        return name + (" no-prefetch" if self.kind == "moedeploy" and self.prefetch is None else "")


@dataclass(frozen=True)
class Row:
    config: str
    budget: float | None
    decode_tokens_per_s: float
    ratio_to_resident: float
    identical: bool  # the same tokens as the resident model
    peak_anon_mb: float  # peak anonymous resident memory of the process
    peak_rss_mb: float  # peak resident memory including mapped file pages
    load_s: float
    miss_rate: float | None = None
    prefetch_useful: float | None = None  # useful prefetches / prefetches
    mb_moved_per_token: float | None = None
    stall_ms_per_token: float | None = None  # waiting for demand copies and late prefetches
    peak_device_mb: float | None = None  # CUDA: peak GPU memory allocated by torch
    transfer_bound_ms_per_token: float | None = None  # CUDA: bytes moved per token / measured H2D bandwidth


def weight_bytes(path: Path) -> tuple[int, int]:
    """(dense bytes, routed-expert bytes) of a checkpoint, from its safetensors headers."""
    from safetensors import safe_open

    dense = experts = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                size = math.prod(s.get_shape()) * _ITEMSIZE[s.get_dtype()]  # a scalar's shape is [], prod 1
                if ".experts." in name:
                    experts += size
                else:
                    dense += size
    return dense, experts


_ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # safetensors dtype -> bytes per element


def _load(cfg: Config, path: Path, offload_dir: str):
    from transformers import AutoModelForCausalLM

    from ..api import load

    dtype = cfg.dtype or "auto"
    if cfg.kind == "resident":
        return load(path, device=cfg.device, dtype=cfg.dtype, expert_dtype=cfg.expert_dtype)
    if cfg.kind == "moedeploy":
        return load(path, device=cfg.device, dtype=cfg.dtype, expert_dtype=cfg.expert_dtype, expert_memory=cfg.budget,
                    expert_store=cfg.store, prefetch=cfg.prefetch)
    if cfg.kind == "transformers":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(cfg.device)
    dense, experts = weight_bytes(path)
    budget = int(dense + cfg.budget * experts)
    max_memory = {"cpu": budget} if cfg.device == "cpu" else {0: budget, "cpu": 2**40}  # the rest: disk / host
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", offload_folder=offload_dir,
                                                max_memory=max_memory)


def h2d_bandwidth(nbytes: int = 2**28, repeats: int = 5) -> float:
    """Bytes per second from pinned host memory to the GPU: the median of `repeats` copies of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return nbytes / statistics.median(times[1:])


def child(cfg: Config, path: Path, prompt: str, new_tokens: int, rounds: int, threads: int) -> dict:
    """Runs in the configuration's own process: load, warm up, decode `rounds` times."""
    import warnings

    from transformers import AutoTokenizer

    from ..timing import decode_rate, since

    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    memory = PeakMemory()
    memory.start()
    with tempfile.TemporaryDirectory() as offload_dir:
        start = time.perf_counter()
        model = _load(cfg, path, offload_dir)
        load_s = time.perf_counter() - start
        ids = AutoTokenizer.from_pretrained(path)(prompt, return_tensors="pt").input_ids.to(model.device)
        decode_rate(model, ids, 4)  # warm-up
        if cfg.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rates, out, cache = [], None, None
        for _ in range(rounds):
            runtime = getattr(model, "moedeploy", None)
            if runtime:
                runtime.empty_cache()  # every round from an empty cache
            counters = runtime.cache_stats if runtime else lambda: None  # None: no expert budget
            first = {}  # the cache's counters when the first new token arrives: the decode steps' are the rest
            rate, out = decode_rate(model, ids, new_tokens, on_first=lambda f=first, c=counters: f.update(c() or {}))
            rates.append(rate)
            cache = since(first, counters())
    anon, rss = PeakMemory.now()
    cuda = cfg.device == "cuda"
    return dict(rate=statistics.median(rates), tokens=out[0].tolist(), load_s=load_s, cache=cache,
                peak_anon=max(memory.peak_anon, anon), peak_rss=max(memory.peak_rss, rss),
                peak_device=torch.cuda.max_memory_allocated() if cuda else None,
                h2d=h2d_bandwidth() if cuda and cfg.kind == "resident" else None)


def _spawn(cfg: Config, args, timeout: float) -> dict:
    spec = json.dumps(dict(cfg=asdict(cfg), path=str(args.model_path), prompt=args.prompt, new_tokens=args.new_tokens,
                           rounds=args.rounds, threads=args.threads))
    try:
        proc = subprocess.run([sys.executable, "-m", "moedeploy.bench.offload", spec], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        from ..errors import MoeDeployError

        raise MoeDeployError(f"bench offload: {cfg.name} did not finish in {timeout:.0f} s; "
                             "try fewer --new-tokens or --rounds") from None
    if proc.returncode != 0:
        from ..errors import MoeDeployError

        raise MoeDeployError(f"bench offload: {cfg.name} failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(args, progress=print) -> tuple[list[Row], float | None]:
    """The rows, and on CUDA the measured host-to-device bandwidth (bytes/s)."""
    dev, dt = args.device, args.dtype
    configs = [Config("resident", device=dev, dtype=dt)] + [Config("transformers", device=dev, dtype=dt)] * args.baselines
    configs += [Config("resident", device=dev, expert_dtype=q, dtype=dt) for q in args.expert_dtypes if q]
    for b in args.budgets:
        configs += [Config("moedeploy", b, args.store, prefetch, dev, q, dt)
                    for q in args.expert_dtypes for prefetch in args.prefetch]
        configs += [Config("accelerate", b, device=dev, dtype=dt)] * args.baselines
    configs += [Config("resident", device=dev, dtype=dt)]
    results = []
    for cfg in configs:
        progress(f"bench offload: {cfg.name} ...")
        results.append((cfg, _spawn(cfg, args, args.timeout)))
    h2d = results[0][1]["h2d"]
    resident = {cfg.expert_dtype: r for cfg, r in results if cfg.kind == "resident"}  # each expert dtype's baseline
    base = {q: r["rate"] for q, r in resident.items()}  # quantized: its one resident run; the model dtype: the mean
    base[None] = (results[0][1]["rate"] + results[-1][1]["rate"]) / 2  # of the first and the last
    steps = max(args.new_tokens - 1, 1)  # decode steps: the cache counters are theirs (the prompt step's left out)
    rows = []
    for cfg, r in results:
        own = cfg.expert_dtype if cfg.kind in ("resident", "moedeploy") else None
        cache = r["cache"]
        rows.append(Row(config=cfg.name, budget=cfg.budget, decode_tokens_per_s=round(r["rate"], 2),
                        ratio_to_resident=round(r["rate"] / base[own], 3),
                        identical=r["tokens"] == resident[own]["tokens"],
                        peak_anon_mb=round(r["peak_anon"] / 2**20, 1), peak_rss_mb=round(r["peak_rss"] / 2**20, 1),
                        load_s=round(r["load_s"], 2),
                        miss_rate=cache and round(cache["misses"] / max(cache["hits"] + cache["misses"], 1), 4),
                        prefetch_useful=cache and round(cache["prefetch_hits"] / max(cache["prefetched"], 1), 3),
                        mb_moved_per_token=cache and round(cache["bytes_moved"] / 2**20 / steps, 3),
                        stall_ms_per_token=cache and round(cache["stall_s"] * 1e3 / steps, 3),
                        peak_device_mb=None if r["peak_device"] is None else round(r["peak_device"] / 2**20, 1),
                        transfer_bound_ms_per_token=None if not (cache and h2d) else
                        round(cache["bytes_moved"] / steps / h2d * 1e3, 3)))
    return rows, h2d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory; default: the embedded demo model")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="fractions of all expert bytes")
    parser.add_argument("--store", default="disk", help="where moedeploy keeps non-resident experts: disk or host")
    parser.add_argument("--prefetch", default="lookahead", help="moedeploy's prefetchers to run, comma-separated: "
                        "lookahead, sida, none (default lookahead; lookahead,none runs both)")
    parser.add_argument("--new-tokens", type=at_least(2), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--prompt", default="ROMEO.\nBut soft, what light")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the budget is: host memory or the GPU")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each configuration's process")
    parser.add_argument("--expert-dtype", default="none",
                        help="expert dtypes to run, comma-separated: none (the model dtype), int8, int4")
    parser.add_argument("--dtype", default=None, help="model dtype (default: the checkpoint's)")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="leave out transformers and accelerate")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may take")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")


def run(args: argparse.Namespace) -> int:
    from ..api import DEMO_MODEL
    from ..cliargs import fractions
    from ..errors import MoeDeployError

    if importlib.util.find_spec("accelerate") is None:
        raise MoeDeployError("bench offload compares with transformers + accelerate: pip install accelerate "
                             "(or pip install -e '.[bench]')")
    args.budgets = fractions(args.budgets)
    from ..predict.ahead import PREFETCHERS

    given, args.prefetch = args.prefetch, [None if p.strip() == "none" else p.strip() for p in args.prefetch.split(",")
                                           if p.strip()]
    if not args.prefetch or any(p not in (None, *PREFETCHERS) for p in args.prefetch):
        raise MoeDeployError(f"--prefetch takes {', '.join(PREFETCHERS)} or none, comma-separated, got {given!r}")
    args.expert_dtypes = [None if q.strip() == "none" else q.strip() for q in args.expert_dtype.split(",") if q.strip()]
    args.model_path = Path(args.model) if args.model else DEMO_MODEL
    if args.device == "cuda" and not torch.cuda.is_available():
        raise MoeDeployError("bench offload --device cuda: torch sees no CUDA device here")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows, h2d = bench(args, progress=(lambda line: None) if args.json else lambda line: print(line, file=sys.stderr))
    dense, experts = weight_bytes(args.model_path)
    report = {"benchmark": "moedeploy bench offload", "date": started, "machine": asdict(machine()),
              "model": str(args.model_path), "dense_bytes": dense, "expert_bytes": experts, "store": args.store,
              "device": args.device, "h2d_bytes_per_s": h2d, "dtype": args.dtype,
              "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
              "rows": [asdict(r) for r in rows]}
    if not args.json:
        print(f"{'config':>28s} {'decode tok/s':>12s} {'vs resident':>11s} {'same':>5s} {'peak anon MB':>12s} "
              f"{'peak RSS MB':>11s} {'miss':>6s} {'useful pf':>9s} {'MB/token':>8s} {'stall ms/tok':>12s}"
              + (f" {'GPU MB':>10s} {'bound ms':>9s}" if args.device == "cuda" else ""))
        for r in rows:
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"{r.config:>28s} {r.decode_tokens_per_s:12.2f} {r.ratio_to_resident:10.3f}x {str(r.identical):>5s} "
                  f"{r.peak_anon_mb:12.1f} {r.peak_rss_mb:11.1f} {fmt(r.miss_rate, '.3f'):>6s} "
                  f"{fmt(r.prefetch_useful, '.2f'):>9s} {fmt(r.mb_moved_per_token, '.2f'):>8s} "
                  f"{fmt(r.stall_ms_per_token, '.2f'):>12s}"
                  + (f" {fmt(r.peak_device_mb, '.1f'):>10s} {fmt(r.transfer_bound_ms_per_token, '.2f'):>9s}"
                     if args.device == "cuda" else ""))
    print(json.dumps(report))
    return 0 if all(r.identical for r in rows if r.config.startswith(("moedeploy", "resident"))) else 1


if __name__ == "__main__":  # one configuration, in its own process (see _spawn)
    spec = json.loads(sys.argv[1])
    result = child(Config(**spec["cfg"]), Path(spec["path"]), spec["prompt"], spec["new_tokens"], spec["rounds"],
                   spec["threads"])
    print(json.dumps(result))
