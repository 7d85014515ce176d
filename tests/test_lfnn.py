"""Leader-Follower networks: worker losses, leader choice, locality and the follower pull."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from bpfree.models import build_model
from bpfree.rules import apply_rule
from bpfree.rules.lfnn import select_leaders, worker_prediction_losses
from bpfree.loop import optimisation_step


def _mlp(seed=0, widths=(16, 8), dtype=torch.float64):
    torch.manual_seed(seed)
    layers, features = [], 6
    for w in widths:
        layers += [nn.Linear(features, w), nn.ReLU()]
        features = w
    layers.append(nn.Linear(features, 3))
    return nn.Sequential(*layers).to(dtype)


def _batch(seed=1, n=20, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _step_grads(model, handle, x, y):
    for p in model.parameters():
        p.grad = None
    handle.add_local_loss(F.cross_entropy(model(x), y), y).backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}


def test_worker_losses_match_a_per_worker_loop():
    g = torch.Generator().manual_seed(0)
    pooled = torch.randn(7, 4, 3, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(4, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 5, (7,), generator=g)
    got = worker_prediction_losses(pooled, weight, bias, targets)
    for w in range(4):
        expected = F.cross_entropy(pooled[:, w] @ weight[w] + bias[w], targets)
        torch.testing.assert_close(got[w], expected)


def test_leaders_are_exactly_the_delta_fraction_with_the_lowest_loss():
    losses = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    for delta, expected in [(0.1, [1]), (0.3, [1, 5, 3]), (0.5, [1, 5, 3, 7, 2])]:
        assert select_leaders(losses, delta).tolist() == expected
    assert sorted(select_leaders(losses, 1.0).tolist()) == list(range(10))
    assert len(select_leaders(losses, 0.01)) == 1  # at least one leader


def test_rule_picks_the_lowest_loss_workers_of_each_layer():
    model = _mlp()
    handle = apply_rule(model, "lfnn_l", workers=4, delta=0.5)
    x, y = _batch()
    _step_grads(model, handle, x, y)
    for layer in handle.layers[:-1]:
        sel = handle.rule.leader_selection(layer)
        assert sel is not None and len(sel["leaders"]) == 2
        order = torch.argsort(sel["losses"], stable=True)[:2]
        assert sel["leaders"].tolist() == order.tolist()
        assert layer.lf_readout_weight.shape == (4, layer.out_features // 4, 3)


def test_delta_one_makes_every_worker_a_leader_and_no_alignment_loss():
    model = _mlp()
    handle = apply_rule(model, "lfnn_l", workers=4, delta=1.0)
    x, y = _batch()
    model(x)
    local_full = handle.local_loss(y)
    for layer in handle.layers[:-1]:
        assert sorted(handle.rule.leader_selection(layer)["leaders"].tolist()) == [0, 1, 2, 3]
    handle.remove()
    model2 = _mlp()
    handle2 = apply_rule(model2, "lfnn_l", workers=4, delta=1.0, alignment_weight=0.0)
    model2(x)
    torch.testing.assert_close(handle2.local_loss(y), local_full)  # nothing left to align


def test_lfnn_l_hidden_gradient_ignores_later_layers():
    """No error crosses a layer: changing the layers above leaves a hidden layer's gradient."""
    x, y = _batch()
    model = _mlp()
    handle = apply_rule(model, "lfnn_l", workers=4, delta=0.5)
    first = _step_grads(model, handle, x, y)
    with torch.no_grad():
        model[2].weight.mul_(-3.0).add_(0.5)  # the second hidden layer
        model[4].weight.normal_()  # the head
    second = _step_grads(model, handle, x, y)
    for name in ("0.weight", "0.bias", "0.lf_readout_weight", "0.lf_readout_bias"):
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert not torch.equal(first["2.weight"], second["2.weight"])


def test_lfnn_l_equals_a_float64_reference_from_the_equations():
    """Leaders: their read-out cross-entropy; followers: MSE to the nearest leader; head: global CE."""
    x, y = _batch()
    model = _mlp(widths=(8,))
    handle = apply_rule(model, "lfnn_l", workers=4, delta=0.5)
    grads = _step_grads(model, handle, x, y)
    lin, head = model[0], model[2]
    W = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    R, c = lin.lf_readout_weight.detach(), lin.lf_readout_bias.detach()
    out = F.relu(x @ W.t() + b).reshape(len(x), 4, 2)
    losses = torch.stack([F.cross_entropy(out[:, w].detach() @ R[w] + c[w], y) for w in range(4)])
    leaders = torch.argsort(losses, stable=True)[:2].tolist()
    followers = [w for w in range(4) if w not in leaders]
    total = sum(F.cross_entropy(out[:, w] @ R[w] + c[w], y) for w in leaders)
    for f in followers:
        dist = [((out[:, f] - out[:, l]) ** 2).sum() for l in leaders]
        nearest = leaders[int(torch.stack(dist).argmin())]
        total = total + ((out[:, f] - out[:, nearest].detach()) ** 2).mean()
    total.backward()
    torch.testing.assert_close(grads["0.weight"], W.grad)
    torch.testing.assert_close(grads["0.bias"], b.grad)
    Hd = F.relu(x @ lin.weight.t() + lin.bias).detach().requires_grad_(False)
    Wh = head.weight.detach().clone().requires_grad_(True)
    F.cross_entropy(Hd @ Wh.t() + head.bias.detach(), y).backward()
    torch.testing.assert_close(grads["2.weight"], Wh.grad)


def test_lfnn_followers_get_no_global_error_and_leaders_get_backprop():
    x, y = _batch()
    model = _mlp(widths=(8,))
    reference = _mlp(widths=(8,))
    handle = apply_rule(model, "lfnn", workers=4, delta=0.5, alignment_weight=0.0)
    grads = _step_grads(model, handle, x, y)
    F.cross_entropy(reference(x), y).backward()
    leaders = handle.rule.leader_selection(model[0])["leaders"].tolist()
    rows = torch.zeros(8, dtype=torch.bool)
    for w in leaders:
        rows[2 * w:2 * w + 2] = True
    torch.testing.assert_close(grads["0.weight"][rows], reference[0].weight.grad[rows])
    assert torch.count_nonzero(grads["0.weight"][~rows]) == 0
    torch.testing.assert_close(grads["2.weight"], reference[2].weight.grad)  # head: plain BP


def test_lfnn_backward_without_local_loss_is_a_clear_error():
    model = _mlp()
    apply_rule(model, "lfnn", workers=4)
    x, y = _batch()
    with pytest.raises(RuntimeError, match="local_loss"):
        F.cross_entropy(model(x), y).backward()


def test_followers_move_toward_their_leaders_under_follower_updates_only():
    x, y = _batch(n=64)
    model = _mlp(widths=(16,))
    handle = apply_rule(model, "lfnn_l", workers=8, delta=0.25, prediction_weight=0.0)
    layer = model[0]
    optimizer = torch.optim.SGD([layer.weight, layer.bias], lr=0.05)
    values = []
    for _ in range(20):
        optimizer.zero_grad()
        model(x)
        alignment = handle.local_loss(y)  # prediction_weight 0: the followers' pull alone
        alignment.backward()
        for leader in handle.rule.leader_selection(layer)["leaders"].tolist():
            rows = slice(2 * leader, 2 * leader + 2)
            assert torch.count_nonzero(layer.weight.grad[rows]) == 0  # leaders do not move
        optimizer.step()
        values.append(alignment.item())
    assert values[-1] < 0.75 * values[0]
    assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


def test_conv_workers_are_groups_of_filters():
    torch.manual_seed(0)
    model = build_model("lenet_cifar", num_classes=10)
    handle = apply_rule(model, "lfnn_l", workers=8, delta=0.5)
    assert model.conv1.lf_readout_weight.shape == (8, 4, 10)  # 32 filters -> 8 workers of 4
    assert model.fc1.lf_readout_weight.shape == (8, 32, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    optimisation_step(model, handle, optimizer, x, y)
    assert len(handle.rule.leader_selection(model.conv2)["leaders"]) == 4  # 8 workers of 8 filters
    handle.remove()
    assert not any("lf_readout" in k for k in model.state_dict())


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "workers"),
    ({"delta": 0.0}, "delta"),
    ({"delta": 1.5}, "delta"),
    ({"alignment_weight": -1}, "alignment_weight"),
    ({"assignment": "random"}, "assignment"),
    ({"activation": "tanh"}, "activation"),
    ({"workers": 5}, "equal workers"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        apply_rule(_mlp(), "lfnn_l", **options)


def test_model_without_a_linear_head_or_hidden_layer_is_rejected():
    with pytest.raises(ValueError, match="hidden"):
        apply_rule(nn.Sequential(nn.Linear(4, 3)), "lfnn")
    with pytest.raises(ValueError, match="output head"):
        apply_rule(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Conv2d(8, 3, 1)), "lfnn")


@pytest.mark.parametrize("rule", ["lfnn", "lfnn_l"])
def test_training_through_the_trainer_learns_a_separable_task(rule):
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    model = _mlp(widths=(32, 16), dtype=torch.float32)
    handle = apply_rule(model, rule, workers=4, delta=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimisation_step(model, handle, optimizer, x, y)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85


def test_joint_leader_readout_matches_a_float64_reference():
    """leader_readout='joint': per-worker read-outs learn on detached outputs (ranking only);
    the leaders learn together through one read-out of the layer, followers' units detached."""
    x, y = _batch()
    model = _mlp(widths=(8,))
    handle = apply_rule(model, "lfnn_l", workers=4, delta=0.5, leader_readout="joint",
                        alignment_weight=0.0)
    grads = _step_grads(model, handle, x, y)
    lin = model[0]
    W = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    J, j = lin.lf_joint_weight.detach(), lin.lf_joint_bias.detach()
    out = F.relu(x @ W.t() + b)
    leaders = handle.rule.leader_selection(lin)["leaders"].tolist()
    keep = torch.zeros(8, dtype=torch.bool)
    for w in leaders:
        keep[2 * w:2 * w + 2] = True
    mixed = torch.where(keep, out, out.detach())
    F.cross_entropy(mixed @ J + j, y).backward()
    torch.testing.assert_close(grads["0.weight"], W.grad)
    torch.testing.assert_close(grads["0.bias"], b.grad)
    assert torch.count_nonzero(grads["0.weight"][~keep]) == 0
    assert grads["0.lf_joint_weight"] is not None and grads["0.lf_readout_weight"] is not None


def test_joint_readout_is_for_lfnn_l_only():
    with pytest.raises(ValueError, match="joint"):
        apply_rule(_mlp(), "lfnn", workers=4, leader_readout="joint")
    with pytest.raises(ValueError, match="leader_readout"):
        apply_rule(_mlp(), "lfnn_l", workers=4, leader_readout="both")
