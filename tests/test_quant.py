"""Weight-only quantized experts: each packed kernel against its dequantise-then-matmul reference, and whole
models against the same model with its experts dequantized to float (the plain path)."""

from __future__ import annotations

import functools

import pytest
import torch


from moedeploy import load
from moedeploy.errors import OptionError
from moedeploy.kernels import native
from moedeploy.experts import ExpertBank
from moedeploy.quant import QuantSpec
from moedeploy.quant.formats import (block_scales, dequantize_int4, dequantize_int8, mm_int4, mm_int8, pack_int4,
                                     quantize_int4, quantize_int8, unblock_scales)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative to the largest output


def _close(got: torch.Tensor, want: torch.Tensor, dtype) -> None:
    err = (got.float() - want.float()).abs().max() / want.float().abs().max()
    assert err <= TOLERANCE[dtype], f"{err:.2e}"


def _int8(w, group, dtype):
    q, scale = quantize_int8(w, group)
    return (lambda x: mm_int8(x, q, scale.to(dtype))), dequantize_int8(q, scale.to(dtype))


def _int4(w, group, dtype, layout="cpu"):
    q, sz = quantize_int4(w, group)
    packed, z = pack_int4(q, layout), (block_scales(sz) if layout == "plain" else sz).to(dtype)
    return (lambda x: mm_int4(x, packed, z, group, layout)), dequantize_int4(q, sz.to(dtype))


def _int4_plain(w, group, dtype):
    return _int4(w, group, dtype, "plain")


@pytest.mark.parametrize("N", [48, 40])
def test_the_plain_layout_keeps_scales_in_blocks_of_16_rows(N):
    """[G, N, 2] -> [N / 16, G, 16, 2], each block's groups one after another; one block of all rows where 16 does
    not divide N; `unblock_scales` undoes it."""
    sz = torch.randn(3, N, 2)
    z = block_scales(sz)
    r = 16 if N % 16 == 0 else N
    assert z.shape == (N // r, 3, r, 2) and z.is_contiguous()
    assert torch.equal(z[1, 2, 5], sz[2, r + 5]) if r == 16 else torch.equal(z[0], sz)
    assert torch.equal(unblock_scales(z), sz)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt, group", [(_int8, 128), (_int8, 16), (_int4, 32), (_int4, 64), (_int4_plain, 32),
                                        (_int4_plain, 64)])
def test_each_kernel_matches_its_reference_on_odd_shapes(fmt, group, dtype):
    """The packed kernel against a plain matmul with the weight it stands for, 1..33 tokens."""
    torch.manual_seed(0)
    kernel, deq = fmt(torch.randn(48, 128), group, dtype)
    for tokens in range(1, 34, 4):
        x = torch.randn(tokens, 128).to(dtype)
        _close(kernel(x), x.float() @ deq.T, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "portable"])
def test_the_native_int8_kernel_matches_its_reference_on_odd_shapes(dtype, isa):
    """moedeploy's C++ decode kernel over int8 experts (each float instruction set this CPU runs; the integer
    path has its own test) against the FFN of the weights they stand for, 1..33 rows; groups of whole rows, of 16
    and 32 inputs (AVX2's block, AVX-512's), and of 8 (the plain loops run); one output rounding in bfloat16
    apart at most."""
    from moedeploy.experts import Activation

    assert native.available(), native.why_not()
    if isa not in native.isas():
        pytest.skip(f"this CPU does not run {isa} (it runs {', '.join(native.isas())})")
    silu = Activation(torch.nn.SiLU(), gated=True)
    for E, D, I, group in ((3, 64, 32, None), (4, 96, 48, 16), (2, 128, 64, 32), (3, 48, 24, 8)):
        g = torch.Generator().manual_seed(D)
        w_in, w_out = torch.randn(E, 2 * I, D, generator=g), torch.randn(E, D, I, generator=g)
        q_in, s_in = zip(*(quantize_int8(w, group or D) for w in w_in))
        q_out, s_out = zip(*(quantize_int8(w, group or I) for w in w_out))
        q_in, q_out = torch.stack(q_in), torch.stack(q_out)
        s_in, s_out = torch.stack(s_in).to(dtype), torch.stack(s_out).to(dtype)
        deq = ExpertBank(torch.stack([dequantize_int8(q, s) for q, s in zip(q_in, s_in)]).to(dtype),
                         torch.stack([dequantize_int8(q, s) for q, s in zip(q_out, s_out)]).to(dtype), silu)
        for P in (1, 2, 7, 16, 33):
            x, expert = torch.randn(P, D, generator=g).to(dtype), torch.randint(0, E, (P,), generator=g)
            got = torch.ops.moedeploy.expert_ffn_int8(x, expert, q_in, s_in, q_out, s_out, isa)
            want = torch.stack([torch.nn.functional.linear(silu(torch.nn.functional.linear(x[p], deq.w_in[e])),
                                                           deq.w_out[e]) for p, e in enumerate(expert.tolist())])
            _close(got, want, dtype)
            if dtype == torch.bfloat16:  # tighter than TOLERANCE: the bfloat16 loop itself is ~4e-3 off float32
                assert ((got.float() - want.float()).abs().max() / want.float().abs().max()) <= 8e-3


def _integer_path(isa=None):
    """Skip unless the native kernel runs `isa` (an integer path), or any integer path."""
    assert native.available(), native.why_not()
    if isa not in native.isas() if isa else not native.integer():
        pytest.skip(f"this CPU does not run {isa or 'an integer path'} (the kernel runs {', '.join(native.isas())})")


def _quantized_bank(fmt, E, D, I, group, dtype, generator):
    """Random experts quantized as `fmt` ("int8" or "int4", the "plain" layout): the op's tensors, and the float
    weights they stand for [E, N, K]."""
    w_in, w_out = torch.randn(E, 2 * I, D, generator=generator), torch.randn(E, D, I, generator=generator)
    tensors, deq = [], []
    for w, K in ((w_in, D), (w_out, I)):
        if fmt == "int8":
            q, s = (torch.stack(t) for t in zip(*(quantize_int8(m, group or K) for m in w)))
            tensors += [q, s.to(dtype)]
            deq.append(torch.stack([dequantize_int8(a, b) for a, b in zip(q, s.to(dtype))]))
        else:
            q, z = zip(*(quantize_int4(m, group) for m in w))
            z = torch.stack(z).to(dtype)
            tensors += [torch.stack([pack_int4(a, "plain") for a in q]), torch.stack([block_scales(b) for b in z])]
            deq.append(torch.stack([dequantize_int4(a, b) for a, b in zip(q, z)]))
    return tensors, deq


def _ffn(x, expert, deq, dtype, inputs=lambda t: t.float()):
    """Each row's SiLU-gated FFN over the float weights, roundings as eager torch in `dtype`, `inputs` applied to
    what each projection multiplies."""
    rows = []
    for p, e in enumerate(expert.tolist()):
        h = torch.nn.functional.linear(inputs(x[p:p + 1]), deq[0][e].float()).to(dtype)
        gate, up = h.chunk(2, dim=-1)
        a = (torch.nn.functional.silu(gate) * up).to(dtype)
        rows.append(torch.nn.functional.linear(inputs(a), deq[1][e].float()).to(dtype))
    return torch.cat(rows)


@pytest.mark.parametrize("isa", native.INTEGER_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_integer_path_matches_its_reference_on_odd_shapes(fmt, dtype, isa):
    """Each of the native kernel's integer paths (int8 inputs, 32 to a scale, times int8 or int4 weights) against the FFN of the weights it stands for with the inputs quantized the same way (`quantize_inputs`):
    equal up to float32's sums (and one bfloat16 rounding); against the unquantized inputs, off by the inputs'
    quantization (about 1% of the largest output here). Groups of 32, 64, 128 inputs and of whole rows; 1..33
    rows."""
    from moedeploy.quant.formats import quantize_inputs

    _integer_path(isa)
    op = {"int8": torch.ops.moedeploy.expert_ffn_int8, "int4": torch.ops.moedeploy.expert_ffn_int4}[fmt]
    shapes = [(3, 64, 64, 32), (2, 128, 64, 64), (4, 256, 128, 128)] + ([(3, 192, 128, None)] if fmt == "int8" else [])
    for E, D, I, group in shapes:
        g = torch.Generator().manual_seed(D + I)
        tensors, deq = _quantized_bank(fmt, E, D, I, group, dtype, g)
        for P in (1, 2, 7, 16, 33):
            x, expert = torch.randn(P, D, generator=g).to(dtype), torch.randint(0, E, (P,), generator=g)
            got = op(x, expert, *tensors, isa)
            want = _ffn(x, expert, deq, dtype, quantize_inputs)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err <= (1e-5 if dtype == torch.float32 else 8e-3), (E, D, I, group, P, err)
            plain = _ffn(x, expert, deq, dtype)
            off = ((got.float() - plain.float()).abs().max() / plain.float().abs().max()).item()
            assert 0 < off <= 4e-2, (E, D, I, group, P, off)


@pytest.mark.parametrize("isa", native.INTEGER_ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_the_integer_path_bits_do_not_depend_on_threads_rows_or_slots(fmt, isa):
    _integer_path(isa)
    op = functools.partial({"int8": torch.ops.moedeploy.expert_ffn_int8,
                            "int4": torch.ops.moedeploy.expert_ffn_int4}[fmt], isa=isa)
    g = torch.Generator().manual_seed(5)
    tensors, _ = _quantized_bank(fmt, 4, 128, 128, 64, torch.bfloat16, g)
    x, expert = torch.randn(9, 128, generator=g).bfloat16(), torch.randint(0, 4, (9,), generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(x, expert, *tensors)
        torch.set_num_threads(2)
        two = op(x, expert, *tensors)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(torch.cat([op(x[p:p + 1], expert[p:p + 1], *tensors) for p in range(9)]), one)
    where = torch.tensor([2, 0, 3, 1])  # the bank's experts in other slots
    slot = torch.argsort(where)[expert]
    assert torch.equal(op(x, slot, *(t[where].contiguous() for t in tensors)), one)
    # a prompt-sized step, its pairs sorted by expert as the plan gives them: run chunk by chunk, two pairs of one
    # expert at a time (odd runs leave pairs alone), the same bits as each row on its own
    x, expert = torch.randn(41, 128, generator=g).bfloat16(), torch.randint(0, 4, (41,), generator=g).sort().values
    assert torch.equal(op(x, expert, *tensors), torch.cat([op(x[p:p + 1], expert[p:p + 1], *tensors) for p in range(41)]))


def test_the_int4_kernel_refuses_groups_and_shapes_it_does_not_take():
    _integer_path()
    g = torch.Generator().manual_seed(0)
    tensors, _ = _quantized_bank("int4", 2, 128, 64, 64, torch.float32, g)
    x, expert = torch.randn(1, 128), torch.tensor([1])
    with pytest.raises(RuntimeError, match="scales in x's dtype"):
        torch.ops.moedeploy.expert_ffn_int4(x.bfloat16(), expert, *tensors)
    p_in, z_in, p_out, z_out = tensors
    with pytest.raises(RuntimeError, match=r"scales and zeros \[E, N / 16, G, 16, 2\] .*got \[2, 4, 2, 16, 2\]"):
        torch.ops.moedeploy.expert_ffn_int4(x, expert, p_in, z_in[:, :4], p_out, z_out)  # rows 0-63 of 128
    with pytest.raises(RuntimeError, match="scales and zeros"):  # [E, G, N, 2], as torch's kernel's layout has them
        torch.ops.moedeploy.expert_ffn_int4(x, expert, p_in, torch.zeros(2, 2, 128, 2), p_out, z_out)
    with pytest.raises(RuntimeError, match="groups of 32 inputs or a multiple of 64, got 128 inputs in 8 groups"):
        torch.ops.moedeploy.expert_ffn_int4(x, expert, p_in, torch.zeros(2, 8, 8, 16, 2), p_out, z_out)
    with pytest.raises(RuntimeError, match="names expert 2; the bank holds 2"):
        torch.ops.moedeploy.expert_ffn_int4(x, torch.tensor([2]), *tensors)
    with pytest.raises(RuntimeError, match="expert_ffn_int4 runs on an integer path .*got 'portable'"):
        torch.ops.moedeploy.expert_ffn_int4(x, expert, *tensors, "portable")


def test_int8_groups_add_up_in_float32():
    """Groups of a row run as one kernel call each; their partial sums add up in float32 and round to bfloat16
    once, so 64 groups cost about one rounding of the output, not one per group."""
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(64, 2048), 32)
    scale = scale.bfloat16()
    x = torch.randn(8, 2048).bfloat16()
    want = x.float() @ dequantize_int8(q, scale).T

    def err(got):
        return ((got.float() - want).abs().max() / want.abs().max()).item()

    assert err(mm_int8(x, q, scale)) <= 2 * err(want.bfloat16())


def test_quantization_error_is_within_half_a_step():
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    q, scale = quantize_int8(w, 32)
    step = scale.repeat_interleave(32, dim=1)
    assert ((dequantize_int8(q, scale) - w).abs() <= step / 2 + 1e-6).all()
    q4, sz = quantize_int4(w, 32)
    step4 = sz[..., 0].transpose(0, 1).repeat_interleave(32, dim=1)
    assert ((dequantize_int4(q4, sz) - w).abs() <= step4 / 2 + 1e-6).all()


def _dequantized_reference(path, spec: QuantSpec):
    """The float model with every routed expert replaced by dequantize(quantize(w)): the plain path."""
    from moedeploy.quant.bank import _quantize

    model = load(path, dtype="float32")
    for layer in model.moedeploy.layers.values():
        D, I = layer.experts.hidden_size, layer.experts.intermediate_size
        rows = {"w_in": [], "w_out": []}
        for e in range(layer.experts.num_experts):
            for name, K in (("w_in", D), ("w_out", I)):
                w = getattr(layer.experts, name)[e]
                t = dict(_quantize(spec, "x", w, K))
                if spec.dtype == "int8":
                    rows[name].append(dequantize_int8(t["q_x"], t["s_x"]))
                else:
                    q, sz = quantize_int4(w, spec.group(K))
                    rows[name].append(dequantize_int4(q, sz))
        bank = layer.experts
        layer.experts = ExpertBank(torch.stack(rows["w_in"]), torch.stack(rows["w_out"]), bank.activation,
                                   bank.b_in, bank.b_out)
    return model


@pytest.mark.parametrize("family, spec", [("qwen3_moe", QuantSpec("int8")), ("qwen3_moe", QuantSpec("int8", 16)),
                                          ("qwen3_moe", QuantSpec("int4", 32)), ("gpt_oss", QuantSpec("int8")),
                                          ("qwen2_moe", QuantSpec("int4", 32))])
def test_a_quantized_model_equals_its_dequantized_reference(tiny, family, spec):
    overrides = dict(hidden_size=64, moe_intermediate_size=32) if family != "gpt_oss" else {}
    if family == "qwen2_moe":
        overrides["shared_expert_intermediate_size"] = 32  # shared experts stay float
    path = tiny(family, **overrides)
    ref = _dequantized_reference(path, spec)
    model = load(path, dtype="float32", expert_dtype=spec.dtype, group_size=spec.group_size)
    assert model.moedeploy.stats()["backend"] == ["quantized"]
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _close(model(ids).logits, ref(ids).logits, torch.float32)
        assert torch.equal(model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False),
                           ref.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))


def test_the_expert_bytes_are_the_small_ones(tiny):
    path = tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32)
    full = load(path, dtype="float32")
    layer = next(iter(full.moedeploy.layers.values()))
    for dtype, at_most in (("int8", 0.28), ("int4", 0.17)):  # a quarter or an eighth, plus the scales
        small = next(iter(load(path, dtype="float32", expert_dtype=dtype).moedeploy.layers.values()))
        assert small.experts.expert_bytes() <= at_most * layer.experts.expert_bytes()
        assert small.experts.parameter_count() == layer.experts.parameter_count()


@pytest.mark.parametrize("options, message", [
    (dict(expert_dtype="int8", group_size=24), "group size 24 does not divide the expert's input dimension"),
    (dict(expert_dtype="int4", group_size=48), "int4 groups are 32, 64, 128, 256 inputs"),
    (dict(expert_dtype="fp3"), "unknown expert dtype 'fp3'"),
    (dict(group_size=32), "group_size applies to quantized experts"),
    (dict(expert_dtype="int8", expert_store="disk"), "apply only with an expert_memory budget"),
    (dict(expert_dtype="int8", backend="loop"), "quantized experts run on their own kernels"),
])
def test_bad_quantization_options_are_refused(tiny, options, message):
    with pytest.raises(OptionError, match=message):
        load(tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32), **options)


def test_eval_ppl_reports_the_quantized_perplexity(tiny, capsys, tmp_path):
    import json

    from moedeploy.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    path = str(tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32))
    got = {}
    for dtype in (None, "int8"):
        assert main(["eval-ppl", "--model", path, "--text", str(text), "--context", "32", "--json"]
                    + (["--expert-dtype", dtype] if dtype else [])) == 0
        got[dtype] = json.loads(capsys.readouterr().out)["perplexity"]
    assert got["int8"] == pytest.approx(got[None], rel=0.05) and got["int8"] != got[None]




@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_quantized_model_under_budgets_equals_it_resident(tiny, dtype):
    """The buffering guarantee carries over: slots hold the quantized form, logits stay bit-identical."""
    path = tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        resident = load(path, dtype="float32", expert_dtype=dtype)
        want, decoded = resident(ids).logits, resident.generate(ids[:1, :4], **gen)  # decode steps: int8's native
        for budget, policy, scope in ((0.25, "lru", "layer"), (0.5, "lifo", "layer"), (0.3, "lfu", "global")):
            model = load(path, dtype="float32", expert_dtype=dtype, expert_memory=budget, policy=policy,
                         cache_scope=scope)
            assert torch.equal(model(ids).logits, want), (budget, policy, scope)
            got = model.generate(ids[:1, :4], **gen)
            assert all(torch.equal(a, b) for a, b in zip(got.logits, decoded.logits)), (budget, policy, scope)
            stats = model.moedeploy.cache_stats()
            small = next(iter(model.moedeploy.layers.values())).experts.expert_bytes()
            assert stats["misses"] > 0 and stats["bytes_moved"] == small * (stats["misses"] + stats["prefetched"])


def test_quantized_experts_name_their_kernel_and_int4_takes_the_plain_layout_off_the_cpu():
    """int4 takes the "plain" layout off the CPU; on the CPU torch's CPU kernel's packing, unless the loader finds
    that the native kernel computes the model's experts (the next tests)."""
    from moedeploy.quant.formats import QuantSpec, for_device, kernel, unpack_int4

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert kernel(QuantSpec("int8"), cpu).startswith("int8: torch._weight_int8pack_mm; decode steps moedeploy")
    assert kernel(QuantSpec("int4"), cpu) == "int4: torch._weight_int4pack_mm_for_cpu"
    assert "dequantize per expert, then matmul" in kernel(QuantSpec("int8"), gpu)
    assert for_device(QuantSpec("int4", 32), gpu) == QuantSpec("int4", 32, "plain")
    assert for_device(QuantSpec("int4"), cpu).layout == for_device(QuantSpec("int8"), gpu).layout == "cpu"
    q = torch.randint(0, 16, (8, 64), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q, "plain")).int(), q)
    with pytest.raises(OptionError, match="int8 only 'cpu'"):
        QuantSpec("int8", layout="plain")


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("store", [None, "host", "disk"])
def test_quantized_experts_on_the_integer_path_are_near_their_reference_and_exact_under_budgets(tiny, store, dtype):
    """Quantized experts whose shapes the integer path takes (inputs multiples of 64) run the native kernel on every
    step: the stats say so, the logits are within the inputs' quantization of the dequantized reference, and
    under budgets they are bit-identical to the model resident (prompt and decode steps)."""
    _integer_path()
    path = tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=64)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    gen = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    with torch.inference_mode():
        resident = load(path, dtype="bfloat16", expert_dtype=dtype)
        assert resident.moedeploy.stats()["expert_kernel"] == [
            f"{dtype}: moedeploy's native kernel (kernels/native.py), int8 inputs ({native.integer_isa()})"]
        want, decoded = resident(ids).logits, resident.generate(ids[:1, :4], **gen)
        if store is None:
            ref = _dequantized_reference(path, QuantSpec(dtype)).to(torch.bfloat16)(ids).logits
            err = ((want.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            assert 0 < err <= 5e-2, err
            return
        for budget in (0.25, 0.5):
            model = load(path, dtype="bfloat16", expert_dtype=dtype, expert_memory=budget, expert_store=store)
            assert torch.equal(model(ids).logits, want), budget
            got = model.generate(ids[:1, :4], **gen)
            assert all(torch.equal(a, b) for a, b in zip(got.logits, decoded.logits)), budget
            assert model.moedeploy.cache_stats()["misses"] > 0


@pytest.mark.parametrize("family, overrides", [("gpt_oss", dict(hidden_size=64, intermediate_size=64)),
                                               ("qwen3_moe", dict(hidden_size=64, moe_intermediate_size=32))])
def test_int4_experts_the_native_kernel_does_not_compute_keep_torchs_kernel(tiny, family, overrides):
    """Biased, clamped experts (GPT-OSS) or inputs that are not multiples of 64: int4 keeps torch's CPU kernel and
    its packing, on every CPU (the "plain" layout would run dequantized per call), and int8 its prompt steps."""
    model = load(tiny(family, **overrides), dtype="bfloat16", expert_dtype="int4")
    assert model.moedeploy.stats()["expert_kernel"] == ["int4: torch._weight_int4pack_mm_for_cpu"]
    assert {layer.experts.spec.layout for layer in model.moedeploy.layers.values()} == {"cpu"}
    int8 = load(tiny(family, **overrides), dtype="bfloat16", expert_dtype="int8")
    assert int8.moedeploy.stats()["expert_kernel"][0].startswith("int8: torch._weight_int8pack_mm")


@pytest.mark.parametrize("store", ["host", "disk"])
def test_int4_in_the_plain_layout_equals_its_reference_and_stays_exact_under_budgets(tiny, monkeypatch, store):
    """The layout CUDA gets, run here on the CPU (the layout forced): the model equals its dequantized reference,
    under budgets it is bit-identical to it resident, and its disk cache is its own, not the CPU layout's."""
    import moedeploy.api
    from moedeploy.quant.cache import QuantCache

    path = tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32)
    monkeypatch.setattr(moedeploy.api, "for_device", lambda spec, device: QuantSpec(spec.dtype, spec.group_size,
                                                                                     "plain"))
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        resident = load(path, dtype="float32", expert_dtype="int4", group_size=32)
        kernel = "int4: dequantize per expert, then matmul (no packed int4 kernel on cpu)"
        assert resident.moedeploy.stats()["expert_kernel"] == [kernel]
        want = resident(ids).logits
        _close(want, _dequantized_reference(path, QuantSpec("int4", 32))(ids).logits, torch.float32)
        for budget in (0.25, 0.5):
            model = load(path, dtype="float32", expert_dtype="int4", group_size=32, expert_memory=budget,
                         expert_store=store)
            assert torch.equal(model(ids).logits, want), budget
            assert model.moedeploy.cache_stats()["misses"] > 0
    plain, packed = (QuantCache(path, QuantSpec("int4", 32, layout), torch.float32) for layout in ("plain", "cpu"))
    assert plain.dir != packed.dir


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu-check.sh)")


@cuda
@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("store", ["host", "disk"])
def test_cuda_quantized_experts_under_budgets_equal_them_resident(tiny, store, dtype):
    """On CUDA quantized experts run dequantized per expert on the device (int4 in the plain layout); the host
    store keeps the small form pinned, the slots on the GPU hold it (a miss moves the small bytes), and logits
    are bit-identical to the resident model under every budget; the resident model agrees with the CPU one to
    bfloat16's tolerance."""
    path = tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    weights = "q_in" if dtype == "int8" else "p_in"
    with torch.inference_mode():
        resident = load(path, dtype="bfloat16", device="cuda", expert_dtype=dtype)
        assert resident.moedeploy.stats()["expert_kernel"] == [
            f"{dtype}: dequantize per expert, then matmul (no packed {dtype} kernel on cuda)"]
        want = resident(ids.cuda()).logits
        _close(want.cpu(), load(path, dtype="bfloat16", expert_dtype=dtype)(ids).logits, torch.bfloat16)
        for budget in (0.25, 0.5):
            model = load(path, dtype="bfloat16", device="cuda", expert_dtype=dtype, expert_memory=budget,
                         expert_store=store)
            assert torch.equal(model(ids.cuda()).logits, want), (budget, store)
            stats = model.moedeploy.cache_stats()
            small = next(iter(model.moedeploy.layers.values())).experts.expert_bytes()
            assert stats["misses"] > 0 and stats["bytes_moved"] == small * (stats["misses"] + stats["prefetched"])
            for pool in model.moedeploy.pools:
                slots = getattr(pool.slots, weights)
                assert slots.is_cuda and slots.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
            if store == "host":
                host = getattr(next(iter(model.moedeploy.layers.values())).experts, weights)
                assert host.device.type == "cpu" and host.is_pinned()
        # decode (one token per step: the plan-free path) with prefetches on the side stream, against resident
        prompt = ids[:1, :4].cuda()
        tokens = resident.generate(prompt, max_new_tokens=8, do_sample=False)
        model = load(path, dtype="bfloat16", device="cuda", expert_dtype=dtype, expert_memory=0.25,
                     expert_store=store, prefetch="lookahead")
        assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), tokens)


@cuda
def test_int4_experts_packed_for_the_cpu_say_so_when_moved_to_cuda(tiny):
    model = load(tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32), dtype="bfloat16", expert_dtype="int4")
    model.to("cuda")
    with pytest.raises(OptionError, match="packed for torch's CPU kernel and cannot run on cuda; load the model "
                                          "with device='cuda'"):
        model(torch.tensor([[5, 6, 7]], device="cuda"))


def test_a_family_without_adapter_is_verified_against_its_float_experts(tiny):
    """The generic adapter's check compares transformers' block with moedeploy's on the float experts (read
    again from the checkpoint), then the layer runs quantized."""
    from moedeploy.models import family_for
    from moedeploy.loader import read_config
    from moedeploy.store import Checkpoint

    path = tiny("flex_olmo")
    assert not family_for(read_config(Checkpoint(path))).model_types  # no adapter: the generic one, verified
    model = load(path, dtype="float32", expert_dtype="int8")
    assert model.moedeploy.stats()["backend"] == ["quantized"]


def test_bench_decode_reports_rates_against_the_best_bandwidth_of_the_run(tiny, capsys, monkeypatch):
    """`bench decode` without llama.cpp: one row per configuration and thread count, each share computed from the
    best read bandwidth of the run (measured first, then again after every round); a GGUF without llama.cpp is
    refused."""
    import json

    from moedeploy.bench import decode
    from moedeploy.cli import main

    measured = iter([1e9, 3e9, 2e9])  # before the rounds, after round 1, after round 2
    monkeypatch.setattr(decode, "read_bandwidth", lambda threads, repeats=5: next(measured))
    path = str(tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32))
    assert main(["bench", "decode", "--model", path, "--configs", "float32,float32+int8,float32@compiled", "--threads",
                 "1", "--rounds", "2", "--new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert next(measured, None) is None and out["read_bandwidth"] == {"1": 3e9}
    assert [(r["config"], r["threads"]) for r in out["rows"]] == [("float32", 1), ("float32+int8", 1),
                                                                 ("float32@compiled", 1)]
    for row in out["rows"]:
        assert row["decode_tok_s"] > 0
        low, high = row["range_tok_s"]  # the rounds' spread, around their median
        assert low <= row["decode_tok_s"] <= high
        assert row["bound_tok_s"] == round(3e9 / row["bytes_per_token"], 1)
        assert row["bandwidth_share"] == pytest.approx(row["decode_tok_s"] / row["bound_tok_s"], rel=1e-2, abs=1e-3)
    rows = {r["config"]: r for r in out["rows"]}
    assert rows["float32+int8"]["bytes_per_token"] < rows["float32"]["bytes_per_token"]
    with pytest.raises(SystemExit, match="--gguf needs --llama-cpp"):
        main(["bench", "decode", "--model", path, "--gguf", "q8=x.gguf"])


def test_bench_quant_reports_one_json_object(tiny, capsys, tmp_path):
    import json

    from moedeploy.cli import main

    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 10)
    path = str(tiny("qwen3_moe", hidden_size=64, moe_intermediate_size=32))
    assert main(["bench", "quant", "--model", path, "--text", str(text), "--rounds", "1", "--new-tokens", "4",
                 "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["expert_dtype"]: r for r in out["rows"]}
    assert set(rows) == {"float32", "int8", "int4"}
    assert rows["int4"]["expert_bytes"] < rows["int8"]["expert_bytes"] < rows["float32"]["expert_bytes"]
    assert rows["float32"]["agreement_tokens"] == [4, 4, 4] and rows["float32"]["perplexity_change"]["t"] == 0


def test_bench_decode_counts_a_tied_head_whole(tiny):
    """A token reads one row of the input embeddings, but the whole matrix when it is also the output head
    (tied embeddings, as in Granite's MoE models): the bound counts what is read."""
    from moedeploy.bench.decode import model_bytes_per_token

    untied, tied = (load(tiny("granitemoe", tie_word_embeddings=tie), dtype="float32") for tie in (False, True))
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    row = tied.get_input_embeddings().weight[0].numel() * 4
    assert model_bytes_per_token(tied) == model_bytes_per_token(untied) - row
