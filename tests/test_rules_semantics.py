"""Closed-form semantics of each rule: what must be equal, what must differ, what must shrink."""
from __future__ import annotations

import copy
import gzip
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_options
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree.diagnostics import angle_degrees, weight_feedback_angles

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # 2 workers x N intra-op threads on 2 cores is ~5x slower

RULES = bpfree.list_layer_rules()  # block-level rules: tests/test_tp_dtp_lra.py


def conv_linear_net() -> nn.Sequential:
    """Conv + Linear net, float64, input (N, 2, 8, 8)."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 12),
        nn.Tanh(),
        nn.Linear(12, 5),
    ).double()


def weighted(model):
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def grads_of(model, x, y, loss_fn=F.cross_entropy):
    """Gradients of the model's own weights and biases (not KP's feedback), then the input's."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    loss_fn(model(x), y).backward()
    own = [p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] in ("weight", "bias")]
    return [p.grad.clone() for p in own] + [x.grad.clone()]


def max_diff(a_list, b_list):
    return max((a - b).abs().max().item() for a, b in zip(a_list, b_list))


def max_rel_diff(a_list, b_list):
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(a_list, b_list))


def batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (n,), generator=g)


# --------------------------------------------------------------------------------------
# FA / KP against BP
# --------------------------------------------------------------------------------------
def test_fa_with_feedback_equal_to_weight_is_bp():
    torch.manual_seed(0)
    model = conv_linear_net()
    reference = copy.deepcopy(model)
    x, y = batch()
    handle = bpfree.apply_rule(model, "fa")
    with torch.no_grad():
        for layer in handle.layers:
            assert not torch.equal(layer.feedback, layer.weight)
            layer.feedback_weight.copy_(layer.weight)
    assert max_diff(grads_of(model, x, y), grads_of(reference, x, y)) < 1e-10


@pytest.mark.parametrize("rule", ["fa", "kp", "wm", "usf", "brsf", "frsf", "dfa"])
def test_random_feedback_is_not_bp(rule):
    """FA with random B, and KP/WM before any training, must NOT be BP (the KP-port bug)."""
    torch.manual_seed(0)
    model = conv_linear_net()
    reference = copy.deepcopy(model)
    x, y = batch()
    handle = bpfree.apply_rule(model, rule)
    rule_grads, bp_grads = grads_of(model, x, y), grads_of(reference, x, y)
    if rule == "kp":  # KP's weight gradient carries its decay term d * W
        rule_grads[-3] = rule_grads[-3] - handle.rule.decay * model[-1].weight.detach()
    # the last layer's weight/bias gradient is the true one for every rule ...
    assert max_diff(rule_grads[-3:-1], bp_grads[-3:-1]) < 1e-10
    # ... but what the lower layers (and the input) receive must differ clearly.
    lower = slice(0, 2)  # first conv weight and bias
    assert max_rel_diff(rule_grads[lower], bp_grads[lower]) > 0.05
    assert max_rel_diff(rule_grads[-1:], bp_grads[-1:]) > 0.05


# --------------------------------------------------------------------------------------
# Sign-concordant feedback
# --------------------------------------------------------------------------------------
def _scale(weight):
    receptive = weight[0, 0].numel()
    return math.sqrt(2.0 / (weight.shape[1] * receptive + weight.shape[0] * receptive))


def _train_steps(model, handle, steps, lr=0.5, seed=0, each_step=None):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for step in range(steps):
        x, y = batch(seed + step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        handle.after_step()
        if each_step is not None:
            each_step(step)


def test_usf_feedback_is_scaled_sign_of_current_weight():
    torch.manual_seed(1)
    model = conv_linear_net()
    handle = bpfree.apply_rule(model, "usf")
    flips = []
    start = [layer.weight.detach().sign().clone() for layer in handle.layers]

    def check(step):
        for layer in handle.layers:
            w = layer.weight.detach()
            assert torch.equal(layer.feedback, _scale(w) * torch.sign(w)), f"step {step}"
        flips.append(sum((l.weight.sign() != s).sum().item() for l, s in zip(handle.layers, start)))

    _train_steps(model, handle, 6, each_step=check)
    assert flips[-1] > 0, "no weight changed sign, so the check did not exercise tracking"


def test_brsf_redraws_magnitudes_every_batch_and_tracks_signs():
    torch.manual_seed(2)
    model = conv_linear_net()
    handle = bpfree.apply_rule(model, "brsf")
    layers = handle.layers
    magnitudes, flips = [], []
    start = [layer.weight.detach().sign().clone() for layer in layers]

    def check(step):
        magnitudes.append([layer.feedback_magnitude.clone() for layer in layers])
        for layer in layers:
            w = layer.weight.detach()
            fb = layer.feedback
            assert torch.equal(torch.sign(fb)[w != 0], torch.sign(w)[w != 0]), f"step {step}"
        flips.append(sum((l.weight.sign() != s).sum().item() for l, s in zip(layers, start)))

    _train_steps(model, handle, 4, each_step=check)
    for earlier, later in zip(magnitudes, magnitudes[1:]):
        for a, b in zip(earlier, later):
            assert (a - b).abs().max() > 1e-3, "magnitudes were not redrawn for a new batch"
    assert flips[-1] > 0
    # evaluation (no-grad) forwards do not redraw
    before = [layer.feedback_magnitude.clone() for layer in layers]
    with torch.no_grad():
        model(batch(99)[0])
    assert all(torch.equal(a, layer.feedback_magnitude) for a, layer in zip(before, layers))


def test_brsf_seeded_redraws_are_reproducible_and_leave_global_rng_alone():
    def run(seed):
        torch.manual_seed(3)
        model = conv_linear_net()
        handle = bpfree.apply_rule(model, "brsf", seed=seed)
        torch.manual_seed(123)
        _train_steps(model, handle, 2)
        return [l.feedback_magnitude.clone() for l in handle.layers], torch.rand(3)

    a, rng_a = run(5)
    b, rng_b = run(5)
    c, _ = run(6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(123)
    assert torch.equal(rng_a, rng_b)


def test_frsf_magnitudes_fixed_signs_track():
    torch.manual_seed(4)
    model = conv_linear_net()
    handle = bpfree.apply_rule(model, "frsf")
    layers = handle.layers
    fixed = [layer.feedback_magnitude.clone() for layer in layers]

    def check(step):
        for layer, m in zip(layers, fixed):
            w = layer.weight.detach()
            assert torch.equal(layer.feedback_magnitude, m)
            assert torch.equal(layer.feedback, m * torch.sign(w))

    _train_steps(model, handle, 4, each_step=check)


def test_adafa_is_bp_on_first_step_then_differs():
    torch.manual_seed(5)
    model = conv_linear_net()
    handle = bpfree.apply_rule(model, "adafa")
    x, y = batch(0)
    rule_grads = grads_of(model, x, y)
    with handle.suspended():
        bp_grads = grads_of(model, x, y)
    assert max_diff(rule_grads, bp_grads) < 1e-10

    _train_steps(model, handle, 15, lr=0.3)
    for layer in handle.layers:  # B stayed fixed while W moved
        assert (layer.feedback - layer.weight).abs().max() > 1e-3
    x, y = batch(1000)
    rule_grads = grads_of(model, x, y)
    with handle.suspended():
        bp_grads = grads_of(model, x, y)
    assert max_diff(rule_grads[-3:-1], bp_grads[-3:-1]) < 1e-10  # top layer: true gradient
    assert max_rel_diff(rule_grads[:2], bp_grads[:2]) > 1e-3  # lower layers: no longer BP


# --------------------------------------------------------------------------------------
# DFA
# --------------------------------------------------------------------------------------
def test_dfa_hidden_signal_is_projected_output_error():
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 4)
    ).double()
    handle = bpfree.apply_rule(model, "dfa")
    captured = {}

    def capture_input(index):
        def pre_hook(module, args):
            args[0].register_hook(lambda g: captured.__setitem__(("in", index), g.clone()))
            captured[("x", index)] = args[0].detach().clone()
        return pre_hook

    for index in (2, 4, 6):
        model[index].register_forward_pre_hook(capture_input(index))
    x = torch.randn(5, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    out = model(x)
    out.register_hook(lambda g: captured.__setitem__("e", g.clone()))
    F.cross_entropy(out, y).backward()
    e = captured["e"]
    for index in (2, 4, 6):
        matrix = model[index].dfa_feedback.double()
        assert matrix.shape == (model[index].in_features, 4)
        assert (captured[("in", index)] - e @ matrix.t()).abs().max() < 1e-12
    # Nokland's delta: layer 2's weight gradient is ((B_4 e) o f'(a_2)) h_1^T
    h1, h2 = captured[("x", 2)], captured[("x", 4)]
    delta = (e @ model[4].dfa_feedback.double().t()) * (1 - h2**2)
    assert (model[2].weight.grad - delta.t() @ h1).abs().max() < 1e-12
    # the top layer still gets the true local gradient e h^T
    assert (model[6].weight.grad - e.t() @ captured[("x", 6)]).abs().max() < 1e-12
    # each layer its own matrix: no shared storage, no prefix slice of another
    m2, m4, m6 = (model[i].dfa_feedback for i in (2, 4, 6))
    storages = {m.untyped_storage().data_ptr() for m in (m2, m4, m6)}
    assert len(storages) == 3
    assert not torch.allclose(m2, m4)
    assert not torch.allclose(m6, m2[:7]) and not torch.allclose(m6, m4[:7])
    corr = torch.corrcoef(torch.stack([m2.flatten(), m4.flatten()]))[0, 1].abs()
    assert corr < 0.5
    # the first layer's input is the data (no grad): it is not a feedback point
    assert model[0].feedback is None
    handle.remove()


class TokenModel(nn.Module):
    """Transformer-like token MLP on (B, T, F) with a pooled per-sequence head."""

    def __init__(self, f=6, hidden=10, classes=3):
        super().__init__()
        self.embed = nn.Linear(f, hidden)
        self.ff1 = nn.Linear(hidden, 2 * hidden)
        self.ff2 = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + self.ff2(F.gelu(self.ff1(h)))
        return self.head(h.mean(1))


def test_dfa_on_rank3_tokens():
    torch.manual_seed(7)
    model = TokenModel().double()
    handle = bpfree.apply_rule(model, "dfa")
    captured = {}
    def pre_hook(module, args):
        args[0].register_hook(lambda g: captured.__setitem__("ff1", g.clone()))

    model.ff1.register_forward_pre_hook(pre_hook)
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    out = model(x)
    out.register_hook(lambda g: captured.__setitem__("e", g.clone()))
    F.cross_entropy(out, y).backward()
    e = captured["e"]
    b_ff1 = model.ff1.dfa_feedback.double()
    assert b_ff1.shape == (10, 3)
    # ff1's input h also feeds the residual, which carries ff2's point signal and the head's;
    # the DFA part is B e broadcast over the 5 tokens, the rest flows through the residual sum
    b_head = model.head.dfa_feedback.double()
    b_ff2 = model.ff2.dfa_feedback.double()
    assert b_ff2.shape == (20, 3) and b_head.shape == (10, 3)
    projected = (e @ b_ff1.t()).unsqueeze(1).expand(4, 5, 10)
    via_residual = (e @ b_head.t() / 5).unsqueeze(1).expand(4, 5, 10)
    assert (captured["ff1"] - projected - via_residual).abs().max() < 1e-12
    # and it trains
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    data = torch.randn(32, 5, 6, dtype=torch.float64)
    labels = (data.sum((1, 2)) > 0).long() + (data[:, :, 0].sum(1) > 1).long()
    first = F.cross_entropy(model(data), labels).item()
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(data), labels).backward()
        opt.step()
    assert F.cross_entropy(model(data), labels).item() < 0.8 * first


# --------------------------------------------------------------------------------------
# KP and WM
# --------------------------------------------------------------------------------------
def test_kp_drives_weight_feedback_mismatch_to_zero():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    handle = bpfree.apply_rule(model, "kp", decay=0.5)
    fbs = [layer.feedback_weight for layer in handle.layers]
    assert all(isinstance(fb, nn.Parameter) for fb in fbs)
    assert all(any(fb is p for p in model.parameters()) for fb in fbs)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(64, 5, dtype=torch.float64)
    target = torch.stack([x[:, 0] * x[:, 1], torch.sin(x[:, 2])], 1)
    start = [(l.weight - l.feedback).norm().item() for l in handle.layers]
    first_loss = None
    for step in range(400):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        first_loss = first_loss or loss.item()
        loss.backward()
        opt.step()
        handle.after_step()
    end = [(l.weight - l.feedback).norm().item() for l in handle.layers]
    for s, e in zip(start, end):
        assert e < 1e-3 * s  # (1 - 0.05 * 0.5)^400 = 4e-5
    assert loss.item() < first_loss


@pytest.mark.parametrize("decay", [-0.1, -1, True])
def test_kp_rejects_negative_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        bpfree.apply_rule(nn.Linear(3, 2), "kp", decay=decay)


def test_kp_accepts_no_decay_as_the_reference_code_ran_it():
    handle = bpfree.apply_rule(nn.Linear(3, 2), "kp", decay=0)  # tests/test_rules_reference.py checks it
    assert handle.rule.decay == 0.0


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(20, 12),
        nn.Conv2d(4, 6, 3),
        nn.Conv2d(4, 6, (3, 2), stride=2, padding=1, dilation=2, groups=2),
    ],
    ids=["linear", "conv", "conv_grouped_dilated"],
)
def test_wm_mirror_shrinks_angle(layer):
    torch.manual_seed(9)
    handle = bpfree.apply_rule(layer, "wm", mirror_lr=0.1)
    angles = [weight_feedback_angles(handle)[""]]
    for _ in range(30):
        handle.after_step()
        angles.append(weight_feedback_angles(handle)[""])
    assert angles[0] > 60
    assert angles[-1] < angles[0] / 3
    assert angles[10] < angles[0] and angles[-1] < angles[10]


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(10, 6), nn.Conv2d(4, 6, 3, dilation=2, groups=2)],
    ids=["linear", "conv"],
)
def test_wm_mirror_estimate_is_unbiased(layer):
    """One full-rate mirror step with a large noise batch gives B ~= W, scale included."""
    torch.manual_seed(10)
    handle = bpfree.apply_rule(layer, "wm", mirror_lr=1.0, mirror_batch=4096, noise_std=0.5)
    handle.after_step()
    w, b = layer.weight.detach(), layer.feedback
    assert angle_degrees(w, b) < 10
    assert abs(b.norm() / w.norm() - 1) < 0.1


# --------------------------------------------------------------------------------------
# Every rule learns a small real task
# --------------------------------------------------------------------------------------
def data_dir() -> Path:
    env = os.environ.get("BPFREE_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def read_idx_gz(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    assert magic >> 8 == 0x08, f"{path}: not an unsigned-byte idx file"
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


N_MNIST = 384


@pytest.fixture(scope="module")
def mnist_subset():
    raw = data_dir() / "MNIST" / "raw"
    images_path, labels_path = raw / "train-images-idx3-ubyte.gz", raw / "train-labels-idx1-ubyte.gz"
    if not (images_path.exists() and labels_path.exists()):
        pytest.skip(f"MNIST gz files not found under {raw} (set BPFREE_DATA_DIR)")
    images = read_idx_gz(images_path)
    labels = read_idx_gz(labels_path)
    assert images.shape == (60000, 28, 28) and labels.shape == (60000,)
    x = torch.from_numpy(images[:N_MNIST].astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - 0.1307) / 0.3081
    return x, torch.from_numpy(labels[:N_MNIST].astype(np.int64))


def small_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, stride=2), nn.ReLU(),
        nn.Conv2d(6, 12, 3, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(12 * 5 * 5, 32), nn.ReLU(), nn.Linear(32, 10),
    )


# The seed summary gives no equations for LFP's alpha-beta and z+z- variants; ours are the
# standard LRP splits (bpfree/rules/lfp.py). With the reward r = z o (onehot - softmax)
# their split fractions keep the sign of z, so a unit with z < 0 is pushed the wrong way, and
# training diverges here. Known and recorded; strict, so a fix shows up as XPASS -> failure.
SPLIT_LFP = {"lfp_ab", "lfp_zpzm"}


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("rule", [pytest.param(r, marks=pytest.mark.xfail(
    strict=True, reason="LFP split variants diverge with the softmax-loss reward (see SPLIT_LFP)"))
    if r in SPLIT_LFP else r for r in RULES])
def test_every_rule_lowers_mnist_training_loss(rule, arch, mnist_subset):
    x, y = mnist_subset
    torch.manual_seed(11)
    model = small_mlp() if arch == "mlp" else small_cnn()
    handle = bpfree.apply_rule(model, rule, **tiny_options(rule))
    # Adam, because its per-parameter scaling puts every rule on one footing: with SGD +
    # momentum at a rate where BP is comfortable, FA and DFA (whose feedback is larger than
    # the default-initialised W) blow up on ReLU nets, and at a rate safe for them BP crawls.
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first_layer = handle.layers[0]
    w0 = first_layer.weight.detach().clone()
    with torch.no_grad():
        first = F.cross_entropy(model(x), y).item()
    order = torch.randperm(N_MNIST, generator=torch.Generator().manual_seed(0))
    steps, bs = 60, 64
    for step in range(steps):
        idx = order[(step * bs) % N_MNIST:][:bs]
        opt.zero_grad()
        handle.add_local_loss(F.cross_entropy(model(x[idx]), y[idx]), y[idx]).backward()
        opt.step()
        handle.after_step()
    with torch.no_grad():
        last = F.cross_entropy(model(x), y).item()
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert math.isfinite(last)
    assert last < 0.75 * first, f"{rule}/{arch}: loss {first:.3f} -> {last:.3f}"
    assert accuracy > 0.4, f"{rule}/{arch}: training accuracy {accuracy:.2f} (chance 0.1)"
    # the error signal reached the bottom layer (a top-layer-only learner would also lower the loss)
    moved = (first_layer.weight.detach() - w0).norm() / w0.norm()
    assert moved > 0.05, f"{rule}/{arch}: first layer barely moved ({moved:.3g})"


def _kp_trajectory(match: str, optimizer_name: str, steps: int = 5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    lr, decay = 0.1, 0.01
    if match == "update":
        handle = bpfree.apply_rule(model, "kp", decay=decay, match="update", shrink=lr * decay, seed=3)
        weight_decay = decay  # SGD-KP's L2 on W, now the optimizer's
    else:
        handle = bpfree.apply_rule(model, "kp", decay=decay, seed=3)
        weight_decay = 0.0
    weights = [layer.weight for layer in handle.layers]  # KP's decay acts on W, not on the bias
    others = [p for p in model.parameters() if all(p is not w for w in weights)]
    groups = [{"params": weights, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr) if optimizer_name == "sgd" else torch.optim.Adam(groups, lr=1e-2)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    history = []
    for _ in range(steps):
        opt.zero_grad()
        handle.add_local_loss(F.cross_entropy(model(x), y), y).backward()
        handle.before_step()
        opt.step()
        handle.after_step()
        history.append([(layer.weight.detach().clone(), layer.feedback.detach().clone()) for layer in handle.layers])
    return history


def test_kp_update_matching_equals_gradient_kp_under_plain_sgd():
    """B receiving W's applied update and W - B shrinking by lr x decay is SGD-KP exactly."""
    for step_a, step_b in zip(_kp_trajectory("gradient", "sgd"), _kp_trajectory("update", "sgd")):
        for (w_a, b_a), (w_b, b_b) in zip(step_a, step_b):
            torch.testing.assert_close(w_b, w_a, rtol=0, atol=1e-12)
            torch.testing.assert_close(b_b, b_a, rtol=0, atol=1e-12)


def test_kp_update_matching_shrinks_w_minus_b_geometrically_under_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    handle = bpfree.apply_rule(model, "kp", match="update", shrink=0.1)
    gaps0 = [(layer.feedback - layer.weight).norm().item() for layer in handle.layers]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        handle.after_step()
    for layer, gap0 in zip(handle.layers, gaps0):
        assert (layer.feedback - layer.weight).norm().item() == pytest.approx(gap0 * 0.9 ** 10, rel=1e-4)
    with pytest.raises(ValueError, match="match must be"):
        bpfree.apply_rule(nn.Linear(2, 2), "kp", match="adam")
    with pytest.raises(ValueError, match="shrink must be in"):
        bpfree.apply_rule(nn.Linear(2, 2), "kp", match="update", shrink=1.0)
