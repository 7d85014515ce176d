"""The step-time benchmark: every rule through the trainer's step, ratios to BP, a table."""
import dataclasses

import pytest
import torch

from bpfree.benchmark import CASES, PROFILES, benchmark_case, render_markdown, rules_for
from bpfree.rules import list_layer_rules, list_rules


def test_cases_cover_the_issue_models_and_rules():
    assert {"mlp_mnist", "lenet_cifar10", "resnet18_cifar10", "bert_sick"} <= set(CASES)
    assert rules_for(CASES["bert_sick"]) == list_rules()  # block rules need the encoder's blocks
    assert rules_for(CASES["mlp_mnist"]) == list_layer_rules()
    assert set(PROFILES) == {"smoke", "cpu", "gpu"} and PROFILES["gpu"]["cases"] == list(CASES)


def test_benchmark_times_every_rule_with_ratios_and_renders():
    case = dataclasses.replace(CASES["bert_sick"], batch=4, options={**CASES["bert_sick"].options, "depth": 1})
    result = benchmark_case(case, torch.device("cpu"), warmup=1, steps=1, repeats=2,
                            rules=["fa", "kp", "dtp", "lfnn"])
    rules = result["rules"]
    assert list(rules) == ["bp", "fa", "kp", "dtp", "lfnn"]
    assert rules["bp"]["ratio_to_bp"] == 1.0
    for r in rules.values():
        assert "error" not in r, r
        assert r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert len(r["samples_ms"]) == 2 and r["memory_mb"] is not None
    assert rules["fa"]["gpu_target"] == 1.15 and rules["dtp"]["extra_work"]
    record = {"device": "cpu", "device_name": "x", "threads": 1, "dtype": "float32", "warmup": 1, "steps": 1,
              "repeats": 2, "memory": "rss", "environment": {"torch": "t"}, "git": {"commit": "abc"},
              "cases": [result]}
    text = render_markdown({"smoke": record})
    assert "| dtp |" in text and "× BP" in text


def test_a_rule_that_cannot_run_a_model_is_reported_not_fatal():
    case = dataclasses.replace(CASES["mlp_mnist"], batch=4)
    result = benchmark_case(case, torch.device("cpu"), warmup=1, steps=1, repeats=1, rules=["dtp"])
    assert "blocks" in result["rules"]["dtp"]["error"]


def test_peer_ratios_time_our_steps_against_pytorch_and_biotorch_interleaved():
    from bpfree.benchmark import peer_ratios, render_markdown
    pytest.importorskip("biotorch", reason="biotorch not installed: pip install --no-deps -r requirements-parity.txt")
    peers = peer_ratios(torch.device("cpu"), warmup=1, steps=1, repeats=2, batch=8)
    timed = [p for p in peers if "missing" not in p]
    assert [p["peer"] for p in timed] == ["PyTorch", "PyTorch", "biotorch"]
    assert all(p["ratio"] > 0 and p["ratio_min"] <= p["ratio"] * 1.0000001 for p in timed)
    assert [p["peer"] for p in peers if "missing" in p] == ["lfprop"]
    record = {"device": "cpu", "device_name": "x", "threads": 1, "dtype": "float32", "warmup": 1, "steps": 1,
              "repeats": 2, "memory": "rss", "cases": [], "peers": peers}
    text = render_markdown({"smoke": record})
    assert "Against other implementations of the same step" in text and "not timed: lfprop" in text
