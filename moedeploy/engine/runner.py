"""One batched model step: a step's chunks, packed into one sequence, through the model; logits where sampled.

    chunks ─► input_ids, positions [T]; segments (request, first row, rows) ─► RequestKV.begin (room in the arena)
          ─► model(input_ids [1, T], position_ids [1, T], cache=RequestKV, packed_kv=RequestKV, logits_to_keep=rows)
              each layer: RequestKV.update writes the new keys and values into the arena; packed attention
              (attention.py) lets each request attend to its own region
          ─► logits [R, V] at the last token of each chunk that samples

Every MoE layer sees the step's T tokens at once ([1, T, D]), so dynamic gating and the expert cache work
on the whole batch. Nothing is padded: no padding token reaches the router, its statistics or a trace.

Legend: T = tokens in the step, R = requests sampled, V = vocabulary.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from . import attention
from .kv import RequestKV
from .scheduler import Chunk


def cache_keyword(model) -> str:
    """The name under which the model's forward takes its KV cache: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name still works there, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@dataclass(frozen=True)
class Step:
    """One step, packed: what the model is given. Plain lists, so it can be sent to other ranks."""

    ids: list[int]  # [T] token ids
    pos: list[int]  # [T] positions
    last: list[int]  # [R] rows whose logits are sampled
    segments: list[tuple[int, int, int]]  # (request id, first row, rows) per chunk
    limits: dict[int, int]  # request id -> the most KV columns it will need (prompt + max_tokens)


class ModelRunner:
    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.kv = RequestKV(model.config, model.device)
        attention.install(model)
        self._cache_kw = cache_keyword(model)

    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run the chunks as one step; return logits [R, V] for the chunks that sample, in their order."""
        return self.run(pack(chunks))

    @torch.inference_mode()
    def run(self, step: Step) -> torch.Tensor:
        self.kv.begin(step.segments, step.limits)
        to = dict(dtype=torch.long, device=self.device)
        unused_mask = torch.zeros((1, 1, len(step.ids), 1), dtype=self.model.dtype, device=self.device)  # 4-D: as is
        out = self.model(input_ids=torch.tensor([step.ids], **to), position_ids=torch.tensor([step.pos], **to),
                         attention_mask=unused_mask, use_cache=True, logits_to_keep=torch.tensor(step.last, **to),
                         packed_kv=self.kv, **{self._cache_kw: self.kv})
        return out.logits[0]  # [R, V]

    def free(self, request_ids: list[int]) -> None:
        """Ended requests' KV regions become free."""
        self.kv.free(request_ids)

    def reset(self) -> None:
        """Every region free (after a failed step)."""
        self.kv.reset()


def pack(chunks: list[Chunk]) -> Step:
    """A step's chunks as one sequence: ids and positions, the rows that sample, each chunk's segment."""
    ids, pos, last, segments = [], [], [], []
    for c in chunks:
        segments.append((c.request.id, len(ids), c.length))
        ids += c.request.tokens(c.start, c.length)
        pos += range(c.start, c.start + c.length)
        if c.samples:
            last.append(len(ids) - 1)
    return Step(ids, pos, last, segments, {c.request.id: len(c.request.prompt) + c.request.params.max_tokens
                                           for c in chunks})
