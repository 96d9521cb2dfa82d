"""One batched model step: a step's chunks, packed into one sequence, through the model; logits where sampled.

    chunks ─► input_ids, positions, owners [T] ─► PackedKV.extend ─► additive mask [1, 1, T, L + T]
          ─► model(input_ids [1, T], position_ids [1, T], mask, the packed cache, logits_to_keep=rows)
          ─► logits [R, V] at the last token of each chunk that samples

Every MoE layer sees the step's T tokens at once ([1, T, D]), so dynamic gating and the expert cache work
on the whole batch. Nothing is padded: no padding token reaches the router, its statistics or a trace.

Legend: T = tokens in the step, L = KV columns before it, R = requests sampled, V = vocabulary.
"""

from __future__ import annotations

import inspect

import torch

from .kv import PackedKV
from .scheduler import Chunk


def cache_keyword(model) -> str:
    """The name under which the model's forward takes its KV cache: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name still works there, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        self.kv = PackedKV(model.config, model.device)
        self._cache_kw = cache_keyword(model)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run the chunks as one step; return logits [R, V] for the chunks that sample, in their order."""
        ids, owner, pos, last = [], [], [], []
        for c in chunks:
            ids += c.request.tokens[c.start:c.start + c.length]
            owner += [c.request.id] * c.length
            pos += range(c.start, c.start + c.length)
            if c.samples:
                last.append(len(ids) - 1)
        to = dict(dtype=torch.long, device=self.device)
        pos_t = torch.tensor(pos, **to)  # [T]
        mask = self.kv.extend(torch.tensor(owner, **to), pos_t, self.dtype)  # [1, 1, T, L + T]
        out = self.model(input_ids=torch.tensor([ids], **to), position_ids=pos_t[None], attention_mask=mask,
                         use_cache=True, logits_to_keep=torch.tensor(last, **to), **{self._cache_kw: self.kv.cache})
        return out.logits[0]  # [R, V]
