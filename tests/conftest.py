"""Shared fixtures: tiny checkpoints of every family, and transformers reference models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
import transformers as T
from packaging.version import Version

from moedeploy.tiny import save_tiny


@pytest.fixture(scope="session", autouse=True)
def moedeploy_cache(tmp_path_factory):
    """moedeploy's cache folder (quantized experts of the disk store) in the session's temporary directory, never
    the user's (subprocesses inherit it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEDEPLOY_CACHE", str(tmp_path_factory.mktemp("moedeploy-cache")))
        yield


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(family, **config_overrides) -> checkpoint directory (built once per distinct request)."""
    made = {}

    def make(family: str, fused: bool = False, **overrides):
        key = (family, fused, tuple(sorted(overrides.items())))
        if key not in made:
            out = tmp_path_factory.mktemp(family)
            made[key] = save_tiny(family, out, fused=fused, **overrides)
        return made[key]

    return make


def _nllb_experts_forward(self, hidden_states, router_mask, router_probs):
    """fairseq's semantics: each expert computes the tokens routed to it (transformers 5 runs
    expert_0/expert_1 instead, see moedeploy/models/seq2seq.py)."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        rows = torch.nonzero(router_probs[:, e]).squeeze(-1)
        if rows.numel():
            h = self[f"expert_{e}"](hidden_states[rows]) * router_probs[rows, e, None]
            out.index_add_(0, rows, h * (1 - self.moe_token_dropout))
    return out


def skip_without_switch_reference() -> None:
    """transformers 5.17's SwitchTransformersSparseMLP unpacks its router's outputs in the wrong order
    (expert ids as weights; fixed in 5.18), so there a Switch model is no reference. moedeploy follows
    5.18 and later, which route as the Switch paper does."""
    if Version(T.__version__) < Version("5.18"):
        pytest.skip(f"transformers {T.__version__}'s Switch MoE is off (fixed in 5.18); no reference here")


@pytest.fixture
def reference(monkeypatch):
    """reference(path) -> the transformers model, float32, eager experts, in eval mode."""
    from transformers.models.nllb_moe import modeling_nllb_moe

    monkeypatch.setattr(modeling_nllb_moe.NllbMoeExperts, "forward", _nllb_experts_forward)

    def load(path):
        config = T.AutoConfig.from_pretrained(path)
        if config.model_type == "switch_transformers":
            skip_without_switch_reference()
        if config.is_encoder_decoder:
            return T.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
        return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()

    return load


def server_rss(server) -> int:
    """Resident memory of a server process, bytes."""
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    """serve(*args) -> `moedeploy serve --port 0 ARGS` on loopback, healthy (bench.serve.Server: bounded waits);
    every one is stopped when the module's tests end."""
    import sys

    from moedeploy.bench.serve import Server

    started = []

    def start(*args: str) -> Server:
        command = [sys.executable, "-m", "moedeploy", "serve", "--port", "0", *args]
        started.append(Server("moedeploy serve", command, model="moedeploy-demo"))
        return started[-1].wait("/health")

    yield start
    for server in started:
        server.stop()
