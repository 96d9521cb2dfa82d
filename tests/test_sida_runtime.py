"""SiDA at run time (predict/ahead.py): the predictor thread prefetches a step's experts and never changes
an exact result; `resident` and `predicted` routing choose among what they may, never wait for a demand
copy, and report how far they departed from the router."""

from __future__ import annotations

import itertools
import json
import warnings

import pytest
import torch

import moedeploy
from moedeploy import OptionError
from moedeploy.predict.base import PredictorError
from moedeploy.predict.sida import DEMO_PREDICTOR
from moedeploy.routing import Router, SoftmaxTopK

PROMPT = torch.tensor([[11, 402, 93, 1180, 7, 55, 2048, 301, 19, 640, 8, 77]])


def run(model, ids=PROMPT, new=10):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the streaming notice (a prompt needs more experts than the slots)
        logits = model(input_ids=ids).logits
        tokens = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return logits, tokens


@pytest.fixture(scope="module")
def reference():
    return run(moedeploy.load())


@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("policy", ["lru", "lifo"])
def test_exact_routing_with_sida_prefetch_is_bit_identical(reference, policy, scope, store):
    for budget in (0.1, 0.25):
        model = moedeploy.load(expert_memory=budget, policy=policy, cache_scope=scope, expert_store=store,
                               prefetch="sida")
        logits, tokens = run(model)
        assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1]), (budget, policy, scope, store)
        stats, cache = model.moedeploy.stats(), model.moedeploy.cache_stats()
        assert stats["routing"] == "exact" and "departed_pairs" not in stats
        assert stats["predictor_steps"] == 11  # the logits forward, the prompt, 9 decode steps
        assert cache["prefetched"] > 0 and cache["prefetch_hits"] > 0


def test_a_wrong_predictor_changes_nothing_but_the_hits(reference):
    model = moedeploy.load(expert_memory=0.25, prefetch="sida")
    torch.nn.init.normal_(model.moedeploy.ahead.predictor.net.head.weight, std=3.0)  # confidently wrong
    logits, tokens = run(model)
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert model.moedeploy.cache_stats()["prefetched"] > 0


def test_sida_prefetch_saves_demand_misses_on_the_demo_model():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(moedeploy.api.DEMO_MODEL)
    ids = tokenizer("ROMEO. But soft, what light through yonder window breaks?", return_tensors="pt").input_ids
    misses = {}
    for prefetch in (None, "sida"):
        model = moedeploy.load(expert_memory=0.2, prefetch=prefetch)
        run(model, ids, new=30)
        misses[prefetch] = model.moedeploy.cache_stats()["misses"]
    assert misses["sida"] < misses[None] * 0.8, misses  # the thread's timing moves it; measured ~0.4x in bench


def test_the_predictor_state_follows_the_kv_cache():
    """Decode continues the predictor's state, a new generate starts it afresh: each step's prediction
    equals the predictor run over the whole sequence so far (transformers passes the KV cache as `cache`,
    before 5.24 `past_key_values`: predict/ahead.kv_cache reads either, and this fails if neither arrives)."""
    model = moedeploy.load(routing="predicted")
    predictor = model.moedeploy.ahead.predictor
    seen = []
    forward = predictor.forward

    def spy(ids, state=None):
        scores, state = forward(ids, state)
        seen.append(scores[0])  # [S, L, E]
        return scores, state

    predictor.forward = spy
    for _ in range(2):  # the second generate must not continue the first one's state
        seen.clear()
        _, tokens = run(model, new=5)
    want, _ = forward(tokens[:, :-1])  # [1, S, L, E]: the whole sequence at once
    got = torch.cat(seen[1:])  # the prompt, then one row per decode step
    torch.testing.assert_close(got, want[0], atol=1e-4, rtol=1e-4)


def test_resident_routing_never_misses_and_reports_its_departures(reference):
    model = moedeploy.load(expert_memory=0.2, prefetch="sida", routing="resident")
    run(model)
    cache, stats = model.moedeploy.cache_stats(), model.moedeploy.stats()
    assert cache["misses"] == 0 and cache["hits"] > 0
    assert stats["routing"] == "resident" and 0 < stats["departed_fraction"] < 1
    assert 0 < stats["departed_weight_per_token"] < 1
    unbudgeted = moedeploy.load(routing="resident")  # every expert resident: the router's own choice
    logits, tokens = run(unbudgeted)
    assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    assert unbudgeted.moedeploy.stats()["departed_pairs"] == 0


def test_predicted_routing_uses_the_predictors_experts_only():
    model = moedeploy.load(routing="predicted")
    ahead, chosen = model.moedeploy.ahead, []
    for layer in model.moedeploy.layers.values():
        layer.recorder = lambda routing, layer=layer: chosen.append((layer, routing.ids))
    run(model, new=3)
    assert chosen
    # the last step's routing (one token per layer) against that step's prediction
    last = chosen[-len(model.moedeploy.layers):]
    for i, (layer, ids) in enumerate(last):
        predicted = set(ahead.step.top[0, i].tolist())
        assert set(ids[0].tolist()) <= predicted
    stats = model.moedeploy.stats()
    assert stats["routing"] == "predicted" and stats["departed_fraction"] > 0


def test_restrict_keeps_the_rules_weights_over_what_is_allowed():
    torch.manual_seed(0)
    router = Router(SoftmaxTopK(top_k=2, renormalize=True), torch.randn(6, 8))
    x = torch.randn(5, 8)
    exact, same = router.restrict(x, torch.ones(6, dtype=torch.bool))
    assert torch.equal(exact.ids, same.ids) and torch.equal(exact.weights, same.weights)
    allowed = torch.tensor([True, False, True, False, True, False])
    _, chosen = router.restrict(x, allowed)
    probs = torch.softmax(router.logits(x), -1)[:, allowed]  # [T, 3]
    top = probs.topk(2, -1)
    assert torch.equal(chosen.ids, torch.tensor([0, 2, 4])[top.indices])
    torch.testing.assert_close(chosen.weights, top.values / top.values.sum(-1, keepdim=True))
    _, few = router.restrict(x, torch.tensor([False, False, False, True, False, False]))  # fewer than K allowed
    assert (few.ids[:, 0] == 3).all() and (few.ids[:, 1] == 6).all() and (few.weights[:, 1] == 0).all()


@pytest.mark.parametrize("options, message", [
    (dict(routing="guessed"), "unknown routing 'guessed'"),
    (dict(predictor=str(DEMO_PREDICTOR)), "predictor applies to prefetch='sida' or routing='predicted'"),
    (dict(routing="resident", gating="static"), "runs with dynamic gating"),
    (dict(routing="resident", expert_memory=0.5), "needs prefetch='sida'"),  # nothing would fill the slots
    (dict(routing="resident", expert_memory=0.5, prefetch="lookahead"), "needs prefetch='sida'"),
])
def test_bad_routing_options_are_refused(options, message):
    with pytest.raises(OptionError, match=message):
        moedeploy.load(**options)


def test_a_model_without_a_predictor_is_told_how_to_train_one(tiny):
    with pytest.raises(PredictorError, match="moedeploy predict train"):
        moedeploy.load(tiny("qwen3_moe"), expert_memory=0.5, prefetch="sida")
    with pytest.raises(PredictorError, match="trained for a model with"):
        moedeploy.load(tiny("qwen3_moe"), routing="predicted", predictor=str(DEMO_PREDICTOR))


def test_capacity_routers_refuse_departing_routing(tiny):
    with pytest.raises(OptionError, match="SwitchTop1"):
        moedeploy.load(tiny("switch_transformers"), routing="resident")


def test_eval_ppl_reports_departures(tmp_path, capsys):
    from moedeploy.cli import main

    text = tmp_path / "t.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks? It is the east. " * 3)
    assert main(["eval-ppl", "--text", str(text), "--decode", "--expert-memory", "0.2", "--prefetch", "sida",
                 "--routing", "resident", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routing"]["routing"] == "resident" and out["routing"]["departed_pairs"] > 0
    assert out["cache"]["misses"] == 0 and out["perplexity"] > 1


def test_the_engine_predicts_per_request_and_stays_exact():
    """Packed steps (many requests' chunks in one row) continue each request's own predictor state, decode
    chunks of several requests in one batched step, and a queued prompt is predicted while other requests run:
    every request's predictions equal the predictor run over its whole sequence, and with exact routing the
    engine's outputs are the resident model's."""
    from transformers import AutoTokenizer

    from moedeploy.engine import Engine, EngineConfig, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(moedeploy.api.DEMO_MODEL)
    prompts = [tokenizer(t).input_ids for t in ("ROMEO. But soft,", "The king is dead, and the queen",
                                                 "Now is the winter of our discontent")]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.tokens for o in Engine(moedeploy.load(), tokenizer).generate(prompts, greedy)]
    model = moedeploy.load(expert_memory=0.25, prefetch="sida")
    ahead, parts, batches = model.moedeploy.ahead, [], []
    assert not ahead.queued  # on by default on CUDA only; here it is tested for what it computes
    ahead.queued = True
    score, step = ahead._scores, ahead.predictor.net.step

    def spy_scores(p, early):
        rows = score(p, early)  # [T, L, E] in the parts' row order
        parts.append([(k, ids.shape[1], fresh, rows[first : first + ids.shape[1]])
                      for (k, ids, fresh), first in zip(p, itertools.accumulate((ids.shape[1] for _, ids, _ in p),
                                                                                initial=0))])
        return rows

    ahead._scores = spy_scores
    ahead.predictor.net.step = lambda emb, *state: (batches.append(emb.shape[0]), step(emb, *state))[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [o.tokens for o in Engine(model, tokenizer, EngineConfig(max_batch_tokens=8, max_running=2)).generate(
            prompts, greedy)]  # the third request waits: its prompt is predicted while the first two run
    assert got == want
    seen, rows = {}, {}  # request -> tokens predicted so far, and their scores: fresh exactly at the first chunk
    for chunks in parts:
        for key, n, fresh, scores in chunks:
            assert fresh == (key not in seen)
            seen[key] = seen.get(key, 0) + n
            rows.setdefault(key, []).append(scores)
    assert sorted(seen.values()) == sorted(len(p) + 7 for p in prompts)  # the prompt, then 7 decode steps
    assert len(ahead.states) <= 2 and max(batches) >= 2  # two requests decoded as one batch
    assert ahead.stats.prepared >= 1 and not ahead.prepared  # the waiting ones, used and let go
    for key, sequence in zip(sorted(rows), [p + t[:-1] for p, t in zip(prompts, want, strict=True)], strict=True):
        whole, _ = ahead.predictor.forward(torch.tensor([sequence]))  # [1, S, L, E]
        torch.testing.assert_close(torch.cat(rows[key]), whole[0], atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_predicts_queued_prompts_and_stays_exact():
    """On CUDA the engine's queued prompts are predicted ahead by default, on the predictor's stream, while other
    requests run; the engine still generates the resident engine's tokens."""
    from transformers import AutoTokenizer

    from moedeploy.engine import Engine, EngineConfig, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(moedeploy.api.DEMO_MODEL)
    prompts = [tokenizer(t).input_ids for t in ("ROMEO. But soft,", "The king is dead, and the queen",
                                                 "Now is the winter of our discontent")]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    config = EngineConfig(max_batch_tokens=8, max_running=2)
    want = [o.tokens for o in Engine(moedeploy.load(device="cuda"), tokenizer, config).generate(prompts, greedy)]
    model = moedeploy.load(device="cuda", expert_memory=0.25, prefetch="sida")
    ahead = model.moedeploy.ahead
    assert ahead.queued and ahead.stream is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = [o.tokens for o in Engine(model, tokenizer, config).generate(prompts, greedy)]
    assert got == want
    assert ahead.stats.prepared >= 1 and not ahead.prepared


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cuda_sida_prefetch_is_bit_identical(scope):
    """On CUDA the predictor works on its own stream and prefetches run on the side stream."""
    ids = PROMPT.cuda()
    want = run(moedeploy.load(device="cuda"), ids)
    model = moedeploy.load(device="cuda", expert_memory=0.25, cache_scope=scope, prefetch="sida")
    got = run(model, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert model.moedeploy.cache_stats()["prefetched"] > 0
    predicted = moedeploy.load(device="cuda", expert_memory=0.25, prefetch="sida", routing="predicted")
    run(predicted, ids)
    assert predicted.moedeploy.cache_stats()["misses"] < model.moedeploy.cache_stats()["misses"]


def test_bench_predict_serves_exactly(capsys):
    """`moedeploy bench predict`: its decode and serve parts run, and exact routing keeps the resident tokens."""
    from moedeploy.cli import main

    assert main(["bench", "predict", "--parts", "decode,serve", "--budgets", "0.5", "--new-tokens", "4",
                 "--rounds", "1", "--requests", "2", "--prompt-tokens", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["config"], r["requests"]) for r in report["serve"]] == [("no prefetch", 2), ("sida", 2),
                                                                         ("sida queued", 2)]
    assert all(r["same_tokens_as_resident"] and r["tokens_per_s"] > 0 for r in report["serve"])
    assert {r["config"] for r in report["decode"]} >= {"resident", "no prefetch", "sida"}
    budgeted = [r for r in report["decode"] if r["budget"] is not None]
    assert all(r["bytes_moved_per_token"] > 0 for r in budgeted if r["config"] == "no prefetch")
    assert report["device"] == "cpu" and report["h2d_bytes_per_s"] is None
    assert not any("transfer_bound_ms_per_token" in r for r in budgeted)  # a bound over PCIe: CUDA only


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_bench_predict_on_cuda_without_a_gpu_says_so(capsys):
    from moedeploy.cli import main

    assert main(["bench", "predict", "--parts", "decode", "--device", "cuda", "--json"]) == 2
    assert "--device cuda: torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bench_predict_reports_the_transfer_bound(capsys):
    """On CUDA the decode part measures the pinned host-to-device bandwidth and reports each budget's transfer
    bound (bytes moved per token over it) beside its measured time per token; exact routing stays exact."""
    from moedeploy.cli import main

    assert main(["bench", "predict", "--parts", "decode", "--device", "cuda", "--budgets", "0.25",
                 "--new-tokens", "8", "--rounds", "1", "--prompt-tokens", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["h2d_bytes_per_s"] > 1e9
    rows = {r["config"]: r for r in report["decode"] if r["budget"] is not None}
    assert rows["no prefetch"]["transfer_bound_ms_per_token"] > 0 and rows["no prefetch"]["ms_per_token"] > 0
    assert rows["sida"]["same_tokens_as_resident"]


def test_a_failed_prediction_of_a_queued_prompt_fails_nothing():
    """A queued prompt whose prediction raised is predicted as it comes instead; no request fails, and the next
    steps and the next engine run as usual."""
    from transformers import AutoTokenizer

    from moedeploy.engine import Engine, EngineConfig, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(moedeploy.api.DEMO_MODEL)
    prompts = [tokenizer(t).input_ids for t in ("ROMEO. But soft,", "The king is dead", "Now is the winter")]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [o.tokens for o in Engine(moedeploy.load(), tokenizer).generate(prompts, greedy)]
    model = moedeploy.load(expert_memory=0.25, prefetch="sida")
    ahead = model.moedeploy.ahead
    ahead.queued = True

    def broken(ids):
        raise RuntimeError("out of memory (a test)")

    ahead._prepare = broken
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            out = Engine(model, tokenizer, EngineConfig(max_batch_tokens=8, max_running=1)).generate(prompts, greedy)
            assert [o.finish_reason for o in out] == ["length"] * 3 and [o.tokens for o in out] == want


def test_a_long_queued_prompt_is_predicted_in_windows():
    """A queued prompt longer than the predictor's attention window is predicted window by window, each chunk
    continuing the state (attention memory bounded by the window, not the prompt), with the whole prompt's
    scores and state."""
    ahead = moedeploy.load(expert_memory=0.25, prefetch="sida").moedeploy.ahead
    predictor, W = ahead.predictor, ahead.predictor.net.cfg.window
    ids = torch.randint(3, 2000, (1, 2 * W + 5), generator=torch.Generator().manual_seed(0))
    sizes, forward = [], predictor.forward
    predictor.forward = lambda tokens, state=None: (sizes.append(tokens.shape[1]), forward(tokens, state))[1]
    scores, state = ahead._prepare(ids)
    predictor.forward = forward
    assert sizes == [W, W, 5]
    whole, whole_state = forward(ids)
    torch.testing.assert_close(scores, whole[0], atol=1e-4, rtol=1e-4)
    for got, want in zip((state.h, state.c, state.keys, state.values),
                         (whole_state.h, whole_state.c, whole_state.keys, whole_state.values), strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_under_beam_search_each_rows_prediction_follows_its_own_beam(monkeypatch):
    """Beam search reorders the KV cache's rows between steps (`Cache.reorder_cache`); the predictor's state is
    reordered with them: every decode step's scores equal the predictor run over that row's own sequence."""
    from transformers import DynamicCache

    model = moedeploy.load(routing="predicted")
    predictor = model.moedeploy.ahead.predictor
    forward, calls, reorders = predictor.forward, [], []

    def spy(ids, state=None):
        scores, state = forward(ids, state)
        calls.append((ids.clone(), scores[:, -1].clone()))  # [B, L, E]: the last token of each row
        return scores, state

    reorder = DynamicCache.reorder_cache

    def spy_reorder(cache, beam_idx):
        reorders.append((len(calls), beam_idx.clone()))
        return reorder(cache, beam_idx)

    predictor.forward = spy
    monkeypatch.setattr(DynamicCache, "reorder_cache", spy_reorder)
    with torch.no_grad():
        model.generate(PROMPT[:, :8], max_new_tokens=8, num_beams=3, do_sample=False, early_stopping=False)
    assert any(not torch.equal(b, torch.arange(len(b))) for _, b in reorders), "the beams were reordered"
    rows = calls[0][0]  # [beams, S]: the prompt, once per beam
    for i, (ids, got) in enumerate(calls[1:], start=1):
        for _ in [r for r in reorders if r[0] == i]:
            rows = rows[reorders.pop(0)[1]]  # the reorders made before this step
        rows = torch.cat([rows, ids], 1)
        torch.testing.assert_close(got, forward(rows)[0][:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{"routing": "predicted"}, {"expert_memory": 0.25, "prefetch": "sida"}])
def test_a_failed_prediction_fails_its_own_forward_only(reference, options):
    model = moedeploy.load(**options)
    predictor = model.moedeploy.ahead.predictor
    forward, calls = predictor.forward, []

    def fails_once(ids, state=None):
        calls.append(ids.shape)
        if len(calls) == 1:
            raise RuntimeError("a predictor fault (a test)")
        return forward(ids, state)

    predictor.forward = fails_once
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="a predictor fault"):
            model(input_ids=PROMPT)
        logits = model(input_ids=PROMPT).logits  # raised once, not again by the next forward
    assert len(calls) == 2
    if "prefetch" in options:
        assert torch.equal(logits, reference[0])


def test_a_request_that_ends_before_its_prompts_prediction_ran_fails_no_step():
    """`discard` cancels a queued prompt's prediction that had not started; a step that counted on it predicts
    the chunk as it comes (the engine's call order: prepare, the step, the request ends, the next step)."""
    import threading
    from types import SimpleNamespace

    model = moedeploy.load(expert_memory=0.25, prefetch="sida")
    ahead = model.moedeploy.ahead
    ahead.queued = True
    busy = threading.Event()
    ahead.executor.submit(busy.wait)  # the predictor thread is still on something earlier
    prompt = list(range(100, 120))

    def step(segments, spans, ids):
        packed = SimpleNamespace(segments=segments, spans=spans, regions={s[0]: None for s in segments})
        ahead.hook(model, (), {"input_ids": torch.tensor([ids]), "packed_kv": packed})

    ahead.prepare(1, prompt)
    step([(1, 0, 8), (2, 8, 4)], [(0, 8), (32, 4)], prompt[:8] + [5, 6, 7, 8])  # request 1's first chunk
    ahead.discard(1)  # request 1 ends (an abort) before its prompt's prediction started
    busy.set()
    step([(2, 0, 1)], [(32, 5)], [9])  # the next step: raised CancelledError before
    ahead.future.result()


def test_experts_predicted_for_a_layer_are_not_protected_once_it_has_run():
    """`ahead` marks experts predicted for a later layer of this step (evicted last); when their layer has run,
    the ones it did not use are no longer protected, in this step or the next."""
    model = moedeploy.load(expert_memory=0.25, prefetch="sida")
    run(model, new=6)
    assert all(not layer.pool.ahead for layer in model.moedeploy.layers.values())


def test_a_cache_that_goes_back_is_refused_by_predicted_routing_and_restarts_a_prefetch(reference):
    """Prompt-lookup decoding crops the KV cache when a draft is rejected; the predictor's state cannot go back
    with it. Routing that reads the prediction says so; SiDA's prefetch starts over and stays exact."""
    ids = PROMPT.repeat(1, 2)  # repeated text: drafts from the prompt, some rejected
    want = moedeploy.load().generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prefetching = moedeploy.load(expert_memory=0.25, prefetch="sida")
        got = prefetching.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   prompt_lookup_num_tokens=3)
        assert torch.equal(got, want)
        with pytest.raises(PredictorError, match="cropped by assisted or prompt-lookup decoding"):
            moedeploy.load(routing="predicted").generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                                         prompt_lookup_num_tokens=3)
