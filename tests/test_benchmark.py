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
        assert r["flops"] > 0 and r["flops_ratio_to_bp"] == r["flops"] / rules["bp"]["flops"]
    assert rules["fa"]["gpu_target"] == 1.15 and rules["dtp"]["extra_work"]
    record = {"device": "cpu", "device_name": "x", "threads": 1, "dtype": "float32", "warmup": 1, "steps": 1,
              "repeats": 2, "memory": "rss", "environment": {"torch": "t"}, "git": {"commit": "abc"},
              "cases": [result]}
    text = render_markdown({"smoke": record})
    assert "| dtp |" in text and "× BP" in text and "products × BP" in text


def test_products_count_each_rules_matrix_work():
    """The 'products x BP' column, against a count by hand on a small MLP: WM adds its two
    mirror products per layer (noise batch 64), LFP-eps none, the split LFP its sign pieces."""
    from bpfree.benchmark import step_flops
    case = dataclasses.replace(CASES["mlp_mnist"], batch=16, options={"in_features": 784, "widths": [32, 16]})
    sizes = [784 * 32, 32 * 16, 16 * 10]  # in x out per layer
    unit = [2 * 16 * s for s in sizes]  # one batch-sized product through each layer
    cpu = torch.device("cpu")
    bp = step_flops(case, "bp", cpu)
    assert bp == 2 * unit[0] + 3 * unit[1] + 3 * unit[2]  # no product sends to the data
    assert step_flops(case, "lfp_eps", cpu) == bp
    assert step_flops(case, "wm", cpu) == bp + sum(2 * 2 * 64 * s for s in sizes)
    # the data is signed: z, 4 sign products and 4 collects; behind a ReLU: z+ and z- (their sum is
    # z), 2 sends and 2 collects
    assert step_flops(case, "lfp_ab", cpu) == 9 * unit[0] + 6 * unit[1] + 6 * unit[2]


def test_a_short_step_is_timed_in_samples_of_enough_steps():
    """min_sample_ms: a 2 ms step is timed 100 steps a sample for 200 ms samples; a long step
    keeps the profile's count."""
    from bpfree.benchmark import _steps_per_sample
    assert _steps_per_sample(5, 2.0, 200) == 100 and _steps_per_sample(5, 80.0, 200) == 5
    assert _steps_per_sample(5, 2.0, 0.0) == 5
    case = dataclasses.replace(CASES["mlp_mnist"], batch=4)
    result = benchmark_case(case, torch.device("cpu"), warmup=2, steps=1, repeats=1, rules=["fa"],
                            min_sample_ms=20.0)
    bp_ms = result["rules"]["bp"]["median_ms"]
    assert result["steps_per_sample"] > 1 and result["steps_per_sample"] * bp_ms > 5.0  # about 20 ms


def test_a_rule_that_cannot_run_a_model_is_reported_not_fatal():
    case = dataclasses.replace(CASES["mlp_mnist"], batch=4)
    result = benchmark_case(case, torch.device("cpu"), warmup=1, steps=1, repeats=1, rules=["dtp"])
    assert "blocks" in result["rules"]["dtp"]["error"]


def test_peer_ratios_time_our_steps_against_pytorch_and_biotorch_interleaved():
    from bpfree.benchmark import peer_ratios, render_markdown
    pytest.importorskip("biotorch", reason="biotorch not installed: pip install --no-deps -r requirements-parity.txt")
    peers = peer_ratios(torch.device("cpu"), warmup=1, steps=1, repeats=2, batch=8)
    timed = [p for p in peers if "missing" not in p]
    assert [p["peer"] for p in timed] == ["PyTorch", "PyTorch", "biotorch", "biotorch"]
    assert "channels_last" in timed[3]["pair"] and "channels_last" not in timed[2]["pair"]
    assert all(p["ratio"] > 0 and p["ratio_min"] <= p["ratio"] * 1.0000001 for p in timed)
    assert [p["peer"] for p in peers if "missing" in p] == ["lfprop"]
    record = {"device": "cpu", "device_name": "x", "threads": 1, "dtype": "float32", "warmup": 1, "steps": 1,
              "repeats": 2, "memory": "rss", "cases": [], "peers": peers}
    text = render_markdown({"smoke": record})
    assert "Against other implementations of the same step" in text and "not timed: lfprop" in text
