"""Attention over packed requests: each request attends to its own keys and values only.

A packed step's query is [1, H, T, d], the rows of each request contiguous (`RequestKV.segments`); its keys and
values are the KV arena, each request's keys in its own region (`RequestKV.spans`). For every request: its rows of the query
against its own keys ([1, H_kv, L, d], views), causal within its new rows, through `scaled_dot_product_attention`. So a request's attention is the computation it would get alone, whatever else
is in the step, and its cost grows with its own length, not the batch's.

Installed as a transformers attention implementation (`AttentionInterface`), named after the implementation it
falls back to outside engine steps (`moedeploy_packed_sdpa` calls transformers' `sdpa` when no `packed_kv` is
passed), so `model.generate` on the same model is unchanged.

Legend: H = query heads, H_kv = key/value heads, T = tokens in the step, n = a request's tokens in it,
L = its keys so far (n included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..errors import UnsupportedModelError

PREFIX = "moedeploy_packed_"


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_kv=None, **kwargs):
    """query [1, H, T, d] -> ([1, T, H, d_v], None), each request's rows against its own keys and values."""
    if kwargs.get("s_aux") is not None or kwargs.get("softcap") is not None:
        raise UnsupportedModelError("attention sinks and soft-capping are not supported by the engine's packed attention")
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty((query.shape[0], query.shape[2], query.shape[1], value.shape[-1]))  # [1, T, H, d_v]
    # One call per request. One masked call for all single-token rows against the whole arena measured slower on
    # CPU (9.0 vs 10.7 ms a step, 16 requests, demo model): it expands the keys for GQA and reads every region.
    for (_, start, n), (first, L) in zip(packed_kv.segments, packed_kv.spans):
        k, v = key[:, :, first:first + L], value[:, :, first:first + L]  # [1, H_kv, L, d]: this request's keys
        q = query[:, :, start:start + n]  # [1, H, n, d]
        mask = None if n == 1 else torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)  # causal, [n, L]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out[:, start:start + n] = o.transpose(1, 2)
    return out, None


def install(model) -> None:
    """Give `model` packed attention for engine steps, falling back to its current implementation elsewhere."""
    current = model.config._attn_implementation  # where transformers keeps the name; set_attn_implementation writes it
    if current.startswith(PREFIX):
        return
    fallback = ALL_ATTENTION_FUNCTIONS.get_interface(current, None)  # eager is model-local: not in the registry
    if fallback is None:
        raise UnsupportedModelError(f"the engine needs a registered attention implementation such as 'sdpa' to fall back "
                                    f"to outside its steps; this model uses {current!r}")
    name = PREFIX + current

    def attention(module, query, key, value, attention_mask, packed_kv=None, **kwargs):
        if packed_kv is None:
            return fallback(module, query, key, value, attention_mask, **kwargs)
        return packed_attention(module, query, key, value, attention_mask, packed_kv=packed_kv, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
