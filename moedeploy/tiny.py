"""Tiny random checkpoints of every supported family, for tests, smoke runs and bug reports.

Real transformers model classes with small configs, saved with `save_pretrained` (so the expert
tensors have each family's real on-disk names), plus a byte-level BPE tokenizer trained on a few
sentences. Nothing is downloaded. `save_tiny_prequantized` stores one pre-quantized (GPT-OSS MXFP4 experts,
DeepSeek-V3-style FP8 Linear weights) with a dequantized float twin for reference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
import transformers as T

VOCAB = 320
_TEXT = (
    "Mixture-of-Experts models route every token to a few experts. Only the hot experts need to live in "
    "device memory; the rest wait on the host or on disk. Dynamic gating sorts tokens by expert, so each "
    "expert computes exactly the tokens it got, with no capacity and no padding. "
) * 4

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def _configs() -> dict[str, Callable[[], T.PretrainedConfig]]:
    """family -> a function building its tiny config (lazily: some configs warn when built)."""
    d = _DECODER
    mla = dict(d, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    seq2seq_ids = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0)
    return {
        "mixtral": lambda: T.MixtralConfig(**d, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**d, intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                                      shared_expert_intermediate_size=20, num_experts_per_tok=2, norm_topk_prob=False),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**d, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                      num_experts_per_tok=3, head_dim=8, norm_topk_prob=True),
        "olmoe": lambda: T.OlmoeConfig(**d, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
        "deepseek_v2": lambda: T.DeepseekV2Config(**mla, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                          num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                                          topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                                          first_k_dense_replace=1, q_lora_rank=None),
        "deepseek_v3": lambda: T.DeepseekV3Config(**mla, intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                          num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                                          routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=24),
        "gpt_oss": lambda: T.GptOssConfig(**d, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, head_dim=8,
                                  sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
        "phimoe": lambda: T.PhimoeConfig(**d, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        "granitemoe": lambda: T.GraniteMoeConfig(**d, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
        "glm4_moe": lambda: T.Glm4MoeConfig(**dict(d, num_key_value_heads=4), intermediate_size=40,
                                            moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=3,
                                            n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=0),
        "flex_olmo": lambda: T.FlexOlmoConfig(**d, intermediate_size=24, num_experts=6, num_experts_per_tok=2),
        "switch_transformers": lambda: T.SwitchTransformersConfig(
            **seq2seq_ids, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2, num_heads=4, num_experts=4,
            expert_capacity=4, encoder_sparse_step=1, decoder_sparse_step=1),
        "nllb_moe": lambda: T.NllbMoeConfig(
            **seq2seq_ids, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, num_experts=4, encoder_sparse_step=1,
            decoder_sparse_step=1, max_position_embeddings=256),
    }


FAMILIES = tuple(_configs())


def tiny_config(family: str, **overrides) -> T.PretrainedConfig:
    configs = _configs()
    if family not in configs:
        raise ValueError(f"no tiny config for {family!r}; choose one of: {', '.join(configs)}")
    config = configs[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_tokenizer() -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, fused: bool = False, **overrides) -> Path:
    """Write a tiny random `family` checkpoint (config, safetensors, tokenizer) to `out_dir`.

    By default tensors get the family's original on-disk names (per-expert for most); `fused=True`
    saves transformers 5's in-memory names instead (all experts in one tensor per projection).
    """
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    auto = T.AutoModelForSeq2SeqLM if config.is_encoder_decoder else T.AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out, save_original_format=not fused)
    tiny_tokenizer().save_pretrained(out)
    return out


QUANT_METHODS = {"gpt_oss": "mxfp4"}  # every other family ships FP8 (DeepSeek-V3's format)


def save_tiny_prequantized(family: str, out_dir: str | Path, reference_dir: str | Path | None = None, seed: int = 0,
                           block: tuple[int, int] = (128, 128), **overrides) -> Path:
    """A tiny `family` checkpoint stored pre-quantized, in the on-disk layout transformers reads, with its
    `quantization_config` in config.json: GPT-OSS's routed experts as MXFP4 (`experts.gate_up_proj_blocks`
    [E, 2I, D/32, 16] + `_scales`, `down_proj_*` likewise; hidden and intermediate sizes multiples of 32), any
    other family's Linear weights (attention, dense and shared MLPs, routed experts; not the router, the
    embeddings or lm_head) as FP8 e4m3 with `weight_scale_inv` per `block`. `reference_dir`: the same model with
    the dequantized float weights, as a plain checkpoint (what transformers loads as the reference)."""
    from safetensors.torch import load_file, save_file

    from .quant import fp8, mxfp4

    out = save_tiny(family, out_dir, seed=seed, **overrides)
    tensors = load_file(out / "model.safetensors")
    method = QUANT_METHODS.get(family, "fp8")
    if method == "mxfp4":
        quantized, floats = _mxfp4_experts(tensors, mxfp4)
        config = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    else:
        quantized, floats = _fp8_linears(tensors, _linear_weights(out), block, fp8)
        config = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block),
                  "activation_scheme": "dynamic"}
    if reference_dir is not None:
        import shutil

        shutil.copytree(out, reference_dir, dirs_exist_ok=True)
        save_file(floats, Path(reference_dir) / "model.safetensors", metadata={"format": "pt"})
    save_file(quantized, out / "model.safetensors", metadata={"format": "pt"})
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "quantization_config": config}, indent=2))
    return out


def _mxfp4_experts(tensors: dict, mxfp4) -> tuple[dict, dict]:
    """Fused GPT-OSS experts [E, K, R] (transposed) -> blocks and scales of [E, R, K]; and their float values."""
    quantized, floats = {}, dict(tensors)
    for name, t in tensors.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = mxfp4.quantize(t.transpose(1, 2))  # [E, R, K / 32, 16], [E, R, K / 32]
            quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
            floats[name] = mxfp4.dequantize(blocks, scales, t.dtype).transpose(1, 2).contiguous()
        else:
            quantized[name] = t
    return quantized, floats


def _linear_weights(path: Path) -> set[str]:
    """Names of the nn.Linear weights DeepSeek-V3's FP8 checkpoints quantize: every one but lm_head (the routed
    experts, not nn.Linear in transformers 5, are matched by name in `_fp8_linears`)."""
    config = T.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(config)
    return {f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")}


def _fp8_linears(tensors: dict, linears: set[str], block: tuple[int, int], fp8) -> tuple[dict, dict]:
    quantized, floats = {}, dict(tensors)
    for name, t in tensors.items():
        if name in linears or re.search(r"\.experts\.\d+\.\w+\.weight$", name):
            q, scale_inv = fp8.quantize(t, block)  # [N, K] float8, [ceil(N / bn), ceil(K / bk)]
            quantized[name], quantized[f"{name}_scale_inv"] = q, scale_inv
            floats[name] = fp8.dequantize(q, scale_inv, block, t.dtype)
        else:
            quantized[name] = t
    return quantized, floats
