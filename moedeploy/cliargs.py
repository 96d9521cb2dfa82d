"""Argument helpers every command shares: the load options of `moedeploy.load` as flags, integer lists,
text files named on the command line. Below every command module; imports nothing of moedeploy but errors."""

from __future__ import annotations

import argparse

from .errors import MoeDeployError


def read_text(path: str, flag: str) -> str:
    """The UTF-8 text of a file named on the command line, or a clear error naming the flag."""
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise MoeDeployError(f"{flag} {file} is not a file")
    text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise MoeDeployError(f"{flag} {file} is empty")
    return text


def fractions(text: str, flag: str = "--budgets") -> list[float]:
    """'0.1,0.25' from the command line -> [0.1, 0.25], or a clear error naming the flag."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as ex:
        raise MoeDeployError(f"{flag} takes comma-separated fractions, got {text!r}") from ex


def int_list(text: str, flag: str, low: int | None = None) -> list[int]:
    """'1,2,4' from the command line -> [1, 2, 4], or a clear error naming the flag (and `low`, the least allowed)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as ex:
        raise MoeDeployError(f"{flag} takes comma-separated integers, got {text!r}") from ex
    if low is not None and (not values or min(values) < low):
        raise MoeDeployError(f"{flag} takes integers of at least {low}, got {text!r}")
    return values


def at_least(low: int):
    """An argparse `type`: an integer of at least `low` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer is needed, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def add_load_options(p: argparse.ArgumentParser, predictor: bool = True) -> None:
    """predictor=False: the command has its own --predictor (moedeploy predict)."""
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    p.add_argument("--gating", default="dynamic", help="dynamic (exact, default) or static (capacity baseline)")
    p.add_argument("--capacity-factor", type=float, help="static gating: C = ceil(f * k * S / E)")
    p.add_argument("--capacity-fraction", type=float, help="static gating: C = ceil(fraction * S)")
    p.add_argument("--backend", default="auto", help="expert kernel: auto (default), loop, grouped_mm, compiled or native (CPU decode kernels)")
    p.add_argument("--expert-memory", help="resident expert budget: a size (2GiB, 512MB) or a fraction (0.25)")
    p.add_argument("--policy", help="expert eviction policy: lru (default), lfu, fifo, lifo")
    p.add_argument("--cache-scope", help="layer (a share per MoE layer, default) or global (one pool)")
    p.add_argument("--expert-store", help="where non-resident experts wait: host memory or disk (the checkpoint, "
                   "read as needed); default: disk on the CPU, host on a GPU")
    p.add_argument("--pin", help="a routing trace of this model (eval-ppl --trace): keep its hottest experts resident")
    p.add_argument("--pin-fraction", type=float, help="share of each pool's slots for pinned experts (default 0.5)")
    p.add_argument("--prefetch", help="lookahead (each MoE layer prefetches the next layer's predicted experts) or "
                   "sida (a trained predictor prefetches every layer's experts from the step's tokens)")
    p.add_argument("--routing", default="exact", help="exact (default: the router decides), resident (the router's "
                   "choice among resident experts: never waits for a copy) or predicted (SiDA's: the predictor's "
                   "top-k); the last two are approximate and report their departures")
    if predictor:
        p.add_argument("--predictor", help="a SiDA predictor file for this model (moedeploy predict train); default: "
                       "the shipped one, for the demo model")
    p.add_argument("--expert-dtype", help="int8 or int4: routed experts quantized weight-only as they load (torch's "
                   "packed kernels on the CPU; elsewhere each expert dequantized on the device, then a matmul)")
    p.add_argument("--group-size", type=int, help="inputs per quantization scale (int8: default a whole row; "
                   "int4: 32, 64 (default), 128 or 256)")
    p.add_argument("--placement", help="under torchrun: where the experts live (moedeploy place --out); "
                   "default contiguous")
    p.add_argument("--exchange", help="under torchrun: all_gather (default, one collective per MoE layer) or "
                   "all_to_all (the paper's token all-to-all)")
    p.add_argument("--rebalance", action="store_true", default=None,
                   help="under torchrun: re-plan the placement from recent steps and move experts online")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="under torchrun: seconds before a collective that gets no answer ends the run (default 120)")


def load_options(args) -> dict:
    memory = args.expert_memory
    if memory is not None:
        try:
            memory = float(memory) if float(memory) <= 1 else memory  # a bare fraction like 0.25
        except ValueError:
            pass  # a size with a unit: parsed by the cache
    return dict(device=args.device, dtype=args.dtype, gating=args.gating, capacity_factor=args.capacity_factor,
                capacity_fraction=args.capacity_fraction, backend=args.backend, expert_memory=memory,
                policy=args.policy, cache_scope=args.cache_scope, expert_store=args.expert_store, pin=args.pin,
                pin_fraction=args.pin_fraction, prefetch=args.prefetch, placement=args.placement,
                rebalance=args.rebalance, exchange=args.exchange, expert_dtype=args.expert_dtype,
                group_size=args.group_size, routing=args.routing, predictor=getattr(args, "predictor", None))
