"""Prometheus metrics, under vLLM's names where vLLM has one (so its dashboards carry over), else `moedeploy:`.

| metric | kind | what |
| --- | --- | --- |
| `vllm:time_to_first_token_seconds` | histogram | arrival to first output token |
| `vllm:inter_token_latency_seconds` | histogram | between consecutive output tokens of a request |
| `vllm:e2e_request_latency_seconds` | histogram | arrival to the end |
| `vllm:num_requests_running` / `vllm:num_requests_waiting` | gauge | in the engine's batch / in its queue |
| `moedeploy:kv_cache_tokens` | gauge | tokens whose keys and values the engine holds (0 when idle) |
| `vllm:prompt_tokens_total` / `vllm:generation_tokens_total` | counter | tokens of accepted prompts / sampled |
| `vllm:request_success_total{finished_reason}` | counter | finished requests: stop, length, abort, timeout, error |
| `moedeploy:client_disconnects_total` | counter | clients that went away before their request ended |
| `moedeploy:expert_cache_{hits,misses,bytes_moved}_total` | counter | the expert cache since start (0 when resident) |
| `moedeploy:expert_resident_bytes` | gauge | expert bytes in device slots now (all expert bytes when resident) |
| `moedeploy:engine_steps_total`, `moedeploy:engine_step_tokens_total` | counter | batched steps run, and their tokens |
| `moedeploy:active_experts_total` | counter | experts that got a token, summed over MoE layers and steps |
| `moedeploy:experts` | gauge | MoE layers x routed experts per layer (divide the one above by it and by steps) |

Every metric has the `model_name` label. Request timings are taken on the engine thread as tokens are emitted.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine.request import Update

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)


class Metrics:
    def __init__(self, engine, model_name: str):
        disable_created_metrics()  # no `_created` series beside every counter: vLLM's scrape shape
        self.registry = CollectorRegistry()
        self.engine = engine
        self.model_name = model_name
        label = ["model_name"]

        def hist(name, doc):
            return Histogram(name, doc, label, buckets=LATENCY_BUCKETS, registry=self.registry).labels(model_name)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token in seconds.")
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between output tokens in seconds.")
        self.e2e = hist("vllm:e2e_request_latency_seconds", "End-to-end request latency in seconds.")
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of accepted requests.", label,
                                     registry=self.registry).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", label,
                                         registry=self.registry).labels(model_name)
        self.finished = Counter("vllm:request_success", "Finished requests by finish reason.",
                                label + ["finished_reason"], registry=self.registry)
        self.disconnects = Counter("moedeploy:client_disconnects", "Clients that left before their request ended.",
                                   label, registry=self.registry).labels(model_name)
        for name, doc, read in (("vllm:num_requests_running", "Requests in the engine's batch.", lambda: engine.num_running),
                                ("vllm:num_requests_waiting", "Requests waiting in the queue.", lambda: engine.num_waiting),
                                ("moedeploy:kv_cache_tokens", "Tokens held in the KV cache.", lambda: engine.kv_tokens)):
            Gauge(name, doc, label, registry=self.registry).labels(model_name).set_function(read)
        self.registry.register(_ExpertCache(engine, model_name))

    def timer(self):
        """A callback for one request's updates (engine thread): observes its latencies and token counts."""
        start = time.monotonic()
        last = None

        def observe(update: Update) -> None:
            nonlocal last
            now = time.monotonic()
            if update.tokens:
                (self.ttft if last is None else self.itl).observe(now - (start if last is None else last))
                last = now
                self.generation_tokens.inc(len(update.tokens))
            if update.finish_reason is not None:
                self.e2e.observe(now - start)
                self.finished.labels(self.model_name, update.finish_reason).inc()

        return observe

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ExpertCache:
    """Reads the expert pools' statistics at scrape time (plain ints the engine thread updates)."""

    def __init__(self, engine, model_name: str):
        self.engine = engine
        self.model_name = model_name

    def describe(self):
        return []

    def collect(self):
        pools = self.engine.pools
        stats = [p.stats for p in pools]
        for name, doc, value in (("hits", "Expert-cache hits.", sum(s.hits for s in stats)),
                                 ("misses", "Expert-cache demand misses.", sum(s.misses for s in stats)),
                                 ("bytes_moved", "Expert bytes copied into device slots.", sum(s.bytes_moved for s in stats))):
            family = CounterMetricFamily(f"moedeploy:expert_cache_{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        totals = self.engine.totals
        for name, doc, value in (("engine_steps", "Batched engine steps.", totals["steps"]),
                                 ("engine_step_tokens", "Tokens run in engine steps.", totals["tokens"]),
                                 ("active_experts", "Experts active per layer, summed over layers and steps.",
                                  totals["active_experts"])):
            family = CounterMetricFamily(f"moedeploy:{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family
        experts = GaugeMetricFamily("moedeploy:experts", "MoE layers times routed experts per layer.", labels=["model_name"])
        experts.add_metric([self.model_name], sum(layer.experts.num_experts for layer in self.engine.layers))
        yield experts
        resident = GaugeMetricFamily("moedeploy:expert_resident_bytes", "Expert bytes resident on the device.",
                                     labels=["model_name"])
        resident.add_metric([self.model_name], sum(p.resident_bytes() for p in pools) if pools else
                            sum(layer.experts.expert_bytes() * layer.experts.num_experts for layer in self.engine.layers))
        yield resident
