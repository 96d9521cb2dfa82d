"""SiDA's runtime: a predictor works in its own thread on each step's tokens while the model runs, and
the whole step's predicted experts go to the cache ahead of need (Du et al., MLSys 2024, adapted).

    step's input_ids [B, S] ─► (predictor thread) SiDA.forward, its LSTM state carried ─► scores [T, L, E]
        ─► per layer: `rank` = the tokens' predicted top-K experts by summed probability  (prefetch)
                      `top`  = each token's predicted top-K ids [T, L, K]          (routing="predicted")
    MoE layer i (model thread) ─► `arrive(i)`: the first layer to find the prediction ready (layer 0
        waits when the routing depends on it) sends layers i..L-1 to their pools' prefetch queues, in
        layer order, and marks them `ahead` (not evicted for an earlier layer of this step)

A prefetch never changes a result (routing="exact"): it only decides what is resident. The predictor's state
follows the model's KV cache: a forward without a cache, or with an empty one, starts new sequences; a forward
that continues a cache continues the state (a decoded token takes SidaNet.step, the fast path), with beam
search's row reorders; a cache that went back (assisted or prompt-lookup decoding crops it) cannot be
followed: routing that reads the prediction refuses it, a prefetch starts over. In the engine's packed steps
(engine/runner.py) each request's chunk continues that request's own state, the running requests' decode
tokens in one batched step, and the states of ended requests are dropped; with `queued` (CUDA) the engine
hands the prompts admitted next over between steps (`prepare`), and their prefill chunks take the prediction
made while other requests ran.

On CUDA the thread works on its own stream; it brings the ranking to the host itself, so the model's
thread never syncs for it.

This module does not train (sida.py) or decide evictions (cache/pool.py).

Legend: B sequences, S tokens per sequence in this step, T = B * S, L MoE layers, E experts, K top-k.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import PredictorError
from .sida import select

ROUTING_MODES = ("exact", "resident", "predicted")
PREFETCHERS = ("lookahead", "sida")


@dataclass
class Prediction:
    rank: list[list[int]]  # per MoE layer, the experts to prefetch, most wanted first
    top: Tensor  # [T, L, K] each token's predicted experts (the model's device)


@dataclass
class AheadStats:
    steps: int = 0
    predict_s: float = 0.0  # the predictor thread's time
    wait_s: float = 0.0  # the model thread waiting for a prediction (layer 0 in resident / predicted routing)
    late_steps: int = 0  # steps whose prediction came after the first MoE layer had started
    prepared: int = 0  # queued prompts predicted ahead of their first step (the engine)

    def as_dict(self) -> dict:
        return {"predictor_steps": self.steps, "predictor_s": round(self.predict_s, 4),
                "predictor_wait_s": round(self.wait_s, 4), "predictor_late_steps": self.late_steps,
                "predictor_prepared": self.prepared}


class Ahead:
    def __init__(self, predictor, layers: list, prefetch: bool, wait: bool):
        """predictor: a SidaPredictor for this model; layers: its MoE layers in model order.
        prefetch: send predictions to the layers' pools. wait: the first MoE layer waits for the
        prediction (the routing reads it) instead of letting a later layer send it."""
        self.predictor = predictor
        self.layers = layers
        self.index = {id(layer): i for i, layer in enumerate(layers)}
        self.prefetch, self.wait = prefetch, wait
        self.K = layers[0].router.top_k  # each token's predicted top-K experts are prefetched (2K: more copies
        # than they save misses, on the CPU measured in docs/benchmarks.md)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="moedeploy-predictor")
        device = predictor.embedding.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.states: dict = {}  # the predictor's state per sequence (sida.State): None for model.generate's batch,
        # a request id for the engine's packed steps
        self.prepared: dict = {}  # request id -> (Future of (scores [S, L, E], state), S): a queued prompt, predicted
        # ahead (`prepare`); the engine's thread only
        self.queued = self.stream is not None  # predict queued prompts ahead: on CUDA (the predictor's own stream).
        # On the CPU its whole-prompt forwards take the model's cores: 0.91x the no-prefetch rate against 1.01x
        # without, at 2 threads (16 requests of 200 tokens, 8 running; docs/benchmarks.md, "Serving")
        self.seen = 0  # tokens of model.generate's sequences the predictor's state holds (the KV cache's length)
        self.future: Future | None = None
        self.step: Prediction | None = None
        self.sent = False
        self.stats = AheadStats()

    # -- model thread -----------------------------------------------------------------------------------------
    def hook(self, module, args, kwargs) -> None:
        """The model's forward pre-hook: start predicting this step."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        last, self.future = self.future, None
        self.step, self.sent = None, False
        if last is not None:
            last.result()  # the last step's state is in place (its error surfaces here, once)
        if ids is None:  # inputs_embeds: nothing to predict from
            self.future = None
            return
        packed = kwargs.get("packed_kv")  # the engine's step: many requests' chunks in one row (engine/kv.py)
        early = {}  # request -> (its prompt's prediction, this chunk's offset in the prompt)
        if packed is not None:
            parts = [(request, ids[:, first : first + n], length == n)  # fresh: the request's first chunk
                     for (request, first, n), (_, length) in zip(packed.segments, packed.spans, strict=True)]
            live = set(packed.regions)
            for (request, _, n), (_, length) in zip(packed.segments, packed.spans, strict=True):
                if request in self.prepared:
                    future, S = self.prepared[request]
                    if length <= S:  # a chunk of the prompt predicted (a longer sequence: predicted as it comes)
                        early[request] = (future, length - n)
                    if length >= S:  # its last prompt chunk
                        del self.prepared[request]
        else:
            parts, live = [(None, ids, self._fresh(kv_cache(kwargs), ids.shape[1]))], None
        self.future = self.executor.submit(self._predict, parts, live, early)

    def _fresh(self, cache, tokens: int) -> bool:
        """model.generate's (or a direct call's) step: does it start new sequences? A cache that does not hold
        exactly the tokens the predictor has seen (cropped by assisted or prompt-lookup decoding, or filled
        without it) cannot be followed: routing that reads the prediction refuses it; a prefetch starts over."""
        length = 0 if cache is None else cache.get_seq_length()
        seen, self.seen = self.seen, length + tokens
        if length == 0:
            return True
        self._follow(cache)
        if length == seen:
            return False
        if self.wait:
            raise PredictorError(f"the KV cache holds {length} tokens, but the predictor has seen {seen} of this "
                                 "sequence (a cache cropped by assisted or prompt-lookup decoding, or filled without "
                                 "the predictor): routing that reads the prediction cannot follow it; use "
                                 "routing='exact' with prefetch='sida' for such decoding")
        return True

    def _follow(self, cache) -> None:
        """Beam search reorders the KV cache's rows between steps (`Cache.reorder_cache`, transformers' public
        method that generate calls): model.generate's predictor state is reordered with them, so each row goes
        on from its own beam's tokens."""
        if getattr(cache, "moedeploy_follows", None) is self:
            return
        reorder = cache.reorder_cache

        def reorder_cache(beam_idx: Tensor) -> None:
            reorder(beam_idx)
            if self.future is not None:
                wait([self.future])  # the step's state is written (its error, if any, is the next hook's)
            state = self.states.get(None)
            if state is not None:
                self.states[None] = select(state, beam_idx.to(state.h.device))

        cache.reorder_cache = reorder_cache
        cache.moedeploy_follows = self

    def prepare(self, key, prompt: list[int]) -> None:
        """A queued request's prompt (the engine, between steps): the predictor works on it now, while the
        model runs other requests' steps, and the request's prefill chunks take these scores, not waiting
        for them (SiDA's two threads: the predictor ahead on the tokens already known). Only where
        `queued` (CUDA by default)."""
        if self.queued and key not in self.prepared:
            ids = torch.tensor([prompt], device=self.predictor.embedding.device)
            self.prepared[key] = (self.executor.submit(self._prepare, ids), len(prompt))

    def discard(self, key) -> None:
        """A request ended: forget its prompt's prediction if it was never used (the engine's thread)."""
        entry = self.prepared.pop(key, None)
        if entry is not None:
            entry[0].cancel()  # not started yet: never runs

    def arrive(self, layer) -> Prediction | None:
        """MoE layer `layer` is about to route: send the step's prefetches if the prediction is ready
        (or wait for it), and return the step's prediction (None if it is not ready)."""
        if self.step is None and self.future is not None:
            first = self.index[id(layer)] == 0
            if not self.future.done():
                if not (first and self.wait):
                    return None
                start = time.perf_counter()
                self.future.exception()  # waits; the error, if any, is raised below
                self.stats.wait_s += time.perf_counter() - start
            if not first:
                self.stats.late_steps += 1
            future, self.future = self.future, None  # taken before its result: an error surfaces once, here
            self.step = future.result()
        if self.step is not None and self.prefetch and not self.sent:
            self._send(self.index[id(layer)])
        return self.step

    def allowed(self, layer, tokens: int) -> Tensor:
        """[T, E] bool: each token's predicted top-K experts at `layer` (routing="predicted")."""
        step = self.arrive(layer)
        if step is None:
            raise PredictorError("routing='predicted' predicts from token ids: call the model with input_ids, not "
                                 "inputs_embeds")
        E = layer.router.num_experts
        top = step.top[:, self.index[id(layer)]]  # [T, K]
        assert top.shape[0] == tokens, "the prediction is for this step's tokens"
        return torch.zeros(tokens, E, dtype=torch.bool, device=top.device).scatter_(1, top, True)

    def _send(self, first: int) -> None:
        """Layers first..L-1's predicted experts to their pools, in layer order."""
        self.sent = True
        for i in range(first, len(self.layers)):
            layer = self.layers[i]
            keys = [(layer.pool_index, e) for e in self.step.rank[i]]
            layer.pool.prefetch(keys)
            layer.pool.ahead.update(keys[: layer.pool.num_slots])

    # -- predictor thread -----------------------------------------------------------------------------------
    def _prepare(self, ids: Tensor) -> tuple[Tensor, object]:
        """A whole prompt [1, S] -> its scores [S, L, E] and the state after it. In chunks of the predictor's
        attention window W, each continuing the last one's state: attention [W, 2W] per chunk, whatever S."""
        start = time.perf_counter()
        chunks, state = [], None
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            for chunk in ids.split(self.predictor.net.cfg.window, dim=1):
                scores, state = self.predictor.forward(chunk, state)
                chunks.append(scores[0])
            scores = torch.cat(chunks)
            if self.stream is not None:
                self.stream.synchronize()
        self.stats.prepared += 1
        self.stats.predict_s += time.perf_counter() - start
        return scores, state

    def _predict(self, parts: list[tuple], live: set | None, early: dict) -> Prediction:
        """parts: (sequence key, ids [B, S], fresh) in the step's row order; live: the keys still running;
        early: key -> (prediction of its whole prompt, the chunk's offset in it), for prompts predicted ahead."""
        start = time.perf_counter()
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            scores = self._scores(parts, early)  # [T, L, E]
            if live is not None:
                self.states = {k: v for k, v in self.states.items() if k in live}
            top = scores.topk(self.K, dim=-1).indices  # [T, L, K], best first
            rank = top[0].tolist() if len(top) == 1 else _by_mass(scores, top)  # one token: its own order
            if self.stream is not None:
                self.stream.synchronize()
        self.stats.steps += 1
        self.stats.predict_s += time.perf_counter() - start
        return Prediction(rank, top)

    def _scores(self, parts: list[tuple], early: dict) -> Tensor:
        """[T, L, E] for the step's parts in row order, each continuing its sequence's state. A chunk of a
        prompt predicted ahead takes its rows of that prediction (the last one its state); the engine's
        decode chunks (one token of one request, a state to continue) run as one batch."""
        rows: dict[int, Tensor] = {}
        for i, (key, ids, _) in enumerate(parts):
            if key in early:
                future, offset = early[key]
                if future.cancelled() or future.exception() is not None:  # done or cancelled (submitted to this
                    # one-thread executor before this job; `discard` cancels one that had not started)
                    continue  # no prediction: predicted as it comes, from the start of the prompt below
                scores, state = future.result()
                rows[i] = scores[offset : offset + ids.shape[1]]
                if offset + ids.shape[1] == len(scores):
                    self.states[key] = state
        decode = [i for i, (key, ids, fresh) in enumerate(parts)
                  if i not in rows and not fresh and ids.shape == (1, 1) and key in self.states]
        if len(decode) > 1:
            keys = [parts[i][0] for i in decode]
            scores, states = self.predictor.steps(torch.cat([parts[i][1][0] for i in decode]),
                                                  [self.states[k] for k in keys])
            for i, key, row, state in zip(decode, keys, scores, states, strict=True):
                rows[i], self.states[key] = row[None], state
        for i, (key, ids, fresh) in enumerate(parts):
            if i not in rows:
                scores, self.states[key] = self.predictor.forward(ids, None if fresh else self.states.get(key))
                rows[i] = scores.flatten(0, 1)  # [B * S, L, E]
        return torch.cat([rows[i] for i in range(len(parts))]) if len(parts) > 1 else rows[0]

    def reset(self) -> None:
        """Forget every sequence (a failed engine step, a cleared cache): nothing pending is kept or raised."""
        for future, _ in self.prepared.values():
            future.cancel()
        if self.future is not None:
            self.future.exception()  # waits, raises nothing: its state writes are over before the states go
        self.executor.submit(lambda: None).result()  # and so are those of prepares already running
        self.future, self.step, self.states, self.prepared, self.stats = None, None, {}, {}, AheadStats()
        self.seen = 0


def _by_mass(scores: Tensor, top: Tensor) -> list[list[int]]:
    """Per layer, the experts in some token's predicted top-K, by the predicted probability they gather
    over the step's tokens. scores [T, L, E], top [T, L, K]."""
    probs = scores.softmax(-1)
    mass = torch.zeros_like(probs).scatter_(-1, top, probs.gather(-1, top)).sum(0)  # [L, E]
    order = mass.argsort(dim=-1, descending=True, stable=True).cpu()  # [L, E]
    counts = (mass > 0).sum(-1).tolist()  # [L]
    return [order[i, :n].tolist() for i, n in enumerate(counts)]


def kv_cache(kwargs: dict):
    """The KV cache a forward was given: `cache` (transformers >= 5.24) or `past_key_values` (before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache
