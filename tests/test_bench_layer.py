"""`moedeploy bench layer`: the peak-memory tracker, and a --quick smoke run (no timing assertions)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from moedeploy.bench import layer as bench_layer
from moedeploy.bench.memory import StorageTracker, peak_bytes


def test_tracker_counts_a_known_allocation():
    n = 1 << 18  # 1 MiB of float32
    with StorageTracker() as m:
        a = torch.empty(n)
        b = a.view(2, -1)[0]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        assert m.current == n * 4
        del a, b
        assert m.current == 0
    assert m.peak >= n * 4


def test_tracker_ignores_what_existed_before():
    weight = torch.randn(256, 256)
    x = torch.randn(4, 256)

    def call():
        weight.t()[0].mul_(1.0)  # views of and in-place writes to a pre-existing tensor
        return x @ weight  # [4, 256]: the one new storage

    assert peak_bytes(call) == 4 * 256 * 4


def test_tracker_peak_is_the_largest_live_total():
    def call():
        a = torch.ones(1000)  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # 8000 live again, never 12000
        return c

    assert peak_bytes(call) == 8000


def _run(argv: list[str], capsys) -> tuple[str, dict]:
    parser = argparse.ArgumentParser()
    bench_layer.add_arguments(parser)
    assert bench_layer.run(parser.parse_args(argv)) == 0
    out = capsys.readouterr().out
    return out, json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One --quick --json run shared by the checks below."""
    path = tmp_path_factory.mktemp("bench") / "layer.json"
    parser = argparse.ArgumentParser()
    bench_layer.add_arguments(parser)
    args = parser.parse_args(["--quick", "--json", "--out", str(path)])
    return args, path


def test_quick_json(quick, capsys):
    args, path = quick
    assert bench_layer.run(args) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # --json: exactly one JSON object, nothing else
    report = json.loads(out)
    assert report == json.loads(path.read_text())  # --out wrote the same
    assert {"benchmark", "date", "machine", "config", "settings"} <= report.keys()
    assert {"cores", "cpu", "cpu_capability", "torch", "transformers", "torch_threads"} <= report["machine"].keys()
    assert [s["setting"]["name"] for s in report["settings"]] == ["lm", "mt"]
    for s in report["settings"]:
        assert {"static_tokens", "speedup_at_largest", "memory_ratio_min", "hf_ratio_min", "speedup_target_met",
                "memory_target_met", "hf_target_met", "exact"} <= s["summary"].keys()
        assert s["summary"]["exact"]
        assert [row["tokens"] for row in s["rows"]] == list(report["config"]["tokens"])
        for row in s["rows"]:
            assert {"dynamic_over_static", "dynamic_over_hf_best", "static_over_dynamic_memory", "hf_best"} <= row.keys()
            results = {r["impl"]: r for r in row["results"]}
            assert set(results) == set(bench_layer.IMPLEMENTATIONS)
            assert row["dynamic_exact"] and results["dynamic"]["rel_err"] <= bench_layer.EXACT_RTOL
            assert results["hf_grouped_mm"]["rel_err"] <= bench_layer.EXACT_RTOL
            for r in results.values():
                assert r["skipped"] is None and r["tokens_per_s"] > 0 and r["peak_bytes"] > 0
            assert results["static"]["dropped_fraction"] is not None


def test_table_then_one_json_line(capsys):
    out, report = _run(["--quick", "--setting", "mt", "--tokens", "4"], capsys)
    lines = out.strip().splitlines()
    assert lines[0].startswith("MT:") and any("dyn/static" in line for line in lines)
    assert sum(line.startswith("{") for line in lines) == 1 and lines[-1].startswith("{")
    assert report["config"]["tokens"] == [4]


def test_over_budget_is_reported_not_run(capsys):
    _, report = _run(["--quick", "--json", "--setting", "mt", "--tokens", "64", "--memory-budget-gib", "0.001"], capsys)
    results = {r["impl"]: r for r in report["settings"][0]["rows"][0]["results"]}
    assert results["static"]["skipped"].startswith("dispatch tensors need")
    assert results["static"]["tokens_per_s"] is None
    assert results["dynamic"]["skipped"] is None
    assert report["settings"][0]["rows"][0]["dynamic_over_static"] is None
