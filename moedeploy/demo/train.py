"""Train the demo model from scratch: a byte-level BPE tokenizer, then a small Qwen3-MoE LM.

Reproducible: fixed seeds, a fixed number of steps, and the data fetched by `data.py`. The router's
auxiliary load-balancing loss is kept modest by a feedback rule, because real routers are skewed and
the product must be shown on skewed routing: every `skew_every` steps the share of routed tokens that
the most popular quarter of experts takes is measured per layer on the current batch, and that
layer's loss coefficient is multiplied by 1.25 above the target band or divided by 1.25 below it.
The result is written as a normal checkpoint (bf16 safetensors, tokenizer, config) plus
`training.json` (settings, losses, skew and coefficient over time, wall time).

This module does not evaluate the model: `moedeploy.evaluate` does, for this and any other model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as T

from .data import Corpus

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    vocab_size: int = 4096
    hidden_size: int = 192
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    experts: int = 32
    top_k: int = 4
    moe_intermediate: int = 128
    context: int = 256
    batch: int = 16  # sequences per step
    steps: int = 3600
    lr: float = 3e-3
    lr_floor: float = 0.0  # the cosine decays to lr * lr_floor
    warmup: int = 100
    weight_decay: float = 0.1
    dropout: float = 0.1  # on each attention and MoE output before the residual add (training only)
    aux_coef: float = 0.01  # starting coefficient of the load-balancing loss
    skew_band: tuple[float, float] = (0.48, 0.58)  # target top-quarter share of routed tokens
    skew_every: int = 25
    seed: int = 0
    threads: int = 2


def train_tokenizer(texts: list[str], vocab_size: int) -> T.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS)


def model_config(cfg: TrainConfig, eos_id: int) -> T.Qwen3MoeConfig:
    return T.Qwen3MoeConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.hidden_size // cfg.heads,
        intermediate_size=4 * cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate, num_experts=cfg.experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=True, decoder_sparse_step=1, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        router_aux_loss_coef=0.0,  # added by hand below, with a coefficient that adapts
    )


def top_quarter_share(router_logits: tuple[torch.Tensor, ...], top_k: int) -> list[float]:
    """Per layer: the share of routed (token, expert) pairs taken by the most popular quarter of experts."""
    shares = []
    for logits in router_logits:  # [T, E]
        E = logits.shape[-1]
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.reshape(-1), minlength=E).float()
        shares.append((counts.sort(descending=True).values[: E // 4].sum() / counts.sum()).item())
    return shares


def load_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss of each layer, [L]: E * sum_i f_i * P_i, with f_i the share
    of routed pairs that chose expert i and P_i its mean router probability.

    transformers' own `load_balancing_loss_func` concatenates all layers before counting, so it
    balances expert index i summed over layers: a hot expert in one layer and a cold one of the same
    index in another cancel out, and per-layer skew goes unpenalised.
    """
    losses = []
    for logits in router_logits:  # [T, E]
        E = logits.shape[-1]
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = torch.zeros_like(probs).scatter_(1, probs.topk(top_k, dim=-1).indices, 1.0)  # [T, E]
        f = chosen.mean(dim=0) / top_k  # [E], sums to 1
        losses.append(E * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses)


def add_residual_dropout(model: T.PreTrainedModel, p: float) -> None:
    """Dropout on every attention and MoE block output, as GPT-2 does; Qwen3-MoE's config has none.

    About 3M tokens of text seen for several epochs: without it the model memorises the training
    plays (1.66 bits per byte on Hamlet against 2.05 on the held-out plays after 2000 steps); 0.1 is
    the default (docs/demo-model.md lists the runs). Forward hooks act only in training mode and are
    not saved with the checkpoint.
    """
    def drop(module, args, output):
        if not module.training:
            return output
        if isinstance(output, tuple):  # attention: (hidden, weights)
            return (torch.nn.functional.dropout(output[0], p, True),) + output[1:]
        return torch.nn.functional.dropout(output, p, True)

    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


def steer(coefs: list[float], shares: list[float], band: tuple[float, float]) -> list[float]:
    """One step of the skew controller: each layer's coefficient up 1.25x if its top-quarter share is
    above the band, down 1.25x if below, clamped to [1e-4, 1]."""
    return [min(c * 1.25, 1.0) if s > band[1] else max(c / 1.25, 1e-4) if s < band[0] else c
            for c, s in zip(coefs, shares)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (cfg.lr_floor + (1 - cfg.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out: Path, corpus: Corpus, cfg: TrainConfig = TrainConfig(), log=print) -> dict:
    """Train on `corpus.train` and save the checkpoint to `out`; returns the training report."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    tokenizer = train_tokenizer(list(corpus.train.values()), cfg.vocab_size)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    stream = []
    for text in corpus.train.values():
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    data = torch.tensor(stream, dtype=torch.long)
    log(f"training text: {len(corpus.train)} files, {sum(map(len, corpus.train.values())):,} chars, {data.numel():,} tokens")

    config = model_config(cfg, eos)
    model = T.Qwen3MoeForCausalLM(config).float().train()
    model.set_experts_implementation("grouped_mm")
    if cfg.dropout:
        add_residual_dropout(model, cfg.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    coefs, history, start = [cfg.aux_coef] * cfg.layers, [], time.perf_counter()
    for step in range(cfg.steps):
        starts = torch.randint(0, data.numel() - cfg.context, (cfg.batch,), generator=gen)
        batch = torch.stack([data[s : s + cfg.context] for s in starts.tolist()])  # [B, C]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        outputs = model(input_ids=batch, labels=batch, output_router_logits=True)  # transformers shifts the labels
        aux = load_balance_loss(outputs.router_logits, cfg.top_k)  # [L]
        loss = outputs.loss + (torch.tensor(coefs) * aux).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.skew_every == 0 or step == cfg.steps - 1:
            shares = top_quarter_share(outputs.router_logits, cfg.top_k)
            coefs = steer(coefs, shares, cfg.skew_band)
            row = dict(step=step, loss=round(outputs.loss.item(), 4), aux=round(aux.mean().item(), 4),
                       coef=[round(c, 5) for c in coefs], top_quarter=[round(s, 3) for s in shares],
                       minutes=round((time.perf_counter() - start) / 60, 2))
            history.append(row)
            log(json.dumps(row))
    minutes = (time.perf_counter() - start) / 60
    out.mkdir(parents=True, exist_ok=True)
    model.config.router_aux_loss_coef = sum(coefs) / len(coefs)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    report = dict(config=asdict(cfg), train_minutes=round(minutes, 1), final_aux_coef=coefs, history=history,
                  params=sum(p.numel() for p in model.parameters()), data_tokens=data.numel(),
                  heldout=list(corpus.heldout), other=list(corpus.other))
    (out / "training.json").write_text(json.dumps(report, indent=1))
    return report
