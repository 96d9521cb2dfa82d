"""Pre-quantized checkpoints: GPT-OSS's MXFP4 experts and DeepSeek-V3's block-scaled FP8 weights load as shipped,
stay small in the bank and in budget slots, and compute what transformers computes with the dequantized weights.

Tiny checkpoints come from `tiny.save_tiny_prequantized`: real transformers models whose tensors are rewritten in
the on-disk layouts transformers reads, plus a reference checkpoint with the dequantized float weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

from moedeploy import load
from moedeploy.errors import CheckpointError, UnsupportedModelError
from moedeploy.quant import QuantizedBank, QuantSpec, fp8, mxfp4
from moedeploy.quant.formats import kernel as quant_kernel
from moedeploy.quant.prequantized import PrequantizedBank
from moedeploy.tiny import save_tiny_prequantized

CHECKPOINTS = {
    # GPT-OSS, experts MXFP4: two 32-element blocks per row of both projections
    "mxfp4": ("gpt_oss", {"hidden_size": 64, "intermediate_size": 64}),
    # DeepSeek-V3, every Linear FP8 in 16x16 blocks: partial blocks (dense MLP 40 wide, the attention's 24-row
    # projections) and gate/up of 24 rows each, whose scale grids cannot be concatenated block-aligned
    "fp8": ("deepseek_v3", {"block": (16, 16), "moe_intermediate_size": 24}),
    # the same with 8x8 blocks that divide every shape: transformers can dequantize this one itself (see below)
    "fp8_aligned": ("deepseek_v3", {"block": (8, 8)}),
}
KERNELS = {"mxfp4": "mxfp4: dequantize per expert, then matmul",
           "fp8": "fp8 (e4m3, 16x16 blocks): dequantize per expert, then matmul"}
IDS = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """ckpt(name) -> (pre-quantized checkpoint, reference checkpoint with the dequantized float weights)."""
    made = {}

    def make(name):
        if name not in made:
            family, overrides = CHECKPOINTS[name]
            root = tmp_path_factory.mktemp(name)
            made[name] = (save_tiny_prequantized(family, root / "q", reference_dir=root / "ref", **overrides),
                          root / "ref")
        return made[name]

    return make


def _close(got, want, tol=1e-5):
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= tol, f"{err:.2e}"


def _greedy(model):
    return model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False)


def _transformers(path):
    return T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()


@pytest.mark.parametrize("name", ["mxfp4", "fp8"])
def test_a_prequantized_checkpoint_equals_transformers_on_its_dequantized_weights(ckpt, name):
    quantized, reference = ckpt(name)
    model, ref = load(quantized, dtype="float32"), _transformers(reference)
    stats = model.moedeploy.stats()
    assert stats["backend"] == ["quantized"] and stats["expert_kernel"] == [KERNELS[name]]
    assert all(isinstance(layer.experts, PrequantizedBank) for layer in model.moedeploy.layers.values())
    with torch.inference_mode():
        _close(model(IDS).logits, ref(IDS).logits)
        assert torch.equal(_greedy(model), _greedy(ref))


@pytest.mark.parametrize("name", ["mxfp4", "fp8_aligned"])
def test_transformers_reads_the_tiny_quantized_checkpoints_too(ckpt, name):
    """transformers itself dequantizes both on CPU (MXFP4 without triton/kernels; FP8 without a GPU), so the
    on-disk layout is the one it reads. Not the 16x16 FP8 checkpoint: transformers 5 derives the block from
    shape / scale grid and refuses partial blocks ("Weight shape (32, 40) not divisible by scale grid (2, 3)"),
    which moedeploy reads (real DeepSeek-V3 has them: kv_a_proj_with_mqa is 576 rows)."""
    quantized, _ = ckpt(name)
    ours, theirs = load(quantized, dtype="float32"), _transformers(quantized)
    kept = sorted({str(p.dtype) for p in theirs.parameters() if p.is_floating_point() and p.dtype != torch.float32})
    if kept:  # transformers 5.17 leaves MXFP4 experts in bfloat16 and then multiplies them by float32 inputs
        pytest.skip(f"transformers {T.__version__} dequantizes this checkpoint to {', '.join(kept)} although float32 "
                    "was asked: no float32 reference here")
    with torch.inference_mode():
        _close(ours(IDS).logits, theirs(IDS).logits)


@pytest.mark.parametrize("name", ["mxfp4", "fp8"])
def test_under_an_expert_budget_the_slots_hold_the_small_form_and_logits_are_bit_identical(ckpt, name):
    quantized, _ = ckpt(name)
    with torch.inference_mode():
        want = load(quantized, dtype="float32")(IDS).logits
        for budget, policy, scope in ((0.5, "lru", "layer"), (0.3, "lfu", "global")):
            if scope == "global" and name != "mxfp4":
                continue  # DeepSeek-V3's first layer is dense: one MoE layer, nothing global to test
            model = load(quantized, dtype="float32", expert_memory=budget, policy=policy, cache_scope=scope)
            assert torch.equal(model(IDS).logits, want), (budget, policy, scope)
            stats = model.moedeploy.cache_stats()
            bank = next(iter(model.moedeploy.layers.values())).experts
            assert isinstance(model.moedeploy.pools[0].slots, PrequantizedBank)
            assert stats["misses"] > 0 and stats["bytes_moved"] == bank.expert_bytes() * (
                stats["misses"] + stats["prefetched"])


def test_the_bank_keeps_the_bytes_as_shipped(ckpt):
    """MXFP4: 4 bits + one 8-bit exponent per 32 weights = 4.25; FP8: 8 bits + a float32 per block (16x16 here:
    8.125 and a little more for partial blocks; 8.002 at 128x128)."""
    for name, (lo, hi) in (("mxfp4", (4.25, 4.25)), ("fp8", (8.125, 8.2))):
        quantized, reference = ckpt(name)
        small = next(iter(load(quantized, dtype="float32").moedeploy.layers.values())).experts
        full = next(iter(load(reference, dtype="float32").moedeploy.layers.values())).experts
        assert lo <= small.weight_bits() <= hi, (name, small.weight_bits())
        assert small.parameter_count() == full.parameter_count()
        biases = sum(4 * t[0].numel() for t in (small.b_in, small.b_out) if t is not None)  # float32, as before
        assert small.expert_bytes() - biases <= (full.expert_bytes() - biases) * hi / 32
        assert small.q_in.dtype == torch.uint8 and small.q_out.dtype == torch.uint8


def test_expert_dtype_requantizes_the_dequantized_experts(ckpt):
    quantized, reference = ckpt("fp8")
    model = load(quantized, dtype="float32", expert_dtype="int8")
    assert isinstance(next(iter(model.moedeploy.layers.values())).experts, QuantizedBank)
    assert model.moedeploy.stats()["expert_kernel"] == [quant_kernel(QuantSpec("int8"), torch.device("cpu"))]  # not FP8
    with torch.inference_mode():
        _close(model(IDS).logits, _transformers(reference)(IDS).logits, tol=2e-2)


def test_the_disk_store_reads_and_dequantizes_one_expert_per_miss(ckpt):
    quantized, reference = ckpt("mxfp4")
    model = load(quantized, dtype="float32", expert_memory=0.5, expert_store="disk")
    assert model.moedeploy.stats()["expert_kernel"] == []  # float slots: the plain expert kernels
    with torch.inference_mode():
        _close(model(IDS).logits, _transformers(reference)(IDS).logits)


def _edit(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("name, tensor, edit, message", [
    ("mxfp4", "model.layers.0.mlp.experts.gate_up_proj_scales", lambda t: t[..., :1],
     r"gate_up_proj_blocks \(128, 2, 16\) and .*gate_up_proj_scales \(128, 1\), expected \(128, 2, 16\) and \(128, 2\)"),
    ("mxfp4", "model.layers.1.mlp.experts.down_proj_blocks", lambda t: t[:3],
     "hold fewer experts than config.json's"),
    ("fp8", "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv", lambda t: t[:1],
     r"up_proj.weight \(24, 32\) with .*weight_scale_inv \(1, 2\), expected \(24, 32\) with \(2, 2\)"),
    ("fp8", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv", lambda t: t[:, :1],
     r"kv_a_proj_with_mqa.weight .* expected \(24, 32\) with \(2, 2\)"),
    ("fp8", "model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv", None,
     "has no model.layers.1.mlp.shared_experts.down_proj.weight_scale_inv"),
])
def test_a_truncated_or_missing_scale_is_a_checkpoint_error(ckpt, tmp_path, name, tensor, edit, message):
    def change(tensors):
        if edit is None:
            del tensors[tensor]
        else:
            tensors[tensor] = edit(tensors[tensor]).contiguous()

    with pytest.raises(CheckpointError, match=message):
        load(_edit(ckpt(name)[0], tmp_path / "bad", change), dtype="float32")


def test_an_unknown_quant_method_is_named(ckpt, tmp_path):
    bad = shutil.copytree(ckpt("fp8")[0], tmp_path / "awq")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="quant_method 'awq'.*mxfp4, fp8 only"):
        load(bad)


# --- the formats against transformers' own readers -----------------------------------------------------------------

def test_mxfp4_dequantizes_as_transformers_does():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=g)  # [E, R, G, 16]
    scales = torch.randint(120, 134, (3, 8, 2), dtype=torch.uint8, generator=g)  # [E, R, G]
    want = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, 32 G, R]
    assert torch.equal(mxfp4.dequantize(blocks, scales, torch.float32).transpose(1, 2), want)
    # low nibble first: byte 0x71 holds codes 1 (0.5) then 7 (6.0); scale 128 doubles them
    one = mxfp4.dequantize(torch.tensor([[[0x71] + [0] * 15]], dtype=torch.uint8), torch.tensor([[128]],
                                                                                               dtype=torch.uint8),
                           torch.float32)
    assert one[0, :3].tolist() == [1.0, 12.0, 0.0]


def test_mxfp4_quantize_keeps_representable_weights_exactly():
    w = torch.tensor(mxfp4.FP4_VALUES * 4).view(2, 32) * torch.tensor([[0.25], [8.0]])  # [2, 32]: one block each
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(w), torch.float32), w)


def test_fp8_dequantizes_as_transformers_does():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = torch.randn(32, 48)
    q, scale_inv = fp8.quantize(w, (16, 16))  # [32, 48] float8, [2, 3]
    want = Fp8Dequantize(None)._dequantize_one(q, scale_inv, output_dtype=torch.float32)
    assert torch.equal(fp8.dequantize(q, scale_inv, (16, 16), torch.float32), want)
    assert ((fp8.dequantize(q, scale_inv, (16, 16), torch.float32) - w).abs() <= w.abs() / 8 + 1e-3).all()
