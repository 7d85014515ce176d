"""Seed 004 machinery: conservation tracker, full-batch diagnostics, sweeps and derived sets."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bpfree.config import ConfigError, run_configs, validate_params
from bpfree.diagnostics import ConservationTracker, step_gradient_angles, update_gradient_angles
from bpfree.models import build_model
from bpfree.rules import apply_rule
from bpfree.training import device_splits, train_run
from tests.test_training import mlp_run



def _train_tiny(rule: str, *, bias: bool, lr: float, steps: int = 300, seed: int = 0):
    """A 12-16-3 leaky-ReLU net in float64, full batch, plain gradient steps."""
    torch.manual_seed(seed)
    model = build_model("mlp", 3, in_features=12, depth=1, width=16, activation="leaky_relu",
                        bias=bias).double()
    if bias:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear):
                    m.bias.normal_()
    handle = apply_rule(model, rule)
    tracker = ConservationTracker(handle)
    x = torch.randn(48, 12, dtype=torch.float64)
    y = torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return tracker.report()["fc1"]


@pytest.mark.parametrize("rule", ["fa", "bp", "adafa"])
def test_conservation_ratio_holds_at_small_lr_without_bias(rule):
    report = _train_tiny(rule, bias=False, lr=1e-4)
    assert report["neurons"] + report["excluded"] == 16
    assert report["neurons"] >= 12
    assert report["mean_abs_deviation"] < 1e-3, report


@pytest.mark.parametrize("rule", ["fa", "bp"])
def test_conservation_ratio_breaks_with_bias_and_large_lr(rule):
    """The tracker can fail: biases add a term the law does not have."""
    report = _train_tiny(rule, bias=True, lr=0.5)
    assert report["mean_abs_deviation"] > 0.1, report


def test_conservation_tracker_pairs_and_gd_uses_half_norm():
    torch.manual_seed(0)
    model = build_model("mlp", 4, in_features=6, depth=2, width=5, activation="relu", bias=False)
    handle = apply_rule(model, "bp")
    tracker = ConservationTracker(handle)
    assert [name for name, _, _ in tracker.pairs] == ["fc1", "fc2"]
    with torch.no_grad():
        model.fc2.weight.mul_(2.0)  # outgoing of fc1 neurons x2 -> 1/2||.||^2 grows by 3/2 ||.||^2_0
    rep = tracker.report()
    assert rep["fc1"]["excluded"] == 0  # outgoing moved; incoming did not: ratio 0
    assert rep["fc1"]["mean_abs_deviation"] == pytest.approx(1.0)
    assert rep["fc1"]["sum_d_incoming"] == 0.0
    w0 = model.fc2.weight / 2.0
    expected = 1.5 * (w0.double() ** 2).sum().item()
    assert math.isclose(rep["fc1"]["sum_d_outgoing"], expected, rel_tol=1e-6)


def test_conservation_excludes_neurons_that_did_not_move():
    torch.manual_seed(0)
    model = build_model("mlp", 3, in_features=4, depth=1, width=3, activation="leaky_relu", bias=False)
    handle = apply_rule(model, "fa")
    tracker = ConservationTracker(handle)
    rep = tracker.report()["fc1"]
    assert rep["neurons"] == 0 and rep["excluded"] == 3 and math.isnan(rep["mean_abs_deviation"])


@pytest.mark.parametrize("rule", ["fa", "usf", "bp"])
def test_step_gradient_angles_match_the_two_pass_measure(rule):
    torch.manual_seed(1)
    model = build_model("mlp", 10, in_features=20, depth=2, width=16, activation="leaky_relu")
    handle = apply_rule(model, rule)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    fast = step_gradient_angles(model, handle, F.cross_entropy, x, y)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))  # untouched
    slow = update_gradient_angles(model, handle, F.cross_entropy, x, y)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert fast[name] == pytest.approx(slow[name], abs=1e-3)


# --------------------------------------------------------------------------- sweeps and draws
def test_b2_width_sweep_runs_cover_every_width_rule_and_repeat(params):
    runs = run_configs(params, "B2_noisy_mnist_width", "cpu")
    assert len(runs) == 10 * 4 * 6
    widths = {r["model"]["options"]["width"] for r in runs}
    assert widths == {15, 30, 45, 60, 75, 100, 125, 150, 175, 200}
    first = runs[0]
    assert first["batch_size"] >= first["train_data"]["size"]  # full batch
    assert first["model"]["options"]["bias"] is False
    assert [r["seed"] for r in runs[:40]] == [0] * 40  # repeat-major order


def test_label_noise_draws_differ_per_repeat_and_match_across_rules(params, mnist):
    runs = run_configs(params, "B2_noisy_mnist_width", "smoke")
    extra_seed = copy.deepcopy(runs[0])
    extra_seed["seed"] = extra_seed["train_data"]["seed"] = 1
    runs.append(extra_seed)
    draws = {}
    for run in runs:
        images = device_splits(mnist, run, torch.device("cpu"))
        assert images.draw["flipped"] == round(0.2 * run["train_data"]["size"])
        draws[(run["rule"]["name"], run["model"]["options"]["width"], run["seed"])] = images.y_train
    base = draws[("bp", 15, 0)]
    for (rule, width, seed), labels in draws.items():
        if seed == 0:
            assert torch.equal(labels, base), (rule, width)
    assert not torch.equal(draws[("bp", 15, 1)], base)


def test_noisy_subset_flips_exactly_the_recorded_labels(mnist):
    run = mlp_run(seed=3, val_size=0, train_subset=None, test_subset=None,
                  preprocess={"normalize": False, "resize": None},
                  train_data={"kind": "noisy_subset", "size": 500, "flip_fraction": 0.2, "seed": 3})
    images = device_splits(mnist, run, torch.device("cpu"))
    clean = device_splits(mnist, {**run, "train_data": {**run["train_data"], "flip_fraction": 0.0}},
                          torch.device("cpu"))
    assert torch.equal(images.x_train, clean.x_train)  # same images, only labels differ
    assert int((images.y_train != clean.y_train).sum()) == 100
    assert len(images.y_test) == 10000  # the test set stays clean and complete


def test_k_class_subsets_are_drawn_per_repeat_on_mnist(mnist):
    def draw(seed, k=4):
        run = mlp_run(seed=seed, val_size=100, train_subset=None, test_subset=None,
                      train_data={"kind": "k_class", "k": k, "seed": seed})
        return device_splits(mnist, run, torch.device("cpu"))
    a, b, c = draw(0), draw(0), draw(1)
    assert a.num_classes == 4 and a.draw["classes"] == b.draw["classes"]
    assert a.draw["classes"] != c.draw["classes"]
    for images in (a, c):
        assert set(images.y_train.unique().tolist()) == {0, 1, 2, 3}
        assert set(images.y_test.unique().tolist()) == {0, 1, 2, 3}
    # every kept test image belongs to one of the drawn classes, remapped in sorted order
    original = mnist.y_test
    kept = torch.isin(original, torch.tensor(a.draw["classes"]))
    assert len(a.y_test) == int(kept.sum())
    remapped = torch.tensor([a.draw["classes"].index(int(v)) for v in original[kept]])
    assert torch.equal(a.y_test, remapped)
    assert len(a.y_val) == 100


def test_full_batch_run_logs_curves_every_five_epochs(mnist):
    run = {
        "dataset": "mnist", "data_seed": 0, "seed": 0, "threads": 1, "device": "cpu",
        "model": {"name": "mlp", "options": {"in_features": 784, "depth": 1, "width": 20,
                                             "activation": "leaky_relu", "bias": False,
                                             "init": "normal_inverse_width"}},
        "rule": {"name": "fa", "options": {}},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.05, "weight_decay": 0.0, "nesterov": False},
        "schedule": {"name": "multistep", "milestones": [10], "gamma": 0.1},
        "batch_size": 300, "epochs": 12, "val_size": 0, "selection": "final",
        "test_subset": 300, "train_subset": None, "log_every": 5,
        "preprocess": {"normalize": False, "resize": None},
        "train_data": {"kind": "noisy_subset", "size": 300, "flip_fraction": 0.2, "seed": 0},
        "diagnostics": {"every": 5, "batch": 300, "conservation": True},
    }
    m = train_run(run, mnist, "cpu")
    curves = m["curves"]
    assert curves["epoch"] == [5, 10, 12]  # every 5 epochs and the last one
    assert curves["diagnostics_epoch"] == [0, 5, 10]
    assert curves["lr"] == [0.05, 0.05, 0.005]
    assert curves["conservation_deviation/fc1"][0] is None  # nothing accumulated at epoch 0
    assert all(v is not None for v in curves["conservation_deviation/fc1"][1:])
    assert set(curves) >= {"weight_feedback_angle_deg/classifier", "update_gradient_angle_deg/fc1",
                           "test_loss", "train_loss"}
    assert len(m["history"]) == 1 and m["history"][0]["epoch"] == 12
    assert m["epochs_completed"] == 12  # not the length of the cut history (it said 1)
    assert m["selected_test_acc"] == m["history"][0]["test_acc"]
    assert m["train_data_draw"] == {"kind": "noisy_subset", "seed": 0, "flipped": 60}


# --------------------------------------------------------------------------- config errors
def _b2(params):
    return copy.deepcopy(params)


def expect(params, *fragments):
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    for frag in fragments:
        assert frag in str(info.value), (frag, str(info.value))


def test_sweep_of_an_unknown_model_option_is_rejected(params):
    p = _b2(params)
    p["experiments"]["B2_noisy_mnist_width"]["sweep"]["param"] = "model.options.widht"
    expect(p, "experiments.B2_noisy_mnist_width.sweep.param", "model.options.width")


def test_sweep_of_another_section_is_rejected(params):
    p = _b2(params)
    p["experiments"]["B2_noisy_mnist_width"]["sweep"]["param"] = "optimizer.lr"
    expect(p, "sweep.param", "model.options.<option>")


def test_bad_train_data_is_rejected(params):
    p = _b2(params)
    p["experiments"]["B2_noisy_mnist_width"]["train_data"]["flip_fraction"] = 1.5
    expect(p, "train_data.flip_fraction", "[0, 1]")
    p = _b2(params)
    p["experiments"]["B2_noisy_mnist_width"]["train_data"] = {"kind": "noisy", "size": 10}
    expect(p, "train_data.kind", "noisy_subset", "k_class")


def test_skip_needs_a_reason(params):
    p = _b2(params)
    p["profiles"]["cpu"]["B5_cifar100_lenet_k"] = {"skip": ""}
    expect(p, "profiles.cpu.B5_cifar100_lenet_k.skip", "reason")


def test_duplicate_sweep_values_are_rejected(params):
    p = _b2(params)
    p["profiles"]["smoke"]["B2_noisy_mnist_width"]["sweep_values"] = [15, 15]
    expect(p, "sweep_values", "unique")


def test_skipped_experiments_and_shortened_sweeps_are_recorded(params):
    from bpfree.config import resolve_experiment
    smoke = resolve_experiment(params, "B2_noisy_mnist_width", "smoke")
    assert smoke["shortened"] and any("width in [15, 30]" in d for d in smoke["deviations"])
    assert resolve_experiment(params, "B2_noisy_mnist_width", "cpu")["shortened"] is False
    assert resolve_experiment(params, "B5_cifar100_lenet_k", "cpu")["skip"]
    assert resolve_experiment(params, "B5_cifar100_lenet_k", "gpu").get("skip") is None
