"""Decode-sized dense projections on the native kernel (kernels/dense.py): what they compute, which calls they
take, and what the loader gives them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moedeploy
from moedeploy.kernels import dense, native


def _ulps(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """The largest distance from the exact x @ w.T in units of bfloat16's last place there, or of float32 sums'
    error bound where that is larger (an output near zero, after cancellation)."""
    want = x.double() @ w.double().T
    ulp = want.abs().clamp(min=1e-30).log2().floor().exp2() * 2.0 ** -7
    sums = x.double().abs() @ w.double().abs().T * x.shape[1] * 2.0 ** -24
    return ((got.double() - want).abs() / torch.maximum(ulp, sums)).max().item()


@pytest.mark.parametrize("isa", ["best", "avx512_bf16", "avx512", "avx2", "portable"])
def test_linear_rows_is_a_bfloat16_rounding_of_the_exact_product(isa):
    """Each output is the float32 sum of its products rounded once to bfloat16 (as F.linear): within one unit in
    the last place of the exact value, on inputs that are and are not whole blocks of the instruction sets'
    steps, 1 to 16 rows."""
    assert native.available(), native.why_not()
    if isa not in native.isas() + ["best"]:
        pytest.skip(f"this CPU does not run {isa} (it runs {', '.join(native.isas())})")
    for N, K in ((1, 128), (7, 129), (33, 200), (70, 2048), (129, 333), (300, 32), (9, 48)):
        for M in (1, 2, 5, 16):
            g = torch.Generator().manual_seed(N * 100 + M)
            x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(N, K, generator=g).bfloat16()
            got = torch.ops.moedeploy.linear_rows(x, w, isa)
            assert got.dtype == torch.bfloat16 and got.shape == (M, N)
            assert _ulps(got, x, w) <= 1.0, (N, K, M, isa)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 160, generator=g), torch.randn(40, 160, generator=g)  # float32: within its sums' bound
    err = (torch.ops.moedeploy.linear_rows(x, w, isa).double() - x.double() @ w.double().T).abs()
    assert (err <= x.double().abs() @ w.double().abs().T * 160 * 2.0 ** -24).all()


def test_linear_rows_bits_do_not_depend_on_threads_or_the_other_rows():
    assert native.available(), native.why_not()
    x, w = torch.randn(9, 512).bfloat16(), torch.randn(600, 512).bfloat16()  # 600 rows: several tasks
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.moedeploy.linear_rows(x, w)
        torch.set_num_threads(2)
        two = torch.ops.moedeploy.linear_rows(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(torch.cat([torch.ops.moedeploy.linear_rows(x[m:m + 1], w) for m in range(9)]), one)


@pytest.mark.parametrize("bad", ["dtypes", "shapes"])
def test_linear_rows_refuses_what_it_does_not_compute(bad):
    assert native.available(), native.why_not()
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    with pytest.raises(RuntimeError, match="linear_rows: " + ("x and w must share a dtype" if bad == "dtypes" else "w must be")):
        torch.ops.moedeploy.linear_rows(x, w.float() if bad == "dtypes" else w[:, :32].contiguous())


def test_the_kernel_takes_decode_sized_bfloat16_steps_only():
    """A decode step's rows (up to ROWS) of a bias-less bfloat16 projection on the CPU; a prompt, float32, a
    bias, short inputs and anything needing gradients go to F.linear, bit for bit."""
    assert native.available(), native.why_not()
    w = torch.randn(48, 256).bfloat16()
    step = torch.randn(1, 1, 256).bfloat16()
    assert dense.takes(step, w, None)
    assert torch.equal(dense.linear(step, w), torch.ops.moedeploy.linear_rows(step[0], w)[None])
    prompt = torch.randn(1, dense.ROWS + 1, 256).bfloat16()
    short = dense.min_inputs() - 16  # fewer inputs than this CPU's loop takes: 112 with AVX-512, 16 without
    assert dense.min_inputs() == (128 if "avx512" in native.isas() else 32)
    others = [(prompt, w, None), (step.float(), w.float(), None), (step, w, torch.randn(48).bfloat16()),
              (step[..., :short], w[:, :short], None), (step, w.clone().requires_grad_(), None),
              (step.clone().requires_grad_(), w, None)]
    for x, weight, bias in others:
        assert not dense.takes(x, weight, bias)
        with torch.no_grad():
            assert torch.equal(dense.linear(x, weight, bias), F.linear(x, weight, bias))


def test_the_loader_gives_bias_less_projections_the_kernel_and_keeps_tied_weights_tied(tiny):
    path = tiny("qwen3_moe", tie_word_embeddings=True)
    model = moedeploy.load(path, dtype="bfloat16")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is dense.RowLinear for m in linears if m.bias is None)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape == (1, 9)
    reference = moedeploy.load(path, dtype="bfloat16", backend="loop")  # torch's kernels asked for: no swap
    assert not any(type(m) is dense.RowLinear for m in reference.modules())
