"""The engine: requests in, tokens out, one batched step at a time, on its own thread.

    submit() / abort()  (any thread) ─► inbox ─┐
                                               ▼  engine thread, per step:
        inbox ─► Scheduler ─► chunks ─► ModelRunner ─► logits [R, V] ─► sample ─► detokenize, stop?
                                                                                   │
        Request.on_update(Update) ◄── new text, or the end and why ◄───────────────┘
        finished or aborted: its KV columns are freed at once

The engine knows nothing of HTTP, JSON or tokenizing prompts: it takes token ids and gives text through
callbacks, which run on the engine thread and must return quickly (the server hands them to its event loop).
Outputs do not depend on what else is batched where the arithmetic allows: every request attends only to
its own tokens, samples from its own generator, and runs its experts with the rest of the step's tokens.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import MoeDeployError, OptionError
from .detok import Detokenizer
from .request import Request, SamplingParams, Update
from .runner import ModelRunner
from .sampler import Sampler, sample
from .scheduler import Scheduler


class QueueFull(MoeDeployError):
    """Too many requests are waiting; try again later (the server answers 429 with Retry-After)."""


class ContextTooLong(OptionError):
    """The prompt plus max_tokens does not fit the model's context (the server answers 400, input_tokens)."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch_tokens: int = 256  # tokens per step, prefill chunks and decodes together: bounds a step's memory and
    # how long decodes wait behind a long prompt
    max_running: int | None = None  # requests holding KV at once, the rest wait in the queue; None: 64, or
    # max_batch_tokens if that is smaller (every running request needs a token of each step)
    max_queue: int = 256  # waiting requests beyond which submit() refuses at once (QueueFull)
    max_model_len: int | None = None  # prompt + output tokens of one request; None: the model's max positions
    step_history: int = 4096  # the most recent steps kept in `Engine.steps`

    def __post_init__(self):
        if self.max_running is None:
            object.__setattr__(self, "max_running", min(64, self.max_batch_tokens))
        for name in ("max_batch_tokens", "max_running", "max_queue", "step_history"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_running > self.max_batch_tokens:
            raise OptionError(f"max_running ({self.max_running}) exceeds max_batch_tokens ({self.max_batch_tokens}): "
                              "every running request needs a token of each step's budget")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise OptionError(f"max_model_len must be at least 2, got {self.max_model_len}")


@dataclass(frozen=True)
class StepStats:
    """What one step ran and what it did to the expert cache."""

    start: float  # time.perf_counter() when the model step began
    seconds: float
    requests: int
    prefill_tokens: int
    decode_tokens: int
    active_experts: tuple[int, ...]  # per MoE layer: experts that got at least one of the step's tokens
    hits: int = 0  # expert-cache hits and misses in this step (0 when every expert is resident)
    misses: int = 0


@dataclass(frozen=True)
class Output:
    """A finished request, as `Engine.generate` returns it."""

    text: str
    tokens: list[int]
    finish_reason: str
    error: str | None = None


@dataclass
class _Inbox:
    """What other threads hand the engine thread between steps."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    new: list[Request] = field(default_factory=list)
    aborts: list[int] = field(default_factory=list)


def _notify(request: Request, update: Update) -> None:
    """Call the request's callback; one that raises (its client's event loop gone) must not stop the engine."""
    try:
        request.on_update(update)
    except Exception as ex:  # noqa: BLE001
        print(f"moedeploy: request {request.id}: its update callback failed: {type(ex).__name__}: {ex}", file=sys.stderr)


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), runner: ModelRunner | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.runner = runner or ModelRunner(model)  # parallel.serve.LeaderRunner in an expert-parallel server
        self.scheduler = Scheduler(config.max_batch_tokens, config.max_running)
        self.max_model_len = config.max_model_len or model.config.max_position_embeddings
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.layers = list(model.moedeploy.layers.values())
        self.pools = model.moedeploy.pools
        self.ahead = getattr(model.moedeploy, "ahead", None)  # SiDA's predictor thread (predict/ahead.py), if any
        self.steps: deque[StepStats] = deque(maxlen=config.step_history)
        self.requests: dict[int, Request] = {}  # every request in the engine, by id (engine thread only)
        self.num_waiting = 0  # published after each step, read by other threads
        self.num_running = 0
        self.kv_tokens = 0
        self.totals = {"steps": 0, "tokens": 0, "active_experts": 0}  # since start: steps run, their tokens, and
        # experts active per layer summed over layers and steps (engine thread writes, metrics read)
        self.accepting = True
        self._inbox = _Inbox()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = self._expert_counts()  # [L, E] on the host after the last step (or before the first)

    # -- any thread ----------------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams, on_update, timeout: float | None = None) -> Request:
        """Queue a request; `on_update(Update)` is called on the engine thread after each step that gives it text,
        and once at its end. Raises ContextTooLong, QueueFull, or OptionError (bad token ids, shutting down)."""
        if not prompt:
            raise OptionError("the prompt is empty; give at least one token")
        if not all(0 <= t < self.vocab_size for t in prompt):
            raise OptionError(f"prompt token ids must lie in [0, {self.vocab_size})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ContextTooLong(f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                                 f"the context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        deadline = None if timeout is None else time.monotonic() + timeout
        request = Request(list(prompt), params, on_update, deadline)
        with self._inbox.lock:
            if not self.accepting:
                raise QueueFull("the engine is shutting down and takes no new requests")
            if self.num_waiting + len(self._inbox.new) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting; retry later")
            self._inbox.new.append(request)
        self._wake.set()
        return request

    def abort(self, request_id: int) -> None:
        """End a request (a client went away): its KV is freed at the next step; it gets a final 'abort' update."""
        with self._inbox.lock:
            self._inbox.aborts.append(request_id)
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already running")
        self._thread = threading.Thread(target=self._loop, name="moedeploy-engine", daemon=True)
        self._thread.start()

    def shutdown(self, grace: float = 10.0) -> None:
        """Stop intake, let what is in flight finish for up to `grace` seconds, abort the rest, stop the thread."""
        with self._inbox.lock:
            self.accepting = False
        end = time.monotonic() + grace
        while self.alive and (self.num_running or self.num_waiting or self._inbox.new) and time.monotonic() < end:
            time.sleep(0.01)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=max(grace, 1.0))
        self._take_inbox()
        for request in list(self.requests.values()):
            self._finish(request, "abort", "the server shut down before the request finished")

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                ran = self.step()
            except Exception as ex:  # noqa: BLE001 - the loop outlives a bad step: its requests fail, the rest go on
                self._fail_running(ex)
                ran = None
            if ran is None:
                self._wake.wait(0.05)

    def step(self) -> StepStats | None:
        """Take new requests and aborts, end timed-out ones, run one batched step. None when there was nothing to run."""
        self._take_inbox()
        now = time.monotonic()
        for request in [r for r in self.requests.values() if r.deadline is not None and r.deadline < now]:
            self._finish(request, "timeout", "the request exceeded its time limit")
        chunks = self.scheduler.schedule()
        self._publish()
        if not chunks:
            return None
        start = time.perf_counter()
        hits, misses = self._cache_counts()
        try:
            logits = self.runner.forward(chunks)  # [R, V]
            sampled = [c.request for c in chunks if c.samples]
            tokens = sample([r.sampler for r in sampled], logits)  # the step's one host sync
        except Exception as ex:  # noqa: BLE001 - a failed step fails its requests, not the server
            self._fail_running(ex)
            return None
        prefill = sum(c.length for c in chunks if c.start < len(c.request.prompt))
        for c in chunks:
            c.request.computed = c.start + c.length
        for request, token in zip(sampled, tokens):
            self._emit(request, token)
        if self.ahead is not None:  # the predictor works on the prompts admitted next while the next steps run
            room = max(self.scheduler.max_running - len(self.scheduler.running), 1)
            for request in list(self.scheduler.waiting)[:room]:
                if request.computed == 0 and not request.output:
                    self.ahead.prepare(request.id, request.prompt)
        hits2, misses2 = self._cache_counts()
        stats = StepStats(start=start, seconds=time.perf_counter() - start, requests=len(chunks),
                          prefill_tokens=prefill, decode_tokens=sum(c.length for c in chunks) - prefill,
                          active_experts=self._active_experts(), hits=hits2 - hits, misses=misses2 - misses)
        self.steps.append(stats)
        self.totals["steps"] += 1
        self.totals["tokens"] += stats.prefill_tokens + stats.decode_tokens
        self.totals["active_experts"] += sum(stats.active_experts)
        self._publish()
        return stats

    def _fail_running(self, ex: Exception) -> None:
        """A step failed part-way (its KV half-written): end every running request with an error, keep the queue."""
        print(f"moedeploy: engine step failed: {type(ex).__name__}: {ex}", file=sys.stderr)
        for request in list(self.scheduler.running):
            self._finish(request, "error", f"the model step failed ({type(ex).__name__})")
        self.runner.reset()
        if self.ahead is not None:
            self.ahead.reset()
        self._publish()

    def _take_inbox(self) -> None:
        with self._inbox.lock:
            new, aborts = self._inbox.new, self._inbox.aborts
            self._inbox.new, self._inbox.aborts = [], []
        for request in new:
            request.sampler = Sampler(request.params, self.runner.device)
            request.detok = Detokenizer(self.tokenizer, request.params.stop)
            self.requests[request.id] = request
            self.scheduler.add(request)
        for request_id in aborts:
            if request_id in self.requests:
                self._finish(self.requests[request_id], "abort")

    def _emit(self, request: Request, token: int) -> None:
        """A sampled token: append it, release the text that became final, and end the request if it should."""
        request.output.append(token)
        text, stopped = request.detok.push(token)
        if stopped or (token in self.eos and not request.params.ignore_eos):
            return self._finish(request, "stop", text=text)
        if len(request.output) >= request.params.max_tokens or request.length >= self.max_model_len:
            return self._finish(request, "length", text=text)
        _notify(request, Update(text=text, tokens=[token], prompt_tokens=len(request.prompt),
                                completion_tokens=len(request.output)))

    def _finish(self, request: Request, reason: str, error: str | None = None, text: str = "") -> None:
        """End a request: free its slot and KV now, and send the rest of its text and why it ended."""
        if request.finished:
            return
        request.finish_reason = reason
        self.scheduler.remove(request)
        self.runner.free([request.id])
        if self.ahead is not None:
            self.ahead.discard(request.id)
        self.requests.pop(request.id, None)
        if reason in ("length", "abort", "timeout", "error") and request.detok is not None:
            text += request.detok.flush()  # no stop string ended it: what was held back is final now
        new = request.output[-1:] if reason in ("stop", "length") else []
        _notify(request, Update(text=text, tokens=new, finish_reason=reason, error=error,
                                prompt_tokens=len(request.prompt), completion_tokens=len(request.output)))

    def _publish(self) -> None:
        self.num_waiting = len(self.scheduler.waiting)
        self.num_running = len(self.scheduler.running)
        self.kv_tokens = self.runner.kv.columns

    def _active_experts(self) -> tuple[int, ...]:
        """Experts per layer that this step's tokens reached (from the layers' counters: one small host copy)."""
        before, self._counts = self._counts, self._expert_counts()
        return tuple((self._counts - before > 0).sum(1).tolist())  # a reset_stats() in between reads as 0 active

    def _expert_counts(self) -> torch.Tensor:
        return torch.stack([layer.expert_counts for layer in self.layers]).cpu()  # [L, E]

    def _cache_counts(self) -> tuple[int, int]:
        return (sum(p.stats.hits for p in self.pools), sum(p.stats.misses for p in self.pools))

    # -- synchronous use (tests, benchmarks) ---------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[Output]:
        """Run these prompts together to the end on the calling thread (the engine thread must not be running)."""
        if self.alive:
            raise RuntimeError("the engine thread is running; submit() requests to it instead")
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        parts: list[list[Update]] = [[] for _ in prompts]
        for prompt, p, updates in zip(prompts, params, parts):
            self.submit(prompt, p, updates.append)
        while any(not u or u[-1].finish_reason is None for u in parts):
            self.step()
        return [Output(text="".join(u.text for u in updates), tokens=[t for u in updates for t in u.tokens],
                       finish_reason=updates[-1].finish_reason, error=updates[-1].error) for updates in parts]
