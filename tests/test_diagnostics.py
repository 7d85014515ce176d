"""Alignment diagnostics: one definition, and no side effects on the run being measured."""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import tiny_options
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree.diagnostics import alignment_report, angle_degrees, update_gradient_angles, weight_feedback_angles

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # 2 workers x N intra-op threads on 2 cores is ~5x slower

RULES = bpfree.list_layer_rules()  # block-level rules: tests/test_tp_dtp_lra.py


def test_angle_degrees_basics():
    a = torch.tensor([1.0, 0.0, 0.0])
    assert angle_degrees(a, a) == pytest.approx(0.0, abs=1e-6)
    assert angle_degrees(a, torch.tensor([0.0, 2.0, 0.0])) == pytest.approx(90.0)
    assert angle_degrees(a, -3 * a) == pytest.approx(180.0)
    assert angle_degrees(a, torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(45.0)
    # scale invariant, shape agnostic (tensors are flattened), float32 in, float out
    w = torch.randn(4, 3, 2, 2)
    b = torch.randn(4, 3, 2, 2)
    assert angle_degrees(5 * w, b) == pytest.approx(angle_degrees(w, b))
    assert angle_degrees(w, b.reshape(-1)) == pytest.approx(angle_degrees(w, b))
    assert isinstance(angle_degrees(w, b), float)
    assert math.isnan(angle_degrees(torch.zeros(3), a))
    # nearly parallel vectors: clamping keeps acos defined
    assert angle_degrees(w, w * (1 + 1e-12)) == pytest.approx(0.0, abs=1e-5)


def net(dropout=0.0):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(dropout),
        nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 4),
    )


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 4, (8,), generator=g)


def test_weight_feedback_angles_per_rule():
    torch.manual_seed(0)
    model = net()
    with bpfree.apply_rule(model, "bp") as handle:
        angles = weight_feedback_angles(handle)
        assert set(angles) == {"0", "5", "8"}
        assert all(v == pytest.approx(0.0, abs=1e-5) for v in angles.values())
    with bpfree.apply_rule(model, "fa") as handle:
        angles = weight_feedback_angles(handle)
        assert set(angles) == {"0", "5", "8"}
        assert angles["5"] == pytest.approx(90, abs=15)  # independent random tensors
    with bpfree.apply_rule(model, "usf") as handle:
        assert all(v < 60 for v in weight_feedback_angles(handle).values())  # sign-concordant


def test_dfa_has_no_weight_feedback_angle_even_when_shapes_coincide():
    """B_l is (in_features, out_dim): for Linear(10, 10) under a 10-way output it has W's
    shape by coincidence, but it is not a stand-in for W, so no angle is reported."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 10))
    handle = bpfree.apply_rule(model, "dfa")
    model(torch.randn(3, 4)).sum().backward()
    assert model[2].dfa_feedback.shape == model[2].weight.shape
    assert weight_feedback_angles(handle) == {}


def _state(model, handle):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "rng": torch.get_rng_state(),
        "rule_rng": {k: v.clone() for k, v in handle.rule.private_rng_states().items()},
    }


def _assert_same_state(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), "parameters changed"
    for x, y in zip(a["grads"], b["grads"]):
        assert (x is None and y is None) or torch.equal(x, y), "gradients changed"
    assert a["buffers"].keys() == b["buffers"].keys(), "buffers added or removed"
    assert all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"]), "buffers changed"
    assert torch.equal(a["rng"], b["rng"]), "global RNG advanced"
    assert a["rule_rng"].keys() == b["rule_rng"].keys()
    assert all(torch.equal(a["rule_rng"][k], b["rule_rng"][k]) for k in a["rule_rng"]), "rule RNG advanced"


def _train(model, handle, steps, start=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for s in range(start, start + steps):
        x, y = data(100 + s)
        opt.zero_grad()
        handle.add_local_loss(F.cross_entropy(model(x), y), y).backward()
        opt.step()
        handle.after_step()


SEEDABLE = [r for r in RULES if "seed" in bpfree.rules.get_rule_class(r).defaults]
REPORT_CASES = [(r, False) for r in RULES] + [(r, True) for r in SEEDABLE]


@pytest.mark.parametrize("warm", [False, True], ids=["fresh", "after_step"])
@pytest.mark.parametrize("rule, seeded", REPORT_CASES, ids=[f"{r}-{'seeded' if s else 'global_rng'}" for r, s in REPORT_CASES])
def test_alignment_report_is_side_effect_free(rule, seeded, warm):
    options = {"seed": 3} if seeded else {}

    def run(with_report):
        torch.manual_seed(0)
        model = net(dropout=0.3)
        handle = bpfree.apply_rule(model, rule, **options, **tiny_options(rule))
        if warm:
            _train(model, handle, 2)
            # leave some gradients in place: the report must not clobber them
            x, y = data(50)
            handle.add_local_loss(F.cross_entropy(model(x), y), y).backward()
        report = None
        if with_report:
            before = _state(model, handle)
            report = alignment_report(model, handle, F.cross_entropy, *data(7))
            _assert_same_state(before, _state(model, handle))
        # the run continues exactly as if no report had been taken
        _train(model, handle, 2, start=10)
        return [p.detach().clone() for p in model.parameters()], torch.rand(4), report

    plain_params, plain_rng, _ = run(False)
    params, rng, report = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain_params, params))
    assert torch.equal(plain_rng, rng)
    assert set(report) == {"weight_feedback_angle_deg", "update_gradient_angle_deg"}
    assert set(report["update_gradient_angle_deg"]) == {"0", "5", "8"}


@pytest.mark.parametrize("rule", ["bp", "adafa"])
def test_bp_update_gradient_angle_is_zero_with_dropout(rule):
    torch.manual_seed(1)
    model = net(dropout=0.5)
    model.train()
    handle = bpfree.apply_rule(model, rule)
    x, y = data(2)
    angles = update_gradient_angles(model, handle, F.cross_entropy, x, y)
    assert set(angles) == {"0", "5", "8"}
    assert all(v < 1e-4 for v in angles.values()), angles
    # not vacuous: two passes with fresh dropout masks give clearly different gradients
    grads = []
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(model[5].weight.grad.clone())
    assert angle_degrees(*grads) > 5


def test_update_gradient_angles_for_feedback_rules():
    torch.manual_seed(2)
    model = net()
    handle = bpfree.apply_rule(model, "fa")
    angles = update_gradient_angles(model, handle, F.cross_entropy, *data(3))
    assert angles["8"] == pytest.approx(0.0, abs=1e-4)  # top layer: true gradient
    assert angles["0"] > 20 and angles["5"] > 20  # random feedback below


def test_report_on_eval_mode_model_keeps_mode():
    torch.manual_seed(3)
    model = net(dropout=0.5).eval()
    handle = bpfree.apply_rule(model, "brsf")
    alignment_report(model, handle, F.cross_entropy, *data(4))
    assert not model.training and not any(m.training for m in model.modules())
