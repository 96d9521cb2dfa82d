"""The expert activation gives each row the same bits wherever the row sits: a budget runs an expert's rows in
slot order and in chunks, and the fully resident model in expert order, so any dependence on position shows as
logits that differ in the last bits (it did for GPT-OSS on an AVX-512 CPU: the sigmoid ran over all rows as one
vector loop, and the rows that fell in its scalar tail rounded differently).

These tests hold torch's element-wise loops (TensorIterator's) to what `experts.rowwise` relies on: rows kept
apart in memory are not merged into one loop, and an op over fewer than at::internal::GRAIN_SIZE elements runs on
one thread (gelu's from 16384). A torch that changes either fails here, not silently in a budget's logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.activations import ACT2FN

from moedeploy.experts import GRAIN, Activation, rowwise

ACTIVATIONS = {
    "silu, gated": Activation(fn=ACT2FN["silu"], gated=True),
    "gelu": Activation(fn=ACT2FN["gelu"], gated=False),
    "gpt-oss clamped swiglu": Activation(fn=nn.Identity(), gated=True, clamp=7.0),
}


def _h(P: int, N: int) -> torch.Tensor:
    return torch.randn(P, N, generator=torch.Generator().manual_seed(P * 1000 + N)) * 4


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("name", list(ACTIVATIONS))
@pytest.mark.parametrize("P, N", [(2, 48), (3, 48), (5, 34), (33, 2 * 24), (1500, 48), (700, 2 * 97),
                                  (5, 2 * 10240), (3, 40000)])
def test_a_row_gets_the_same_bits_in_any_order_and_any_chunk(name, P, N, threads):
    act = ACTIVATIONS[name]
    h = _h(P, N)
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(0))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        whole = act(h)
        assert torch.equal(act(h[perm]), whole[perm])  # rows in another order (a budget's slot order)
        for k in (1, P // 3, P - 1):  # the first k rows alone (a budget's chunk)
            if k:
                assert torch.equal(act(h[:k]), whole[:k])
    finally:
        torch.set_num_threads(before)


def test_rowwise_keeps_each_call_under_torchs_grain_and_its_rows_apart():
    calls = []  # (shape, stride) of each call

    def fn(t):
        calls.append((t.shape, t.stride()))
        return torch.sigmoid(t)

    t = _h(3000, 24)
    torch.testing.assert_close(rowwise(fn, t), torch.sigmoid(t))  # the same function, not the same bits
    assert len(calls) > 1 and all(2 <= s[0] and s[0] * s[1] < GRAIN and st[0] == 25 for s, st in calls)
