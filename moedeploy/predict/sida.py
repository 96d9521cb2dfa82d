"""SiDA's expert predictor (Du et al., MLSys 2024): from the tokens alone, every MoE layer's experts at once.

    token ids [B, S] ─► the model's own input embedding (frozen, not stored) [B, S, D]
        ─► Linear(D, H) + ReLU ─► 2-layer LSTM [B, S, H]
        ─► + causal self-attention over the last `window` tokens (pre-norm, one block, residual)
        ─► one linear head per MoE layer (stacked as one H -> L*E matrix) ─► logits [B, S, L, E]

Causal: token t's scores depend on tokens <= t only, so the predictor can run ahead of the model: a
prompt in one `forward`, then one `SidaNet.step` per decoded token, carrying a `State` (the LSTM's (h, c)
and the attention's last window-1 keys and values). `forward` with a state continues from it; steps
equal `forward` on the whole sequence (tested).

Training (`train`): the model's routing recorded over text (record.py) is the teacher. Loss per
token and layer = cross-entropy on the router's top-1 + `distill_weight` x a truncated distillation
on the router's top M = min(30, E) experts: SiDA's L1 between the teacher's and the student's
softmaxes over those M, or KL(teacher || student) over them (`distill`).

Choices, measured on the demo model (validation chunks of its training text, never the held-out plays;
docs/prediction.md has the runs): softmax attention over sparsemax, and KL distillation over SiDA's L1.

This module does not record routing (record.py) or read files beyond its own (files.py checks them).

Legend: B sequences, S tokens, D model hidden size, H predictor width, L MoE layers, E experts,
M distilled experts, W attention window, N heads, A = H / N per head.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import files
from .base import Known, PredictorError
from .record import Routed

KIND = "sida"
DEMO_PREDICTOR = Path(__file__).resolve().parent.parent / "data" / "predictor" / "demo.safetensors"


@dataclass(frozen=True)
class SidaConfig:
    width: int = 192  # H: LSTM and attention width
    lstm_layers: int = 2  # SiDA's
    heads: int = 4
    window: int = 256  # W: tokens the attention sees, itself included (= the training context: no longer spans seen)
    attention: str = "softmax"  # or "sparsemax": softmax scored higher on the demo (module docstring)
    distill: str = "kl"  # KL(teacher || student) over the teacher's top M, or SiDA's "l1": KL scored higher
    distill_weight: float = 3.0  # 3 beat 1 (+2.8 points recall@4) and 10 (-0.4 at a lower top-1 hit rate)

    def __post_init__(self):
        for name in ("width", "lstm_layers", "heads", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PredictorError(f"{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.distill_weight, (int, float)) or not self.distill_weight >= 0:
            raise PredictorError(f"distill_weight must be a number >= 0, got {self.distill_weight!r}")
        if self.attention not in ("softmax", "sparsemax"):
            raise PredictorError(f"attention must be softmax or sparsemax, got {self.attention!r}")
        if self.distill not in ("l1", "kl"):
            raise PredictorError(f"distill must be l1 or kl, got {self.distill!r}")
        if self.width % self.heads:
            raise PredictorError(f"width {self.width} is not a multiple of heads {self.heads}")

    @classmethod
    def from_dict(cls, d: dict) -> SidaConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 5.0  # passes over the training chunks (steps = epochs * chunks / batch); still improving at 5
    steps: int | None = None  # overrides epochs
    batch: int = 16  # chunks per step
    lr: float = 1.2e-2  # AdamW, cosine to zero after a 5% warm-up (3e-3 < 6e-3 < 1.2e-2 on the demo)
    weight_decay: float = 0.01
    validation: float = 0.05  # share of the chunks held back to score the result (at least one)
    seed: int = 0


@dataclass(frozen=True)
class State:
    """What a sequence carries from one step to the next."""

    h: Tensor  # [lstm_layers, B, H]
    c: Tensor  # [lstm_layers, B, H]
    keys: Tensor  # [B, N, P, A], P <= W - 1: the attention's past keys
    values: Tensor  # [B, N, P, A]


def stack(states: list[State]) -> State:
    """Several sequences' states (one sequence each) as one batch, keys and values left-padded with zeros to
    the most kept: [1, ...] each -> [R, N, P_max, A]."""
    P = max(s.keys.shape[2] for s in states)

    def padded(t: Tensor) -> Tensor:  # [1, N, P_i, A] -> [1, N, P, A]
        return F.pad(t, (0, 0, P - t.shape[2], 0))

    return State(h=torch.cat([s.h for s in states], 1), c=torch.cat([s.c for s in states], 1),
                 keys=torch.cat([padded(s.keys) for s in states]), values=torch.cat([padded(s.values) for s in states]))


def split(state: State, kept: list[int]) -> list[State]:
    """A batch's state, one per sequence (views), the padding before each one's last kept[i] keys dropped."""
    return [State(h=state.h[:, i : i + 1], c=state.c[:, i : i + 1], keys=state.keys[i : i + 1, :, -n:],
                  values=state.values[i : i + 1, :, -n:]) for i, n in enumerate(kept)]


def select(state: State, rows: Tensor) -> State:
    """The batch's state with its sequences in the order `rows` [B'] gives (beam search's reordering)."""
    return State(h=state.h[:, rows], c=state.c[:, rows], keys=state.keys[rows], values=state.values[rows])


def sparsemax(z: Tensor, mask: Tensor) -> Tensor:
    """Sparsemax (Martins & Astudillo 2016) over the last dim, masked entries excluded: the Euclidean
    projection of z onto the simplex, so small scores get exactly 0. z [..., n], mask [..., n] bool."""
    z = z.masked_fill(~mask, -1e9)  # sorts last; never enters the support (some entry of each row is allowed)
    zs = z.sort(dim=-1, descending=True).values
    cs = zs.cumsum(-1) - 1
    r = torch.arange(1, z.shape[-1] + 1, device=z.device, dtype=z.dtype)
    k = (zs * r > cs).sum(-1, keepdim=True)  # support size, >= 1
    tau = cs.gather(-1, k - 1) / k
    return (z - tau).clamp(min=0)


class SidaNet(nn.Module):
    """The trainable part (the embedding is the model's, passed in)."""

    def __init__(self, cfg: SidaConfig, hidden_size: int, num_layers: int, num_experts: int):
        super().__init__()
        H = cfg.width
        self.cfg, self.L, self.E = cfg, num_layers, num_experts
        self.proj = nn.Linear(hidden_size, H)
        self.lstm = nn.LSTM(H, H, cfg.lstm_layers, batch_first=True)
        self.norm = nn.LayerNorm(H)
        self.qkv = nn.Linear(H, 3 * H)
        self.out = nn.Linear(H, H)
        self.head = nn.Linear(H, num_layers * num_experts)  # rows l*E..(l+1)*E-1: layer l's head

    def forward(self, emb: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """emb [B, S, D] -> logits [B, S, L, E] and the state after the last token."""
        cfg = self.cfg
        B, S, _ = emb.shape
        N, W = cfg.heads, cfg.window
        x = F.relu(self.proj(emb))  # [B, S, H]
        h, (hn, cn) = self.lstm(x, None if state is None else (state.h, state.c))  # [B, S, H]
        q, k, v = self.qkv(self.norm(h)).view(B, S, 3, N, -1).permute(2, 0, 3, 1, 4)  # each [B, N, S, A]
        if state is not None:
            k, v = torch.cat([state.keys, k], 2), torch.cat([state.values, v], 2)  # [B, N, P+S, A]
        P = k.shape[2] - S
        i = torch.arange(S, device=emb.device)[:, None] + P  # query positions in the key axis
        j = torch.arange(P + S, device=emb.device)[None, :]
        allowed = (j <= i) & (j > i - W)  # [S, P+S]: causal, within the window
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # [B, N, S, P+S]
        if cfg.attention == "softmax":
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        else:
            att = sparsemax(att, allowed.expand_as(att))
        y = (att @ v).transpose(1, 2).reshape(B, S, -1)  # [B, S, H]
        y = h + self.out(y)
        keep = max(W - 1, 0)
        new = State(h=hn, c=cn, keys=k[:, :, k.shape[2] - min(keep, k.shape[2]):],
                    values=v[:, :, v.shape[2] - min(keep, v.shape[2]):])
        return self.head(y).view(B, S, self.L, self.E), new

    def step(self, emb: Tensor, state: State, kept: Tensor | None = None) -> tuple[Tensor, State]:
        """One more token per sequence, the decode hot path: emb [B, D] -> logits [B, L, E] and the state
        after it. The same function as `forward` on [B, 1, D] (tested) in under half its time: one fused
        cell per LSTM layer, and no mask (every kept key is earlier and inside the window). kept [B]: the
        real keys of each sequence when `stack` padded them (the rest are masked)."""
        cfg, lstm = self.cfg, self.lstm
        if cfg.attention != "softmax":
            logits, state = self(emb[:, None], state)
            return logits[:, 0], state
        B = emb.shape[0]
        x = F.relu(F.linear(emb, self.proj.weight, self.proj.bias))  # [B, H]
        hs, cs = [], []
        for i in range(cfg.lstm_layers):
            x, c = torch.lstm_cell(x, (state.h[i], state.c[i]), getattr(lstm, f"weight_ih_l{i}"),
                                   getattr(lstm, f"weight_hh_l{i}"), getattr(lstm, f"bias_ih_l{i}"),
                                   getattr(lstm, f"bias_hh_l{i}"))
            hs.append(x)
            cs.append(c)
        n = F.layer_norm(x, x.shape[-1:], self.norm.weight, self.norm.bias, self.norm.eps)
        q, k, v = F.linear(n, self.qkv.weight, self.qkv.bias).view(B, 3, cfg.heads, 1, -1).unbind(1)  # [B, N, 1, A]
        keys, values = torch.cat([state.keys, k], 2), torch.cat([state.values, v], 2)  # [B, N, P+1, A]
        mask = None
        if kept is not None:  # [B, 1, 1, P+1]: a sequence's own keys and the new one, not the padding
            P = keys.shape[2] - 1
            mask = (torch.arange(P + 1, device=emb.device) >= (P - kept.to(emb.device))[:, None])[:, None, None]
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask).reshape(B, -1)  # [B, H]
        y = x + F.linear(y, self.out.weight, self.out.bias)
        keep = min(max(cfg.window - 1, 0), keys.shape[2])
        new = State(h=torch.stack(hs), c=torch.stack(cs), keys=keys[:, :, keys.shape[2] - keep:],
                    values=values[:, :, values.shape[2] - keep:])
        return F.linear(y, self.head.weight, self.head.bias).view(B, self.L, self.E), new


class SidaPredictor:
    """A trained SiDA predictor bound to its model's input embedding. `scores(known)` for evaluation,
    `forward` / `steps` for a runner that works ahead of the model."""

    def __init__(self, net: SidaNet, embedding: Tensor, model: dict, frequency: Tensor, training: dict | None = None):
        self.net = net.eval()
        self.embedding = embedding  # [V, D] the model's own (a reference, not a copy)
        self.model = model  # the header's model fields
        self.frequency = frequency  # [L, E] share of training tokens routed to each expert (the frequency baseline)
        self.training = training or {}
        self.num_layers, self.num_experts = net.L, net.E

    def _embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens.to(self.embedding.device), self.embedding).float()

    @torch.inference_mode()
    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens [B, S] -> scores [B, S, L, E], state (continue with another `forward`). One token per
        sequence with a state (a decode step) takes the network's `step`."""
        if state is not None and tokens.shape[1] == 1:
            scores, state = self.net.step(self._embed(tokens[:, 0]), state)
            return scores[:, None], state
        return self.net(self._embed(tokens), state)

    @torch.inference_mode()
    def steps(self, tokens: Tensor, states: list[State]) -> tuple[Tensor, list[State]]:
        """One decoded token for each of several sequences (the engine's requests) in one batched step,
        their kept keys padded to the longest: tokens [R] -> scores [R, L, E] and each one's state after it."""
        if self.net.cfg.attention != "softmax":  # no padding mask on that path: one at a time
            out = [self.forward(t.view(1, 1), s) for t, s in zip(tokens, states, strict=True)]
            return torch.cat([scores[:, 0] for scores, _ in out]), [s for _, s in out]
        kept = [s.keys.shape[2] for s in states]
        ragged = torch.tensor(kept) if len(set(kept)) > 1 else None  # padded keys to mask
        scores, state = self.net.step(self._embed(tokens), stack(states), ragged)
        return scores, split(state, [min(n + 1, state.keys.shape[2]) for n in kept])

    def scores(self, known: Known) -> Tensor:
        if known.tokens is None:
            raise PredictorError("the SiDA predictor needs token ids")
        return self.forward(known.tokens[None])[0][0]  # [T, L, E]

    def parameter_count(self) -> int:
        """Trainable parameters (the frozen embedding, the model's own, not counted)."""
        return sum(p.numel() for p in self.net.parameters())

    def save(self, path, dtype: torch.dtype = torch.float32):
        """Write the predictor file (files.py): the network's weights in `dtype`, the frequency table in float32."""
        tensors = {k: v.to(dtype) for k, v in self.net.state_dict().items()}
        return files.save(path, KIND, self.model, asdict(self.net.cfg), self.training,
                          tensors | {"frequency": self.frequency.float()})

    @classmethod
    def load(cls, path, model) -> SidaPredictor:
        """Read a predictor file for `model` (from moedeploy.load); refused if it was trained for another model."""
        pf = files.read(path, KIND)
        files.check_model(pf.path, pf.model, files.model_info(model))
        return cls.from_file(pf, model.get_input_embeddings().weight.detach())

    @classmethod
    def from_file(cls, pf: files.PredictorFile, embedding: Tensor) -> SidaPredictor:
        try:
            cfg = SidaConfig.from_dict(pf.config)
            m = pf.model
            net = SidaNet(cfg, m["hidden_size"], m["num_layers"], m["num_experts"])
            files.require(pf, ["frequency"])
            frequency = pf.tensors["frequency"]
            if tuple(frequency.shape) != (m["num_layers"], m["num_experts"]):
                raise RuntimeError(f"its expert frequencies are {list(frequency.shape)}, not [layers, experts]")
            net.load_state_dict({k: v.float() for k, v in pf.tensors.items() if k != "frequency"})
        except PredictorError as ex:  # its settings (SidaConfig)
            raise PredictorError(f"predictor file {pf.path} has impossible settings: {ex}") from ex
        except (KeyError, TypeError, RuntimeError) as ex:
            raise PredictorError(f"predictor file {pf.path} does not hold a SiDA predictor of its header's shape "
                                 f"({str(ex).splitlines()[0]})") from ex
        return cls(net, embedding, pf.model, pf.tensors["frequency"].float(), pf.training)


def load_for(model, path=None) -> SidaPredictor:
    """The SiDA predictor at `path` for `model` (moedeploy.load's), on the model's device; with no path, the
    shipped one if `model` is the demo model it was trained for."""
    if path is None:
        info = files.model_info(model)
        demo = files.read(DEMO_PREDICTOR, KIND) if DEMO_PREDICTOR.is_file() else None
        if demo is None or any(demo.model.get(k) != v for k, v in info.items()):
            raise PredictorError("a SiDA predictor trained for this model is needed (the shipped one is for the demo "
                                 "model only): train one with `moedeploy predict train --model DIR --text FILE --out "
                                 "P` and pass predictor=P (--predictor P)")
        path = DEMO_PREDICTOR
    predictor = SidaPredictor.load(path, model)
    predictor.net.to(predictor.embedding.device)
    return predictor


def loss_terms(logits: Tensor, routed_top1: Tensor, top_ids: Tensor, top_logits: Tensor, cfg: SidaConfig):
    """logits [..., L, E]; routed_top1 [..., L]; top_ids, top_logits [..., L, M] -> (ce, distill) scalars."""
    E = logits.shape[-1]
    ce = F.cross_entropy(logits.reshape(-1, E), routed_top1.reshape(-1))
    teacher = top_logits.float().softmax(-1)  # [..., L, M]
    student = logits.gather(-1, top_ids)  # [..., L, M]
    if cfg.distill == "l1":
        distill = (teacher - student.softmax(-1)).abs().sum(-1).mean()
    else:
        distill = (teacher * (teacher.clamp_min(1e-12).log() - student.log_softmax(-1))).sum(-1).mean()
    return ce, distill


def train(data: Routed, embedding: Tensor, model: dict, cfg: SidaConfig = SidaConfig(), tc: TrainConfig = TrainConfig(),
          progress: bool = True, log=None) -> tuple[SidaPredictor, dict]:
    """Train on recorded routing (chunks of one length). Returns the predictor and a report: steps, time,
    final losses, and its recall and hit rate on the validation chunks."""
    from .base import frequency
    from .metrics import Tally

    torch.manual_seed(tc.seed)
    C, S, L, K = data.ids.shape
    E = model["num_experts"]
    gen = torch.Generator().manual_seed(tc.seed)
    order = torch.randperm(C, generator=gen)
    n_val = max(1, round(C * tc.validation)) if C > 1 else 0
    val, tr = order[:n_val], order[n_val:]
    if len(tr) == 0:
        raise PredictorError("not enough text to train on: give more (or longer) --text files")
    steps = tc.steps if tc.steps is not None else max(1, math.ceil(tc.epochs * len(tr) / tc.batch))
    net = SidaNet(cfg, embedding.shape[1], L, E)
    emb_w = embedding.detach().float()
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    other = [p for n, p in net.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=tc.lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(steps - warm, 1))))
    start, last = time.perf_counter(), {}
    net.train()
    with tqdm(range(steps), desc="moedeploy: training the SiDA predictor", unit="step", disable=not progress or None,
              leave=False) as bar:
        for step in bar:
            pick = tr[torch.randint(len(tr), (min(tc.batch, len(tr)),), generator=gen)]
            logits, _ = net(F.embedding(data.tokens[pick], emb_w))  # [B, S, L, E]
            ce, distill = loss_terms(logits, data.ids[pick][..., 0].long(), data.top_ids[pick].long(),
                                     data.top_logits[pick], cfg)
            loss = ce + cfg.distill_weight * distill
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 20 == 0 or step == steps - 1:
                last = {"ce": round(ce.item(), 4), "distill": round(distill.item(), 4)}
                bar.set_postfix(last)
    net.eval()
    report = {"tokens": int(len(tr) * S), "chunks": len(tr), "context": int(S), "steps": steps,
              "train_seconds": round(time.perf_counter() - start, 1), "final_loss": last, "train_config": asdict(tc)}
    predictor = SidaPredictor(net, embedding, model, torch.from_numpy(frequency(data.ids[tr].reshape(-1, L, K).numpy(), E)),
                              report)
    if n_val:
        tally = Tally(ks=tuple(sorted({K, 2 * K})), num_layers=L, top_k=K)
        with torch.inference_mode():
            for i in range(0, n_val, 32):
                idx = val[i:i + 32]
                s, _ = net(F.embedding(data.tokens[idx], emb_w))
                tally.add(s.reshape(-1, L, E), data.ids[idx].reshape(-1, L, K), data.ids[idx][..., 0].reshape(-1, L))
        summary = tally.summary()
        report["validation"] = {"tokens": summary["tokens"], "mean_recall": summary["mean_recall"],
                                "mean_hit_rate": summary["mean_hit_rate"]}
    if log:
        log(report)
    return predictor, report
