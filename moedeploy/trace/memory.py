"""Where a MoE model's memory goes (SiDA's Table 2 view): weight bytes by kind vs activation bytes.

    model_memory(model)         from a model loaded by moedeploy.load (Runtime.parameters, its dtype)
    config_memory(config dict)  from a Hugging Face config alone: the model is built on the meta device,
                                so no weights are needed (used for the ESFT traces' DeepSeek-V2-Lite)

Activation bytes are per token: the KV cache that transformers' attention keeps (all layers), and the
transient buffers of one MoE layer with dynamic gating (x, and per pair: x_sorted, gate|up, activation,
y_sorted). They are formulas over the config, not measurements.

This module does not run the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class Memory:
    total_params: int
    routed_expert_params: int  # all routed experts of all MoE layers (shared experts not included)
    active_params_per_token: int  # all but the routed experts a token does not use
    bytes_per_param: int
    moe_layers: int
    num_experts: int  # per layer
    top_k: int
    kv_bytes_per_token: int  # the attention cache, all layers
    moe_activation_bytes_per_token: int  # one MoE layer's transient buffers

    @property
    def weight_bytes(self) -> int:
        return self.total_params * self.bytes_per_param

    @property
    def expert_bytes(self) -> int:
        return self.routed_expert_params * self.bytes_per_param

    @property
    def expert_share(self) -> float:
        return self.routed_expert_params / self.total_params

    @property
    def bytes_per_expert(self) -> int:
        return self.expert_bytes // max(self.moe_layers * self.num_experts, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "expert_bytes": self.expert_bytes,
                "expert_share": round(self.expert_share, 4), "bytes_per_expert": self.bytes_per_expert}

    @classmethod
    def from_dict(cls, d: dict) -> "Memory":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def _activation_bytes(cfg, top_k: int, nbytes: int) -> tuple[int, int]:
    """(KV cache bytes per token, MoE-layer transient bytes per token) from a transformers config."""
    layers = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):  # MLA: transformers caches decompressed keys and values
        kv = heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + heads * cfg.v_head_dim
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        kv = 2 * (getattr(cfg, "num_key_value_heads", None) or heads) * head_dim
    D = cfg.hidden_size
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    moe = D + top_k * (D + 2 * inter + inter + D)  # x; per pair: x_sorted, gate|up, act, y_sorted
    return layers * kv * nbytes, moe * nbytes


def model_memory(model) -> Memory:
    """Memory of a model loaded by moedeploy.load."""
    runtime = model.moedeploy
    counts = runtime.parameters(model)
    first = next(iter(runtime.layers.values()))
    nbytes = torch.empty((), dtype=model.dtype).element_size()
    kv, moe = _activation_bytes(model.config.get_text_config(), first.router.top_k, nbytes)
    return Memory(total_params=counts["total"], routed_expert_params=counts["routed_expert"],
                  active_params_per_token=counts["active_per_token"], bytes_per_param=nbytes,
                  moe_layers=len(runtime.layers), num_experts=first.experts.num_experts, top_k=first.router.top_k,
                  kv_bytes_per_token=kv, moe_activation_bytes_per_token=moe)


def config_memory(config: dict, model_type: str = "deepseek_v2") -> Memory:
    """Memory of the model a config describes, without weights (built on the meta device)."""
    import transformers as T

    cfg = T.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    total = expert = 0
    layers = set()
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name:  # routed experts; shared experts are named shared_expert(s)
            expert += p.numel()
            layers.add(name.split(".experts.")[0])
    E = getattr(cfg, "n_routed_experts", None) or getattr(cfg, "num_experts", None) or cfg.num_local_experts
    K = cfg.num_experts_per_tok
    nbytes = _BYTES.get(str(getattr(cfg, "dtype", None) or "bfloat16").removeprefix("torch."), 2)
    kv, moe = _activation_bytes(cfg, K, nbytes)
    return Memory(total_params=total, routed_expert_params=expert, active_params_per_token=int(total - expert * (1 - K / E)),
                  bytes_per_param=nbytes, moe_layers=len(layers), num_experts=E, top_k=K, kv_bytes_per_token=kv,
                  moe_activation_bytes_per_token=moe)
