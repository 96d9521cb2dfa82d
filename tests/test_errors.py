"""Bad input gets a clear moedeploy error naming the problem, never a stack trace from deep inside."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers as T
from safetensors.torch import load_file, save_file

import moedeploy
from moedeploy import CheckpointError, OptionError, UnsupportedModelError


@pytest.fixture
def copy_of(tiny, tmp_path):
    """A writable copy of a tiny checkpoint, to damage."""

    def make(family="mixtral"):
        dst = tmp_path / f"{family}-copy"
        shutil.copytree(tiny(family), dst)
        return dst

    return make


def rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        moedeploy.load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        moedeploy.load(tmp_path)


def test_directory_without_safetensors(copy_of):
    path = copy_of()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        moedeploy.load(path)


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="config.json cannot be read"):
        moedeploy.load(tmp_path)


def test_dense_model_is_not_moe(tmp_path):
    config = T.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="has no Mixture-of-Experts blocks"):
        moedeploy.load(tmp_path)


def test_missing_expert_tensor_is_named(copy_of):
    path = copy_of()
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    rewrite(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        moedeploy.load(path)


def test_wrongly_shaped_expert_tensor(copy_of):
    path = copy_of("qwen3_moe")
    name = "model.layers.0.mlp.experts.2.up_proj.weight"
    rewrite(path, lambda t: t.__setitem__(name, torch.zeros(5, 32)))
    with pytest.raises(CheckpointError, match=r"has shape \(5, 32\), expected \(24, 32\)"):
        moedeploy.load(path)


def test_wrongly_shaped_fused_expert_tensor(copy_of):
    path = copy_of("gpt_oss")
    name = "model.layers.0.mlp.experts.down_proj"
    rewrite(path, lambda t: t.__setitem__(name, torch.zeros(6, 24, 31)))
    with pytest.raises(CheckpointError, match="experts.down_proj has shape"):
        moedeploy.load(path)


@pytest.mark.parametrize("store", ["host", "disk"])
def test_a_gap_in_the_experts_is_refused_at_load_by_every_store(copy_of, store):
    """A missing expert, or a fused tensor with one expert more than config.json: refused when the model loads,
    from the files' headers. The disk store read experts only when routed to, so it loaded, and a missing
    expert failed mid-run (or never); the extra expert shifted every fused expert's weights, silently."""
    path = copy_of()
    rewrite(path, lambda t: [t.pop(k) for k in list(t) if ".layers.1.block_sparse_moe.experts.5." in k])
    with pytest.raises(CheckpointError, match=r"experts\.5\..* is missing"):
        moedeploy.load(path, expert_memory=0.5, expert_store=store)
    fused = copy_of("gpt_oss")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    rewrite(fused, lambda t: t.__setitem__(name, torch.cat([t[name][:1], t[name]])))
    with pytest.raises(CheckpointError, match="gate_up_proj has shape"):
        moedeploy.load(fused, expert_memory=0.5, expert_store=store)


@pytest.mark.parametrize("name", ["model.layers.0.mlp.router.bias", "model.layers.0.mlp.experts.gate_up_proj_bias",
                                  "model.layers.0.mlp.experts.down_proj_bias"])
def test_gpt_oss_without_a_bias_is_refused(copy_of, name):
    """GPT-OSS's router and experts always have biases (transformers reports them missing); moedeploy loaded
    without them, and its outputs moved by up to 0.3."""
    path = copy_of("gpt_oss")
    rewrite(path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="is missing"):
        moedeploy.load(path)


def test_wrongly_shaped_router(copy_of):
    path = copy_of()
    name = "model.layers.0.block_sparse_moe.gate.weight"
    rewrite(path, lambda t: t.__setitem__(name, torch.zeros(5, 32)))
    with pytest.raises(CheckpointError, match="router tensor .* has shape"):
        moedeploy.load(path)


def test_missing_attention_tensor(copy_of):
    path = copy_of()
    rewrite(path, lambda t: t.pop("model.layers.0.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors .*q_proj"):
        moedeploy.load(path)


def test_truncated_safetensors(copy_of):
    path = copy_of()
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        moedeploy.load(path)


@pytest.mark.parametrize("damage", ["header length", "header json", "offsets"])
def test_corrupt_safetensors_header(copy_of, damage):
    path = copy_of()
    file = path / "model.safetensors"
    data = bytearray(file.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "header length":
        data[:8] = (len(data) * 2).to_bytes(8, "little")
    elif damage == "header json":
        data[8:12] = b"{{{{"
    else:  # the first tensor's byte range no longer matches its dtype and shape
        header = data[8 : 8 + n].decode()
        i = header.index('"data_offsets":[') + len('"data_offsets":[')
        data[8 + i] = ord("9") if chr(data[8 + i]) != "9" else ord("8")
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file .* truncated or corrupt"):
        moedeploy.load(path)


@pytest.mark.parametrize("shape,offsets", [([-2, -2], [0, 16]), ([2.0, 2], [0, 16]), ([2, 2], ["0", "16"]),
                                          ([True, 4], [0, 16]), ([2, 2], [16, 0])])
def test_safetensors_header_with_impossible_shapes_or_offsets(tmp_path, shape, offsets):
    """Shapes and offsets that are not counts (negative, fractional, strings, booleans, reversed) are refused
    when the file is opened, with the file's name, not met later as a TypeError or garbage."""
    import json

    from moedeploy.store.tensorfile import TensorFile

    header = json.dumps({"a": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    file = tmp_path / "x.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(CheckpointError, match="x.safetensors is not a readable safetensors file"):
        TensorFile(file)


def test_index_naming_a_missing_shard(copy_of):
    path = copy_of()
    (path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    with pytest.raises(CheckpointError, match="incomplete"):
        moedeploy.load(path)


@pytest.mark.parametrize("options,message", [
    (dict(gating="fast"), "unknown gating 'fast'"),
    (dict(dtype="int3"), "unknown dtype 'int3'"),
    (dict(backend="triton9"), "unknown expert backend 'triton9'"),
    (dict(gating="static", capacity_factor=-1.0), "capacity must be positive"),
    (dict(gating="static", capacity_factor=1.0, capacity_fraction=0.5), "exactly one of"),
    (dict(capacity_factor=1.25), "applies only to gating='static'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
])
def test_unknown_option_values(tiny, options, message):
    with pytest.raises(OptionError, match=message):
        moedeploy.load(tiny("mixtral"), **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_a_gpu(tiny):
    with pytest.raises(OptionError, match="no CUDA device"):
        moedeploy.load(tiny("mixtral"), device="cuda")


def test_grouped_mm_on_unaligned_sizes(tiny):
    path = tiny("mixtral", hidden_size=36, num_attention_heads=4, num_key_value_heads=2, intermediate_size=22)
    with pytest.raises(OptionError, match="multiples of 16 bytes"):
        moedeploy.load(path, backend="grouped_mm")
    model = moedeploy.load(path)  # auto picks the loop
    assert model.moedeploy.stats()["backend"] == ["loop"]


def test_family_without_adapter_is_refused_when_its_tensors_are_unknown(tmp_path):
    config = T.Ernie4_5_MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=24,
                                  moe_num_experts=6, moe_k=2, moe_layer_start_index=0, pad_token_id=0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="moe_statics.e_score_correction_bias.*needs an adapter"):
        moedeploy.load(tmp_path)


def test_family_without_adapter_is_refused_when_the_guess_differs(tiny, monkeypatch):
    """The generic guess is checked against transformers' block: a wrong rule must not pass."""
    from moedeploy.models.base import Family
    from moedeploy.routing import SoftmaxTopK

    monkeypatch.setattr(Family, "rule", lambda self, config, block: SoftmaxTopK(top_k=2, renormalize=True))
    with pytest.raises(UnsupportedModelError, match="does not reproduce FlexOlmo"):
        moedeploy.load(tiny("flex_olmo"))


def test_checking_a_family_without_adapter_leaves_the_loaded_weights_alone(tiny):
    """The check runs a float32 copy; the loaded layer keeps the dtype that was asked for."""
    import torch

    model = moedeploy.load(tiny("flex_olmo"), dtype="bfloat16")
    layer = next(iter(model.moedeploy.layers.values()))
    assert layer.experts.w_in.dtype == layer.router.weight.dtype == torch.bfloat16
    # Under a budget the bank stays in host memory when the model moves; the check still runs in float32.
    budgeted = moedeploy.load(tiny("flex_olmo"), dtype="bfloat16", expert_memory=0.5)
    assert next(iter(budgeted.moedeploy.layers.values())).experts.w_in.dtype == torch.bfloat16
