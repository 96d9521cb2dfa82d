"""Record a routing trace while a model runs: `with record(model) as rec: ...; rec.write("t.parquet")`.

    model forward ─► pre-hook: input_ids, attention mask, positions, prefill or decode (one step)
        MoE layer l ─► layer.recorder(routing) ─► keep ids, weights [T, K] on the device (no sync)
    model forward returns ─► post-hook: stack L layers ─► one copy to the host per step

Works with anything that calls the model's forward: `model(...)`, `model.generate(...)`, perplexity
evaluation, benchmarks. Each prefill step (nothing seen before) opens new requests, one per batch row;
decode steps continue the rows' requests. Padding tokens (attention mask 0) are routed by the model but
not recorded. When no recorder is attached a MoE layer pays one `if`.

Prefill or decode is decided from what a forward call carries whatever its keywords are named (they
change between transformers versions: 5.24 renamed `past_key_values` to `cache`): any `transformers.Cache`
argument's length and a 2-D attention mask longer than the step. A decode step must continue exactly the
tokens the recorder counted for its rows, or recording stops with a TraceError rather than guess.

What it does not do: encoder-decoder models (encoder and decoder tokens differ, so one token column
cannot describe both; raises TraceError), statistics (stats.py), files beyond `write` (io.py).

Legend: B = batch rows, S = tokens per row in this step, T = B*S, L = MoE layers, K = experts per token.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import Cache

from ..errors import TraceError
from .schema import PHASES, Trace, TraceMeta


class Recorder:
    """Collects one model's routing, step by step. Build with `record(model)`."""

    def __init__(self, model, domain: str = ""):
        runtime = getattr(model, "moedeploy", None)
        if runtime is None:
            raise TraceError("recording needs a model loaded with moedeploy.load()")
        if getattr(model.config, "is_encoder_decoder", False):
            raise TraceError("routing traces support decoder-only models; this model is encoder-decoder")
        self.layers = list(runtime.layers.values())
        first = self.layers[0]
        self.meta = TraceMeta(num_experts=first.experts.num_experts, top_k=first.router.top_k,
                              layer_names=tuple(runtime.layers), source=str(runtime.path), family=runtime.family)
        self.domain = domain
        self._chunks: list[dict[str, np.ndarray]] = []  # one per step, host arrays
        self._step: dict | None = None  # the step in flight: its inputs, and routing per layer
        self._rows: np.ndarray | None = None  # [B] request id of each batch row, from the last prefill
        self._seen = 0  # tokens each row has passed (padding included) since that prefill
        self._next_request = 0
        self._steps = 0

    # -- hooks -----------------------------------------------------------------------------------
    def _on_routing(self, layer: int, routing) -> None:
        step = self._step
        if step is None:
            raise TraceError("a MoE layer ran outside a recorded model forward; record the whole model")
        if step["routing"][layer] is not None:
            raise TraceError(f"MoE layer {self.meta.layer_names[layer]} ran twice in one forward step")
        step["routing"][layer] = routing  # device tensors, converted after the step

    def _before(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shape = tuple(ids.shape) if ids is not None else tuple(embeds.shape[:2])  # (B, S)
        mask = kwargs.get("attention_mask")
        self._step = {"ids": ids, "shape": shape, "mask": mask, "positions": kwargs.get("position_ids"),
                      "past": past_length(args, kwargs, mask, shape[1]), "routing": [None] * len(self.layers)}

    def _after(self, module, args, kwargs, output) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        missing = [self.meta.layer_names[i] for i, r in enumerate(step["routing"]) if r is None]
        if missing:
            raise TraceError(f"MoE layers {missing} did not run in this forward step; cannot record it")
        B, S = step["shape"]
        # One host copy per step: [L, T, K] -> [T, L, K].
        experts = torch.stack([r.ids for r in step["routing"]], 1).to("cpu", torch.int16).numpy()
        weights = torch.stack([r.weights for r in step["routing"]], 1).to("cpu", torch.float32).numpy()
        if experts.shape[0] != B * S:
            raise TraceError(f"MoE layers saw {experts.shape[0]} tokens, the model input has {B}x{S}")
        prefill = step["past"] == 0
        if prefill:
            self._rows = np.arange(self._next_request, self._next_request + B, dtype=np.int32)
            self._next_request += B
            self._seen = 0
        elif self._rows is None or len(self._rows) != B:
            raise TraceError("a decode step arrived without a matching prefill (batch rows changed)")
        elif step["past"] != self._seen:
            raise TraceError(f"a decode step continues {step['past']} earlier tokens per row, but the recorder "
                             f"saw {self._seen}: the cache was filled outside the recording; record from the prefill")
        self._seen += S
        keep, position = self._positions(step, B, S)  # [B, S] bool, [B, S] int
        tokens = step["ids"].to("cpu").numpy().astype(np.int32) if step["ids"] is not None else np.full((B, S), -1)
        flat = keep.reshape(-1)
        self._chunks.append({
            "experts": experts[flat], "weights": weights[flat],
            "request": np.repeat(self._rows, S)[flat], "position": position.reshape(-1)[flat].astype(np.int32),
            "phase": np.full(int(flat.sum()), PHASES.index("prefill" if prefill else "decode"), np.int8),
            "step": np.full(int(flat.sum()), self._steps, np.int32), "token": tokens.reshape(-1)[flat].astype(np.int32),
        })
        self._steps += 1

    @staticmethod
    def _positions(step: dict, B: int, S: int) -> tuple[np.ndarray, np.ndarray]:
        """Which of the step's tokens are real (not padding), and each one's position in its request."""
        mask = step["mask"]
        if mask is not None and mask.dim() == 2:
            mask = mask.to("cpu").numpy().astype(bool)  # [B, past + S]
            keep = mask[:, -S:]
            position = np.cumsum(mask, axis=1)[:, -S:] - 1  # padding not counted
            return keep, position
        if step["positions"] is not None:
            position = step["positions"].to("cpu").numpy()
            return np.ones((B, S), bool), np.broadcast_to(position, (B, S))
        return np.ones((B, S), bool), np.broadcast_to(step["past"] + np.arange(S), (B, S))

    # -- results ---------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return sum(len(c["step"]) for c in self._chunks)

    def trace(self) -> Trace:
        """Everything recorded so far, as a `Trace` (tokens in processing order)."""
        if not self._chunks:
            raise TraceError("nothing was recorded: the model never ran while the recorder was attached")
        cols = {k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0]}
        return Trace(meta=self.meta, domain=np.zeros(len(cols["step"]), np.int16), domains=(self.domain,), **cols)

    def write(self, path: str | Path) -> Path:
        from .io import write_trace

        return write_trace(self.trace(), path)


def past_length(args: tuple, kwargs: dict, mask: torch.Tensor | None, S: int) -> int:
    """Tokens each row had passed before a forward step of S tokens per row: the longest of what a
    `transformers.Cache` argument holds (under any keyword) and what a 2-D attention mask covers
    beyond the step. 0 when the call carries neither: a forward with no past is a prefill."""
    caches = [a for a in (*args, *kwargs.values()) if isinstance(a, Cache)]
    past = max((int(c.get_seq_length()) for c in caches), default=0)
    if mask is not None and mask.dim() == 2:
        past = max(past, mask.shape[1] - S)
    return past


@contextmanager
def record(model, domain: str = ""):
    """Attach a `Recorder` to every MoE layer of `model` (from moedeploy.load) for the `with` block."""
    rec = Recorder(model, domain)
    if any(layer.recorder is not None for layer in rec.layers):
        raise TraceError("this model is already being recorded")
    handles = [model.register_forward_pre_hook(rec._before, with_kwargs=True),
               model.register_forward_hook(rec._after, with_kwargs=True)]
    for i, layer in enumerate(rec.layers):
        layer.recorder = partial(rec._on_routing, i)
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()
        for layer in rec.layers:
            layer.recorder = None
