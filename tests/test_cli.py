"""The command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moedeploy.cli import main


def run_cli(*args, timeout=300):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "moedeploy.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_json_prints_exactly_one_object(tiny):
    proc = run_cli("generate", "--model", str(tiny("qwen3_moe")), "--prompt", "Dynamic gating sorts tokens",
                   "--max-new-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert isinstance(out["text"], str) and len(out["tokens"]) == out["stats"]["new_tokens"] > 0
    assert out["stats"]["moe"]["moe_layers"] == 2 and out["stats"]["family"] == "qwen_moe"


@pytest.mark.parametrize("family", ["switch_transformers", "mixtral"])
def test_generate_text_in_process(tiny, capsys, family):
    assert main(["generate", "--model", str(tiny(family)), "--prompt", "experts", "--max-new-tokens", "5",
                 "--gating", "static"]) == 0
    captured = capsys.readouterr()
    assert "static gating" in captured.err


def test_errors_are_one_line_and_exit_2(tmp_path):
    proc = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("moedeploy: error:") and "is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_option_value_is_reported(tiny, capsys):
    assert main(["generate", "--model", str(tiny("mixtral")), "--prompt", "x", "--gating", "fast"]) == 2
    assert "unknown gating 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["bench", "decode", "--model", "M", "--rounds", "0"], "argument --rounds: must be at least 1, got 0"),
    (["bench", "decode", "--model", "M", "--new-tokens", "1"], "argument --new-tokens: must be at least 2, got 1"),
    (["bench", "decode", "--model", "M", "--threads", "0"], "--threads takes integers of at least 1"),
    (["bench", "decode", "--model", "M", "--gguf", "model.gguf"], "--gguf takes NAME=FILE"),
    (["bench", "quant", "--text", "/nonexistent.txt"], "--text /nonexistent.txt is not a file"),
    (["bench", "predict", "--parts", "serve", "--requests", "0"], "argument --requests: must be at least 1"),
    (["bench", "offload", "--prefetch", "both"], "--prefetch takes lookahead, sida or none"),
    (["bench", "quant", "--rounds", "0"], "argument --rounds: must be at least 1"),
])
def test_benchmark_options_that_cannot_work_are_refused_at_once(tiny, capsys, args, message):
    """Before any model loads or any round runs: a one-line error naming the option, exit 2, no traceback (they
    were a ZeroDivisionError, a StatisticsError, a ValueError of dict(), or a FileNotFoundError after loading)."""
    args = [str(tiny("qwen3_moe")) if a == "M" else a for a in args]
    try:
        code = main(args)
    except SystemExit as ex:  # argparse's own refusal, and bench decode's
        code = ex.code if isinstance(ex.code, int) else 2
        if not isinstance(ex.code, int):
            print(ex.code, file=sys.stderr)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_checkpoint_without_tokenizer(tiny, tmp_path, capsys):
    import shutil

    dst = tmp_path / "no-tok"
    shutil.copytree(tiny("mixtral"), dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dst / name).unlink(missing_ok=True)
    assert main(["generate", "--model", str(dst), "--prompt", "x"]) == 2
    assert "no usable tokenizer" in capsys.readouterr().err


def test_make_tiny_writes_a_loadable_checkpoint(tmp_path, capsys):
    import moedeploy

    assert main(["make-tiny", "--family", "olmoe", "--out", str(tmp_path / "t")]) == 0
    assert moedeploy.load(tmp_path / "t").moedeploy.family == "qwen_moe"
    assert main(["make-tiny", "--family", "llama", "--out", str(tmp_path / "u")]) == 2
    assert main(["make-tiny", "--family", "qwen3_moe", "--out", str(tmp_path / "w"), "--set", "num_experts=16",
                 "--set", "moe_intermediate_size=32"]) == 0
    layer = next(iter(moedeploy.load(tmp_path / "w").moedeploy.layers.values()))
    assert layer.experts.num_experts == 16 and layer.experts.intermediate_size == 32
    assert main(["make-tiny", "--family", "qwen3_moe", "--out", str(tmp_path / "x"), "--set", "num_experts"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


def test_generate_and_eval_ppl_can_record_a_trace(tiny, tmp_path, capsys):
    from moedeploy.trace import read_trace

    path = str(tiny("qwen3_moe"))
    assert main(["generate", "--model", path, "--prompt", "experts", "--max-new-tokens", "4",
                 "--trace", str(tmp_path / "g.parquet")]) == 0
    generated = read_trace(tmp_path / "g.parquet")
    assert set(generated.phase.tolist()) == {0, 1}  # prefill and decode steps
    text = tmp_path / "t.txt"
    text.write_text("Dynamic gating sorts tokens by expert. " * 8)
    assert main(["eval-ppl", "--model", path, "--text", str(text), "--trace", str(tmp_path / "e.parquet")]) == 0
    assert len(read_trace(tmp_path / "e.parquet").step) > 0


def test_a_decode_rate_needs_two_new_tokens(tiny):
    """The rate is over the tokens after the first (which ends the prompt step): one new token has none."""
    import torch

    from moedeploy import load
    from moedeploy.errors import OptionError
    from moedeploy.timing import decode_rate

    with pytest.raises(OptionError, match="at least 2 new tokens"):
        decode_rate(load(tiny("qwen3_moe")), torch.tensor([[5, 6, 7]]), 1)
