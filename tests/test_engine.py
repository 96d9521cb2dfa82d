"""The engine: continuous batching with chunked prefill gives every request what it would get alone, and what
`model.generate` gives; sampling is per request; stop strings, limits, aborts and timeouts end requests and free
their KV at once."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import AutoTokenizer

import moedeploy
from moedeploy.engine import ContextTooLong, Engine, EngineConfig, QueueFull, SamplingParams
from moedeploy.engine.detok import Detokenizer
from moedeploy.engine.request import Request
from moedeploy.engine.runner import cache_keyword
from moedeploy.engine.scheduler import Scheduler
from moedeploy.errors import OptionError, UnsupportedModelError

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def demo():
    model = moedeploy.load(None, dtype="float32")
    return model, AutoTokenizer.from_pretrained(model.moedeploy.path)


def prompts_of(tokenizer, n: int) -> list[list[int]]:
    """n prompts of different lengths (3 to about 60 tokens) from the demo model's held-out text."""
    from moedeploy.api import DEMO_MODEL

    text = sorted((DEMO_MODEL.parent / "heldout").glob("*.txt"))[0].read_text(encoding="utf-8")
    return [tokenizer(text[i * 701: i * 701 + 12 + 23 * i]).input_ids for i in range(n)]


def generate(model, prompt: list[int], new: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return out[0, len(prompt):].tolist()


# -- the scheduler ------------------------------------------------------------------------------------

def _request(prompt_len: int) -> Request:
    return Request(list(range(prompt_len)), GREEDY, lambda u: None)


def test_scheduler_chunks_prefills_and_puts_decodes_first():
    s = Scheduler(max_batch_tokens=8, max_running=3)
    a, b, c, d = (_request(n) for n in (5, 6, 2, 2))
    for r in (a, b, c, d):
        s.add(r)
    step = s.schedule()
    assert [(x.request, x.start, x.length, x.samples) for x in step] == [(a, 0, 5, True), (b, 0, 3, False)]
    for x in step:
        x.request.computed = x.start + x.length
    a.output.append(7)  # a sampled its first token: now it decodes
    step = s.schedule()
    assert [(x.request, x.start, x.length) for x in step] == [(a, 5, 1), (b, 3, 3), (c, 0, 2)]
    assert list(s.waiting) == [d], "max_running bounds the batch"
    s.remove(a)
    assert s.running == [b, c] and len(s) == 3


# -- exactness -------------------------------------------------------------------------------------

def test_batched_chunked_steps_equal_generate_and_each_request_alone(demo):
    model, tokenizer = demo
    prompts = prompts_of(tokenizer, 6)
    engine = Engine(model, tokenizer, EngineConfig(max_batch_tokens=16, max_running=6))  # prompts split over steps
    together = engine.generate(prompts, GREEDY)
    assert max(s.prefill_tokens + s.decode_tokens for s in engine.steps) == 16
    assert any(s.prefill_tokens and s.decode_tokens for s in engine.steps), "prefill chunks mixed with decodes"
    for prompt, out in zip(prompts, together):
        assert out.finish_reason == "length" and len(out.tokens) == 12
        assert out.tokens == engine.generate([prompt], GREEDY)[0].tokens
        assert out.tokens == generate(model, prompt, 12)
        assert out.text == tokenizer.decode(out.tokens, skip_special_tokens=True)
    assert engine.runner.kv.columns == 0 and not engine.requests, "every request's KV is freed at its end"


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "qwen2_moe"])  # plain, MLA + shared, gated shared
def test_families_batched_equal_generate(tiny, family):
    path = tiny(family)
    model = moedeploy.load(path, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [tokenizer(t).input_ids for t in ("Only the hot experts", "Dynamic gating sorts tokens by expert, so",
                                                  "Mixture")]
    engine = Engine(model, tokenizer, EngineConfig(max_batch_tokens=8, max_running=4))
    for prompt, out in zip(prompts, engine.generate(prompts, GREEDY)):
        assert out.tokens == generate(model, prompt, 12)


def test_under_an_expert_budget_outputs_are_the_resident_ones(demo):
    model, tokenizer = demo
    prompts = prompts_of(tokenizer, 5)
    want = [o.tokens for o in Engine(model, tokenizer).generate(prompts, GREEDY)]
    budgeted = moedeploy.load(None, dtype="float32", expert_memory=0.25, policy="lifo")
    engine = Engine(budgeted, tokenizer)
    with pytest.warns(UserWarning, match="stream through the slots"):  # a batched step needs more than 8 of 32
        assert [o.tokens for o in engine.generate(prompts, GREEDY)] == want
    assert sum(s.misses for s in engine.steps) > 0 and sum(s.hits for s in engine.steps) > 0
    assert all(len(s.active_experts) == 4 and 1 <= min(s.active_experts) for s in engine.steps)
    assert max(max(s.active_experts) for s in engine.steps) > 4, "a batched step activates more than one token's top-4"


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_experts_under_a_budget_with_sida_serve_what_they_serve_resident(demo, dtype):
    """Quantization, a budget on either store and SiDA's prefetch (exact routing) together: the engine's batched
    steps give the tokens of the same quantized model fully resident."""
    _, tokenizer = demo
    prompts = prompts_of(tokenizer, 4)
    resident = moedeploy.load(None, dtype="bfloat16", expert_dtype=dtype)
    want = [o.tokens for o in Engine(resident, tokenizer).generate(prompts, GREEDY)]
    for store in ("disk", "host"):
        budgeted = moedeploy.load(None, dtype="bfloat16", expert_dtype=dtype, expert_memory=0.2, prefetch="sida",
                                  expert_store=store)
        engine = Engine(budgeted, tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a batched step streams through the slots (the test above)
            assert [o.tokens for o in engine.generate(prompts, GREEDY)] == want, store
        stats = budgeted.moedeploy.cache_stats()
        assert stats["misses"] > 0 and stats["prefetched"] > 0, (store, stats)


# -- sampling --------------------------------------------------------------------------------------

def test_seeded_sampling_is_per_request_and_leaves_the_global_rng_alone(demo):
    model, tokenizer = demo
    prompts = prompts_of(tokenizer, 4)
    engine = Engine(model, tokenizer)
    seeded = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, top_k=50, seed=s, ignore_eos=True)
              for s in (1, 2, 3, 4)]
    rng = torch.random.get_rng_state()
    together = engine.generate(prompts, seeded)
    assert torch.equal(rng, torch.random.get_rng_state()), "sampling touched the global RNG"
    alone = [engine.generate([p], s)[0] for p, s in zip(prompts, seeded)]
    assert [o.tokens for o in together] == [o.tokens for o in alone]
    other_seed = engine.generate([prompts[0]], SamplingParams(max_tokens=10, temperature=0.9, seed=99, ignore_eos=True))
    assert other_seed[0].tokens != together[0].tokens


def test_sampling_params_are_checked():
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(stop=("",))):
        with pytest.raises(OptionError, match=next(iter(bad))):
            SamplingParams(**bad)


# -- ending requests -------------------------------------------------------------------------------

def test_stop_strings_end_the_text_before_them(demo):
    model, tokenizer = demo
    prompt = prompts_of(tokenizer, 1)[0]
    free = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    stop = free.text[5:8]
    out = Engine(model, tokenizer).generate([prompt], SamplingParams(max_tokens=24, temperature=0, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == free.text[:free.text.index(stop)]


def test_detokenizer_holds_back_a_possible_stop_and_incomplete_characters(demo):
    _, tokenizer = demo
    ids = tokenizer("Wherefore art thou, Romeo?").input_ids
    d = Detokenizer(tokenizer, stop=("thou,",))
    released = ""
    for i in ids:
        text, stopped = d.push(i)
        released += text
        assert not released.endswith(("t", "th", "tho", "thou")) or stopped
        if stopped:
            break
    assert stopped and released == "Wherefore art "
    emoji = tokenizer.encode("🙂", add_special_tokens=False)
    d = Detokenizer(tokenizer)
    assert "".join(d.push(i)[0] for i in emoji) + d.flush() == "🙂"


def test_eos_ends_a_request_unless_ignored(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer)
    eos = next(iter(engine.eos))
    request = engine.submit(prompts_of(tokenizer, 1)[0], SamplingParams(max_tokens=5, temperature=0), lambda u: None)
    engine._take_inbox()
    engine._emit(request, eos)
    assert request.finish_reason == "stop"


def test_abort_and_timeout_end_requests_and_free_their_kv(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer)
    updates = {"abort": [], "timeout": [], "ok": []}
    prompts = prompts_of(tokenizer, 3)
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    aborted = engine.submit(prompts[0], long, updates["abort"].append)
    engine.submit(prompts[1], long, updates["timeout"].append, timeout=0.0)
    engine.submit(prompts[2], SamplingParams(max_tokens=3, temperature=0), updates["ok"].append)
    engine.step()
    assert engine.runner.kv.held_by(aborted.id) > 0
    engine.abort(aborted.id)
    engine.step()
    assert updates["abort"][-1].finish_reason == "abort" and engine.runner.kv.held_by(aborted.id) == 0
    assert updates["timeout"][-1].finish_reason == "timeout" and "time limit" in updates["timeout"][-1].error
    while engine.step() is not None:
        pass
    assert updates["ok"][-1].finish_reason in ("length", "stop")
    assert engine.runner.kv.columns == 0 and not engine.requests and len(engine.scheduler) == 0


def test_limits_refuse_at_once(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, EngineConfig(max_queue=2, max_model_len=64))
    with pytest.raises(ContextTooLong, match="context of 64"):
        engine.submit(list(range(60)), SamplingParams(max_tokens=5), print)
    with pytest.raises(OptionError, match="token ids"):
        engine.submit([10**6], SamplingParams(), print)
    with pytest.raises(OptionError, match="empty"):
        engine.submit([], SamplingParams(), print)
    engine.submit([1, 2], SamplingParams(), print)
    engine.submit([1, 2], SamplingParams(), print)
    with pytest.raises(QueueFull, match="2 requests are already waiting"):
        engine.submit([1, 2], SamplingParams(), print)
    with pytest.raises(OptionError, match="max_running"):
        EngineConfig(max_batch_tokens=4, max_running=8)


def test_the_engine_thread_serves_and_shuts_down(demo):
    import threading

    model, tokenizer = demo
    engine = Engine(model, tokenizer)
    engine.start()
    done = threading.Event()
    got = []
    engine.submit(prompts_of(tokenizer, 1)[0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                  lambda u: (got.append(u), u.finish_reason and done.set()))
    assert done.wait(30) and got[-1].finish_reason == "length"
    pending = []
    engine.submit([5, 6, 7], SamplingParams(max_tokens=900, temperature=0, ignore_eos=True), pending.append)
    engine.shutdown(grace=0.2)
    assert not engine.alive and pending[-1].finish_reason == "abort" and "shut down" in pending[-1].error
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit([1], SamplingParams(), print)


# -- what the engine relies on in transformers -----------------------------------------------------

def test_transformers_surfaces_the_engine_uses(demo, monkeypatch):
    """Named here so that a transformers release that moves them fails this test, not silently the engine: the
    cache keyword of the model's forward; a `Cache` subclass whose `update(keys, values, layer_idx, ...)` result
    reaches the attention function; extra keywords of the model's forward (`packed_kv`) reaching the attention
    function; a 4-D mask passed through as is; `logits_to_keep` as a tensor of positions; and the attention
    implementation's name in `config._attn_implementation` (private), written by `set_attn_implementation`."""
    from moedeploy.engine import attention

    model, tokenizer = demo
    assert cache_keyword(model) in inspect.signature(model.forward).parameters
    engine = Engine(model, tokenizer)
    assert model.config._attn_implementation == attention.PREFIX + "sdpa"
    calls = []
    real = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *a, **k: (calls.append(k["packed_kv"]), real(*a, **k))[1])
    prompt = prompts_of(tokenizer, 1)[0]
    engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0))
    assert len(calls) == 2 * len(model.model.layers) and all(kv is engine.runner.kv for kv in calls)
    with torch.inference_mode():
        full = model(torch.tensor([prompt])).logits[0, [-1, -3]]
        kept = model(torch.tensor([prompt]), logits_to_keep=torch.tensor([len(prompt) - 1, len(prompt) - 3])).logits[0]
    torch.testing.assert_close(kept, full)
    assert len(calls) == 2 * len(model.model.layers), "outside the engine the model's own attention runs"


def test_encoder_decoder_and_sliding_window_models_are_refused(tiny):
    for family, reason in (("switch_transformers", "encoder-decoder"), ("gpt_oss", "sliding-window")):
        model = moedeploy.load(tiny(family), dtype="float32")
        with pytest.raises(UnsupportedModelError, match=reason):
            Engine(model, AutoTokenizer.from_pretrained(tiny(family)))


def test_kv_regions_grow_move_and_are_reused(demo):
    """Requests that outgrow their first region move (keys copied in every layer) and still answer as alone;
    freed regions are reused; an idle engine holds no arena."""
    model, tokenizer = demo
    engine = Engine(model, tokenizer, EngineConfig(max_batch_tokens=32))
    prompts = prompts_of(tokenizer, 3)
    long = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)  # past MIN_REGION and its doubling
    alone = [engine.generate([p], long)[0].tokens for p in prompts]
    kv = engine.runner.kv
    sizes = []
    updates = [[] for _ in prompts]
    for p, u in zip(prompts, updates):
        engine.submit(p, long, u.append)
    while engine.step() is not None:
        sizes.append(sorted(r.size for r in kv.regions.values()))
        bases = sorted((r.base, r.base + r.size) for r in kv.regions.values())
        assert all(a[1] <= b[0] for a, b in zip(bases, bases[1:])), "regions overlap"
        assert all(b + s <= kv.columns_allocated for b, s in kv.holes) and all(r.length <= r.size for r in kv.regions.values())
    assert [[t for x in u for t in x.tokens] for u in updates] == alone
    assert any(max(s) > 64 for s in sizes if s), "some request moved to a bigger region"
    assert kv.columns == 0 and kv.columns_allocated == 0 and not kv.keys, "idle: the arenas are dropped"


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on(demo, monkeypatch):
    model, tokenizer = demo
    engine = Engine(model, tokenizer)
    prompt = prompts_of(tokenizer, 1)[0]
    got = []
    engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0), got.append)
    real = engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda chunks: (_ for _ in ()).throw(RuntimeError("out of memory")))
    assert engine.step() is None
    assert got[-1].finish_reason == "error" and "RuntimeError" in got[-1].error and engine.runner.kv.columns == 0
    monkeypatch.setattr(engine.runner, "forward", real)

    def rude(update):
        raise RuntimeError("event loop is closed")

    engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0), rude)  # a callback that raises
    assert engine.generate([prompt], GREEDY)[0].finish_reason == "length"
