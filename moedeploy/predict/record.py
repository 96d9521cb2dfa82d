"""Run a model over text and keep what predictors learn from and are scored against.

    text ─► tokenizer ─► chunks [C, S] (S = context) ─► model forward, a batch of chunks at a time
        input embedding ─► hook: hidden[:, 0]                     (with_hidden)
        MoE layer l's router ─► forward hook: its input x ─► hidden[:, l+1]   (with_hidden)
                                 logits ─► the teacher's top-M (ids, logits), for distillation
                                 routing ─► the routed ids, highest weight first (ids[..., 0] = top-1)

A forward hook on each MoE layer's `Router` rather than the trace recorder (trace/record.py): a trace
keeps ids and weights, and distillation needs the router's logits. Chunks are independent
sequences (no KV carried over), as `evaluate.perplexity` scores a text.

This module does not train or score predictors.

Legend: C chunks, S tokens per chunk, L MoE layers, K routed experts per token, M = min(30, E)
teacher experts kept, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .base import PredictorError

DISTILL_TOP = 30  # SiDA distils the router's top 30 experts (or all of them when E < 30)


@dataclass(frozen=True)
class Routed:
    """A batch of chunks with the router's decisions at every MoE layer (host tensors)."""

    tokens: Tensor  # [C, S] int64
    ids: Tensor  # [C, S, L, K] int16 routed experts, highest weight first
    top_ids: Tensor  # [C, S, L, M] int16 the router's M highest-scoring experts, best first
    top_logits: Tensor  # [C, S, L, M] float16 their logits
    hidden: Tensor | None = None  # [C, S, L, D] float32: the embeddings, then MoE layer l-1's input at [..., l, :]

    def __len__(self) -> int:
        return len(self.tokens)


def chunk(ids: list[int], context: int, min_tokens: int = 2) -> list[Tensor]:
    """A token stream -> pieces of `context` tokens (the last one shorter, kept if >= min_tokens)."""
    pieces = [torch.tensor(ids[i:i + context], dtype=torch.long) for i in range(0, len(ids), context)]
    return [p for p in pieces if len(p) >= min_tokens]


class _Hooks:
    def __init__(self, model, with_hidden: bool):
        self.layers = list(model.moedeploy.layers.values())
        self.with_hidden = with_hidden
        self.out: dict = {}
        self.handles = []
        if with_hidden:
            self.handles.append(model.get_input_embeddings().register_forward_hook(self._embed))
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.router.register_forward_hook(self._router(i), with_kwargs=True))

    def _embed(self, module, args, output):
        self.out["embed"] = output.detach().reshape(-1, output.shape[-1]).float()  # [T, D]

    def _router(self, i: int):
        def hook(module, args, kwargs, routing):
            x = args[0] if args else kwargs["x"]  # [T, D]
            logits = module.logits(x).float()  # [T, E]
            M = min(DISTILL_TOP, logits.shape[-1])
            top = torch.topk(logits, M, dim=-1)
            order = torch.argsort(routing.weights.float(), dim=-1, descending=True, stable=True)
            self.out[i] = (routing.ids.gather(-1, order), top.indices, top.values, x.detach().float() if self.with_hidden else None)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def run(model, chunks: list[Tensor], batch: int = 16, with_hidden: bool = False, desc: str = "recording routing"):
    """Yield a `Routed` per batch of equal-length chunks (a shorter last chunk runs alone)."""
    if getattr(model.config, "is_encoder_decoder", False):
        raise PredictorError("expert predictors support decoder-only models; this model is encoder-decoder")
    device = next(model.parameters()).device
    hooks = _Hooks(model, with_hidden)
    L = len(hooks.layers)
    try:
        groups, i = [], 0
        while i < len(chunks):
            S = len(chunks[i])
            j = i
            while j < len(chunks) and j - i < batch and len(chunks[j]) == S:
                j += 1
            groups.append(chunks[i:j])
            i = j
        with tqdm(total=sum(map(len, chunks)), desc=f"moedeploy: {desc}", unit="tok", disable=None, leave=False) as bar:
            for group in groups:
                tokens = torch.stack(group)  # [C, S]
                C, S = tokens.shape
                hooks.out = {}
                model(input_ids=tokens.to(device))
                if any(l not in hooks.out for l in range(L)):
                    raise PredictorError("some MoE layers did not run in a forward step; cannot record routing")
                per = [hooks.out[l] for l in range(L)]
                ids = torch.stack([p[0] for p in per], 1).to("cpu", torch.int16).view(C, S, L, -1)
                top_ids = torch.stack([p[1] for p in per], 1).to("cpu", torch.int16).view(C, S, L, -1)
                top_logits = torch.stack([p[2] for p in per], 1).to("cpu", torch.float16).view(C, S, L, -1)
                hidden = None
                if with_hidden:
                    hidden = torch.stack([hooks.out["embed"]] + [p[3] for p in per[:-1]], 1).cpu().view(C, S, L, -1)
                bar.update(C * S)
                yield Routed(tokens=tokens, ids=ids, top_ids=top_ids, top_logits=top_logits, hidden=hidden)
    finally:
        hooks.remove()


def concat(parts: list[Routed]) -> Routed:
    """Batches of chunks of one length -> one `Routed` (hidden states dropped)."""
    return Routed(tokens=torch.cat([p.tokens for p in parts]), ids=torch.cat([p.ids for p in parts]),
                  top_ids=torch.cat([p.top_ids for p in parts]), top_logits=torch.cat([p.top_logits for p in parts]))
