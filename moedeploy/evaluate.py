"""Perplexity and bits per byte of a causal LM on a text, in non-overlapping windows.

bits per byte = total negative log-likelihood (nats) / ln 2 / UTF-8 bytes of the scored tokens, so models
with different tokenizers compare. Each window of `context` tokens is scored given only itself (the
first token of a window is predicted from nothing before it and is not scored, and its bytes are not
counted either), which is conservative and fast. A token's bytes run from the end of the token before it
to its own end (the tokenizer's offsets), so the space a token starts with is its own.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Perplexity:
    tokens: int  # scored tokens
    bytes: int  # UTF-8 bytes of the scored tokens
    nll_nats: float  # total negative log-likelihood
    perplexity: float  # exp(nll / tokens)
    bits_per_byte: float

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExpertLoad:
    """How unevenly one MoE layer's routed (token, expert) pairs spread over its experts."""

    top_quarter_share: float  # share of pairs taken by the most popular 25% of experts (uniform: 0.25)
    entropy_bits: float  # entropy of the load distribution
    normalized_entropy: float  # entropy / log2(E): 1.0 is perfectly even

    @classmethod
    def of(cls, counts: torch.Tensor) -> "ExpertLoad":
        counts = counts.double()
        E = counts.numel()
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log2()).sum().item()
        top = counts.sort(descending=True).values[: max(E // 4, 1)].sum() / counts.sum().clamp(min=1)
        return cls(round(top.item(), 4), round(entropy, 4), round(entropy / math.log2(E), 4) if E > 1 else 1.0)


@torch.inference_mode()
def perplexity(model, tokenizer, text: str, context: int = 256, batch: int = 8, decode: bool = False,
               progress: bool = False, limit: int | None = None) -> Perplexity:
    """limit: only the text's first `limit` tokens. decode: score each window one token per forward with a KV cache, as generation runs (what expert
    budgets, prefetchers and routing modes see then), one window at a time; else a window per forward."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no offsets: bits per byte over the whole text
        encoded = tokenizer(text, add_special_tokens=False)
    ids = torch.tensor(encoded["input_ids"], dtype=torch.long)[:limit]
    n = (ids.numel() // context) * context
    windows = ids[:n].view(-1, context)  # [W, C]; the ragged tail is scored as one shorter window
    batch = 1 if decode else batch
    chunks = [c for c in windows.split(batch) if len(c)] + ([ids[n:].unsqueeze(0)] if ids.numel() - n > 1 else [])
    nll, scored = 0.0, 0
    device = next(model.parameters()).device
    for chunk in tqdm(chunks, desc="scoring", unit="window", disable=not progress):
        chunk = chunk.to(device)
        logits = (_decoded_logits(model, chunk) if decode else model(input_ids=chunk).logits)[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum").item()
        scored += chunk[:, 1:].numel()
    offsets = encoded.get("offset_mapping")
    nbytes = len(text.encode("utf-8")) if offsets is None else _scored_bytes(text, offsets[: ids.numel()], context)
    return Perplexity(tokens=scored, bytes=nbytes, nll_nats=nll, perplexity=math.exp(nll / max(scored, 1)),
                      bits_per_byte=nll / math.log(2) / max(nbytes, 1))


def _scored_bytes(text: str, offsets: list[tuple[int, int]], context: int) -> int:
    """UTF-8 bytes of the tokens `perplexity` scores: all but the first of each window (and a last window of
    one token, never scored). Token i's bytes: text[end of token i-1 : end of token i]."""
    ends = [end for _, end in offsets]
    starts = [0] + ends[:-1]
    n = len(ends)
    tail = n - (n // context) * context
    unscored = set(range(0, n - tail, context)) | ({n - tail} if tail else set())  # each window's first token
    return sum(len(text[a:b].encode("utf-8")) for i, (a, b) in enumerate(zip(starts, ends)) if i not in unscored)


def _decoded_logits(model, chunk: torch.Tensor) -> torch.Tensor:
    """chunk [B, C] -> logits [B, C, V], one token per forward, the KV cache carried."""
    from .engine.runner import cache_keyword

    name = cache_keyword(model)
    out = model(input_ids=chunk[:, :1], use_cache=True)
    logits = [out.logits]
    for t in range(1, chunk.shape[1]):
        out = model(input_ids=chunk[:, t : t + 1], use_cache=True, **{name: out[name]})
        logits.append(out.logits)
    return torch.cat(logits, 1)
