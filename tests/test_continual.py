"""Split-MNIST forgetting benchmark, on-device augmentation, step schedule, profile model options."""
import copy

import pytest
import torch

from bpfree.config import ConfigError, resolve_experiment, run_configs, validate_params
from bpfree.continual import task_images, train_continual
from bpfree.data import split_mnist_tasks
from bpfree.loop import augment_batch
from bpfree.training import build_optimizer, build_scheduler



def tiny_run(rule="bp", seed=0):
    return {"dataset": "mnist", "seed": seed, "threads": 1, "device": "cpu", "data_seed": 0,
            "model": {"name": "mlp", "options": {"in_features": 784, "depth": 1, "width": 16}},
            "rule": {"name": rule, "options": {}},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False},
            "schedule": {"name": "step", "step_size": 1, "gamma": 0.1}, "batch_size": 512, "epochs": 1,
            "val_size": 0, "selection": "final", "preprocess": {"normalize": True, "resize": None},
            "train_subset": None, "test_subset": None, "diagnostics": {"every": 0, "batch": 1},
            "continual": {"tasks": 5, "classes_per_task": 2}}


def test_task_images_use_one_shared_binary_head(mnist):
    images = task_images(mnist, (7, 3), seed=0, device="cpu")
    assert images.num_classes == 2
    assert set(images.y_train.unique().tolist()) == {0, 1}
    test_labels = mnist.y_test[torch.isin(mnist.y_test, torch.tensor([7, 3]))]
    assert torch.equal(images.y_test, (test_labels == 3).long())  # 7 -> 0, 3 -> 1
    n = len(images.y_train) + len(images.y_val)
    assert abs(len(images.y_val) - 0.2 * n) <= 1


@pytest.mark.parametrize("rule", ["bp", "backman"])
def test_continual_run_reports_matrix_drops_and_mean(mnist, rule):
    m = train_continual(tiny_run(rule), mnist, "cpu")
    assert m["status"] == "OK"
    assert m["tasks"] == [list(t) for t in split_mnist_tasks(0)]
    matrix = m["task_accuracy"]
    assert len(matrix) == 5 and all(len(row) == 5 for row in matrix)
    for t in range(4):
        assert m["scalars"][f"task_drop_pct/{t + 1}"] == pytest.approx(matrix[4][t] - matrix[t][t])
    assert m["scalars"]["mean_task_acc_pct"] == pytest.approx(sum(matrix[4]) / 5)
    assert matrix[0][0] > 90.0  # one epoch learns a digit pair
    assert [h["lr"] for h in m["history"]] == [0.05] * 5  # fresh optimiser and schedule per task


def test_task_order_is_drawn_per_seed(mnist):
    a, b = train_continual(tiny_run(seed=0), mnist, "cpu"), train_continual(tiny_run(seed=1), mnist, "cpu")
    assert a["tasks"] != b["tasks"]
    assert sorted(c for t in a["tasks"] for c in t) == list(range(10))


def test_random_crop_and_flip_are_seeded_shifts():
    x = torch.arange(3 * 2 * 5 * 5, dtype=torch.float32).reshape(3, 2, 5, 5)
    a = augment_batch(x, 2, True, torch.Generator().manual_seed(0))
    b = augment_batch(x, 2, True, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    for i in range(3):  # every output is a shifted (maybe mirrored) window of its own input
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        windows = [padded[:, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(-1)) for w in windows)
    assert torch.equal(augment_batch(x, 0, False, torch.Generator()), x)


def test_step_schedule_divides_every_step_size_epochs():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], {"name": "sgd", "lr": 1.0})
    sched = build_scheduler(opt, {"name": "step", "step_size": 13, "gamma": 0.1})
    opt.step()  # torch expects an optimiser step (after the scheduler wraps it) before sched.step()
    lrs = []
    for _ in range(26):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs[12] == 1.0 and lrs[13] == pytest.approx(0.1) and lrs[25] == pytest.approx(0.1)
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_profile_model_options_are_validated_and_recorded(params):
    r = resolve_experiment(params, "C2_mnist_depth", "cpu")
    assert r["model"]["options"]["width"] == 256 and r["shortened"]
    runs = run_configs(params, "C2_mnist_depth", "cpu")
    assert {x["model"]["options"]["depth"] for x in runs} == {2, 4, 6, 8, 10, 12}
    p = copy.deepcopy(params)
    p["profiles"]["cpu"]["C2_mnist_depth"]["model_options"] = {"widht": 3}
    with pytest.raises(ConfigError, match="profiles.cpu.C2_mnist_depth.model_options.widht"):
        validate_params(p)


def test_step_schedule_needs_step_size(params):
    p = copy.deepcopy(params)
    del p["experiments"]["C2_mnist_depth"]["schedule"]["step_size"]
    with pytest.raises(ConfigError, match="schedule.step_size"):
        validate_params(p)
