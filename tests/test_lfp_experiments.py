"""Pieces the LFP experiments need: per-batch OneCycle, gradient clipping, pruning config."""
import copy

import pytest
import torch

from bpfree.config import ConfigError, resolve_experiment, validate_params
from bpfree.training import build_scheduler, train_run



def run(**changes):
    r = {"dataset": "mnist", "data_seed": 0, "seed": 0, "threads": 1, "device": "cpu",
         "model": {"name": "mlp", "options": {"in_features": 784, "depth": 1, "width": 16}},
         "rule": {"name": "lfp_eps", "options": {}},
         "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
         "schedule": {"name": "onecycle"}, "batch_size": 64, "epochs": 2,
         "train_subset": 256, "test_subset": 128, "val_size": 0, "selection": "final",
         "preprocess": {"normalize": True, "resize": None}, "diagnostics": {"every": 0, "batch": 64}}
    r.update(changes)
    return r


def test_onecycle_is_stepped_per_batch(mnist):
    m = train_run(run(), mnist, "cpu")
    assert m["status"] == "OK"
    lrs = [h["lr"] for h in m["history"]]  # lr at the start of each epoch
    assert lrs[0] == pytest.approx(0.1 / 25)  # OneCycle starts at max_lr / div_factor
    assert lrs[1] > lrs[0]  # warming up over the 4 batches of epoch 1


def test_onecycle_schedule_shape():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, {"name": "onecycle"}, steps_per_epoch=10, epochs=2)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(0.1, rel=1e-3) and lrs[-1] < 1e-3


def test_gradient_clipping_bounds_every_update(mnist):
    a = train_run(run(optimizer={"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0,
                                 "nesterov": False, "clip_grad_norm": 1e-6},
                      schedule={"name": "none"}, epochs=1), mnist, "cpu")
    b = train_run(run(schedule={"name": "none"}, epochs=1), mnist, "cpu")
    assert a["status"] == b["status"] == "OK"
    assert a["history"][0]["train_loss"] != b["history"][0]["train_loss"]


def test_e2_protocol_and_its_cpu_shortening(params):
    gpu = resolve_experiment(params, "E2_cifar10_vgg", "gpu")
    assert gpu["epochs"] == 50 and gpu["optimizer"]["clip_grad_norm"] == 3.0 and not gpu["shortened"]
    cpu = resolve_experiment(params, "E2_cifar10_vgg", "cpu")
    assert cpu["shortened"] and cpu["pruning"]["test_images"] == 500 and cpu["pruning"]["step"] == 0.1
    assert cpu["pruning"]["methods"] == ["global_magnitude", "layer_magnitude", "relevance"]


@pytest.mark.parametrize("path, value, msg", [
    (("pruning", "methods"), ["random"], "pruning.methods[0]"),
    (("pruning", "step"), 1.5, "pruning.step"),
    (("optimizer", "clip_grad_norm"), 0, "clip_grad_norm"),
    (("schedule", "pct_start"), 1.0, "pct_start"),
])
def test_bad_lfp_experiment_params(params, path, value, msg):
    p = copy.deepcopy(params)
    p["experiments"]["E2_cifar10_vgg"][path[0]][path[1]] = value
    with pytest.raises(ConfigError, match=msg.replace("[", r"\[").replace("]", r"\]")):
        validate_params(p)
