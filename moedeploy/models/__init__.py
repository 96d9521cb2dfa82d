"""One small adapter per Hugging Face MoE family; the generic one covers families not listed.

`family_for(config)` picks the adapter by `config.model_type`. An adapter says where the MoE blocks
are, how the router scores, which activation the experts use, what the shared experts are, and how
the checkpoint names expert tensors on disk (`layouts.py`).
"""

from __future__ import annotations

from .base import Family
from .deepseek import DeepseekV2, DeepseekV3
from .gpt_oss import GptOss
from .phimoe import Phimoe
from .seq2seq import NllbMoe, SwitchTransformers
from .softmax import GraniteMoe, Mixtral, QwenMoe

FAMILIES: tuple[Family, ...] = (
    Mixtral(), QwenMoe(), GraniteMoe(), Phimoe(), DeepseekV2(), DeepseekV3(), GptOss(), SwitchTransformers(), NllbMoe(),
)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def family_for(config) -> Family:
    return _BY_TYPE.get(config.model_type, Family())


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


__all__ = ["FAMILIES", "Family", "family_for", "supported_model_types"]
