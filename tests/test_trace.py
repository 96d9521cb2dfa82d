"""Routing traces: recording matches the routers, Parquet round-trips, importers, and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers as T
from transformers import AutoTokenizer

import moedeploy
from moedeploy.errors import TraceError
from moedeploy.trace import load_trace, open_trace, read_trace, record, write_trace
from moedeploy.trace.schema import PHASES, Trace, TraceMeta

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces"
ESFT = DATA / "esft-deepseek-v2-lite"
OLMOE = DATA / "olmoe-routing-counts"
needs_esft = pytest.mark.skipif(not ESFT.is_dir(), reason=f"real ESFT traces not found at {ESFT} (../shared/data)")
needs_olmoe = pytest.mark.skipif(not OLMOE.is_dir(), reason=f"OLMoE routing counts not found at {OLMOE}")


def _router_taps(model):
    """Independent record of every router call: layer index -> list of Routing, via forward hooks."""
    calls = {i: [] for i in range(len(model.moedeploy.layers))}
    handles = [layer.router.register_forward_hook(lambda m, a, out, i=i: calls[i].append(out))
               for i, layer in enumerate(model.moedeploy.layers.values())]
    return calls, handles


@pytest.fixture(scope="module")
def generated(tiny):
    """A batch of two left-padded prompts generated greedily while recording, plus the routers' own outputs."""
    path = tiny("qwen3_moe")
    model = moedeploy.load(path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    enc = tok(["Dynamic gating sorts tokens by expert", "experts"], return_tensors="pt", padding=True)
    calls, handles = _router_taps(model)
    new = 5
    with torch.inference_mode(), record(model, domain="prompts") as rec:
        out = model.generate(**enc, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    for h in handles:
        h.remove()
    return dict(model=model, enc=enc, out=out, calls=calls, trace=rec.trace(), new=new)


def test_recorded_routing_is_the_routing_that_happened(generated):
    trace, calls, enc, new = generated["trace"], generated["calls"], generated["enc"], generated["new"]
    L = len(calls)
    assert all(len(c) == new for c in calls.values())  # one prefill + new-1 decode steps
    keep = [enc["attention_mask"].reshape(-1).bool()] + [torch.ones(2, dtype=torch.bool)] * (new - 1)
    expected_ids = np.stack([torch.cat([c.ids[k] for c, k in zip(calls[l], keep)]).numpy() for l in range(L)], 1)
    expected_w = np.stack([torch.cat([c.weights[k] for c, k in zip(calls[l], keep)]).float().numpy()
                           for l in range(L)], 1)
    assert trace.experts.shape == expected_ids.shape == (int(enc["attention_mask"].sum()) + 2 * (new - 1), L, 3)
    np.testing.assert_array_equal(trace.experts, expected_ids)
    np.testing.assert_array_equal(trace.weights, expected_w)


def test_recorded_tokens_positions_phases(generated):
    trace, out, enc, new = generated["trace"], generated["out"], generated["enc"], generated["new"]
    mask = enc["attention_mask"]
    assert trace.step.tolist() == sorted(trace.step.tolist()) and trace.step.max() == new - 1
    assert set(trace.phase[trace.step == 0]) == {PHASES.index("prefill")}
    assert set(trace.phase[trace.step > 0]) == {PHASES.index("decode")}
    assert trace.domains == ("prompts",) and trace.meta.num_experts == 8 and trace.meta.top_k == 3
    for r in range(2):
        rows = trace.request == r
        order = np.argsort(trace.position[rows])
        seq = out[r][mask.shape[1] - int(mask[r].sum()):].numpy()  # drop left padding
        assert trace.position[rows][order].tolist() == list(range(len(seq) - 1))  # the last token is never run
        assert trace.token[rows][order].tolist() == seq[:-1].tolist()


def test_recorder_detaches_and_costs_one_if(generated):
    model = generated["model"]
    assert all(layer.recorder is None for layer in model.moedeploy.layers.values())
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_every_plain_forward_opens_new_requests(tiny):
    model = moedeploy.load(tiny("mixtral"))
    ids = torch.randint(3, 300, (3, 7))
    with torch.inference_mode(), record(model) as rec:
        model(input_ids=ids)
        model(input_ids=ids[:2, :4])
    trace = rec.trace()
    assert trace.num_tokens == 3 * 7 + 2 * 4
    assert trace.request.tolist() == np.repeat([0, 1, 2, 3, 4], [7, 7, 7, 4, 4]).tolist()
    assert trace.position[:7].tolist() == list(range(7)) and (trace.token[:21] == ids.reshape(-1).numpy()).all()



def _cache_keyword(model) -> str:
    """The name this transformers version gives the KV cache in a causal LM's forward
    (`past_key_values` up to 5.23, `cache` from 5.24)."""
    import inspect

    names = [n for n in ("cache", "past_key_values") if n in inspect.signature(model.forward).parameters]
    assert names, f"transformers {T.__version__}: the causal LM forward takes no cache keyword any more"
    return names[0]


def test_generate_hands_forward_a_cache_object(tiny):
    """The public contract the recorder leans on (trace/record.py `past_length`): on every decode step of
    `generate`, the model's forward receives a `transformers.Cache` (under whatever keyword) holding the
    tokens before the step. A transformers version that stops doing so fails here, by name."""
    model = moedeploy.load(tiny("qwen3_moe"))
    seen = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append([c.get_seq_length() for c in (*args, *kwargs.values())
                                             if isinstance(c, T.Cache)]), with_kwargs=True)
    with torch.inference_mode():
        model.generate(torch.randint(3, 300, (1, 6)), max_new_tokens=4, do_sample=False)
    hook.remove()
    assert seen == [[0], [6], [7], [8]], f"transformers {T.__version__} passes caches as {seen}"


@pytest.mark.parametrize("with_mask", [True, False])
def test_manual_decode_loop_is_recorded_as_decode(tiny, with_mask):
    """A hand-written prefill + decode loop, the cache passed under this version's keyword, with and without
    an attention mask: phases and positions come from what the call carries, not from a keyword's name."""
    model = moedeploy.load(tiny("qwen3_moe"))
    ids = torch.randint(3, 300, (2, 5))
    key = _cache_keyword(model)
    with torch.inference_mode(), record(model) as rec:
        out = model(input_ids=ids, use_cache=True, **({"attention_mask": torch.ones_like(ids)} if with_mask else {}))
        cache = next(v for v in out.values() if isinstance(v, T.Cache))
        for step in range(3):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = {"attention_mask": torch.ones(2, 6 + step, dtype=torch.long)} if with_mask else {}
            out = model(input_ids=nxt, use_cache=True, **{key: cache}, **mask)
    trace = rec.trace()
    assert trace.phase.tolist() == [PHASES.index("prefill")] * 10 + [PHASES.index("decode")] * 6
    assert trace.request.tolist() == [0] * 5 + [1] * 5 + [0, 1] * 3
    assert trace.position.tolist() == list(range(5)) * 2 + [5, 5, 6, 6, 7, 7]


def test_decode_on_a_cache_filled_outside_the_recording_is_refused(tiny):
    model = moedeploy.load(tiny("qwen3_moe"))
    ids = torch.randint(3, 300, (1, 5))
    with torch.inference_mode():
        cache = next(v for v in model(input_ids=ids, use_cache=True).values() if isinstance(v, T.Cache))
        with record(model):
            model(input_ids=ids[:, :2])  # a prefill of 2 tokens, then a decode that continues 5
            with pytest.raises(TraceError, match="continues 5 earlier tokens per row, but the recorder saw 2"):
                model(input_ids=ids[:, :1], use_cache=True, **{_cache_keyword(model): cache})

def test_nothing_recorded_is_an_error(tiny):
    model = moedeploy.load(tiny("mixtral"))
    with record(model) as rec:
        pass
    with pytest.raises(TraceError, match="nothing was recorded"):
        rec.trace()


def test_encoder_decoder_is_refused(tiny):
    model = moedeploy.load(tiny("switch_transformers"))
    with pytest.raises(TraceError, match="decoder-only"):
        with record(model):
            pass


def test_parquet_round_trip_is_exact(generated, tmp_path):
    trace = generated["trace"]
    path = write_trace(trace, tmp_path / "t.parquet")
    back = read_trace(path)
    assert back.meta == trace.meta and back.domains == trace.domains
    for name in ("experts", "weights", "request", "position", "phase", "step", "token", "domain"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name), err_msg=name)
    # Readable without moedeploy: plain pyarrow sees one row per (token, layer) with the documented columns.
    table = pq.read_table(path)
    assert table.column_names == ["request", "position", "phase", "step", "token", "domain", "layer", "experts",
                                  "weights"]
    assert table.num_rows == trace.num_tokens * trace.meta.num_layers
    assert table.column("experts").type == pa.list_(pa.int16(), 3)


def test_row_order_does_not_matter(generated, tmp_path):
    trace = generated["trace"]
    table = pq.read_table(write_trace(trace, tmp_path / "t.parquet"))
    shuffled = table.take(np.random.default_rng(0).permutation(table.num_rows))
    pq.write_table(shuffled, tmp_path / "s.parquet")
    back = read_trace(tmp_path / "s.parquet")
    np.testing.assert_array_equal(back.experts, trace.experts)


def _small_trace(N=5, L=2, K=2, E=4) -> Trace:
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(N)])
    return Trace(meta=TraceMeta(num_experts=E, top_k=K, layer_names=("a", "b")[:L]), experts=experts.astype(np.int16),
                 weights=rng.random((N, L, K), dtype=np.float32), request=np.zeros(N, np.int32),
                 position=np.arange(N, dtype=np.int32), phase=np.zeros(N, np.int8), step=np.zeros(N, np.int32),
                 token=np.full(N, -1, np.int32), domain=np.zeros(N, np.int16))


@pytest.mark.parametrize("problem, damage, message", [
    ("missing", lambda p: p.unlink(), "does not exist"),
    ("empty", lambda p: p.write_bytes(b""), "is empty"),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated"),
    ("footer corrupt", lambda p: p.write_bytes(p.read_bytes()[:-12] + b"\0" * 8 + b"PAR1"), "truncated or corrupt"),
    ("not parquet", lambda p: p.write_text("request,position\n1,2\n"), "not a Parquet file"),
])
def test_bad_files_get_clear_errors(tmp_path, problem, damage, message):
    path = write_trace(_small_trace(), tmp_path / "t.parquet")
    damage(path)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.drop_columns(["experts"]), "no column 'experts'"),
    (lambda t: t.set_column(t.column_names.index("layer"), "layer", pa.array(["x"] * t.num_rows)),
     "column 'layer' is string"),
    (lambda t: t.set_column(t.column_names.index("weights"), "weights",
                            pa.array([["a", "b"]] * t.num_rows)), "expected a list of floats"),
    (lambda t: t.slice(0, t.num_rows - 1), "lack some of the 2 MoE layers"),
    (lambda t: t.slice(0, 0), "has no rows"),
])
def test_wrong_schema_gets_clear_errors(tmp_path, change, message):
    table = pq.read_table(write_trace(_small_trace(), tmp_path / "t.parquet"))
    pq.write_table(change(table), tmp_path / "bad.parquet")
    with pytest.raises(TraceError, match=message):
        read_trace(tmp_path / "bad.parquet")


def test_trace_without_moedeploy_metadata_is_inferred(tmp_path):
    trace = _small_trace()
    table = pq.read_table(write_trace(trace, tmp_path / "t.parquet")).replace_schema_metadata(None)
    pq.write_table(table.drop_columns(["step", "token", "phase", "domain"]), tmp_path / "plain.parquet")
    back = read_trace(tmp_path / "plain.parquet")
    np.testing.assert_array_equal(back.experts, trace.experts)
    assert back.meta.num_layers == 2 and back.meta.top_k == 2 and (back.token == -1).all()


def test_unknown_directory_is_refused(tmp_path):
    with pytest.raises(TraceError, match="holds no trace moedeploy knows"):
        open_trace(tmp_path)


@needs_esft
def test_esft_importer_reads_all_four_domains():
    trace = open_trace(ESFT)
    assert trace.experts.shape == (33_279, 26, 6)
    assert trace.domains == ("intent", "law", "summary", "translation")
    counts = np.bincount(trace.domain, minlength=4)
    assert counts.tolist() == [8222, 8327, 8479, 8251]
    assert trace.request.max() + 1 == 127 + 33 + 13 + 40
    assert trace.experts.min() >= 0 and trace.experts.max() < 64
    # ids within a token are distinct; weights are the softmax gate values (not renormalised: sum < 1)
    s = np.sort(trace.experts, -1)
    assert (s[..., 1:] != s[..., :-1]).all()
    assert 0 < trace.weights.sum(-1).max() <= 1.001
    # the first token of intent's first sequence, as in the file
    assert trace.experts[0, 0].tolist() == [8, 26, 56, 57, 60, 11]


@needs_esft
def test_esft_one_domain_and_layer_file_errors(tmp_path):
    law = open_trace(ESFT / "law")
    assert law.experts.shape == (8327, 26, 6) and law.domains == ("law",)
    with pytest.raises(TraceError, match="pass its domain directory"):
        open_trace(ESFT / "law" / "expert_weights_1.txt")
    bad = tmp_path / "dom"
    bad.mkdir()
    (bad / "expert_weights_1.txt").write_text("1\t2\t3\t\t0.1\t0.2\n")
    with pytest.raises(TraceError, match="equal multiples of 6"):
        open_trace(bad)
    (bad / "expert_weights_1.txt").write_text("")
    with pytest.raises(TraceError, match="is empty"):
        open_trace(bad)
