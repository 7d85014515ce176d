"""LFP rules: theorem E1, every variant against float64 references, conservation, step nets."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.models import Add, Heaviside
from bpfree.rules import apply_rule

LFP_RULES = ["lfp0", "lfp_eps", "lfp_ab", "lfp_zpzm"]
D = torch.float64


def randn(*shape):
    return torch.randn(*shape, dtype=D)


def grads(model, rule, x, y, **options):
    with apply_rule(model, rule, **options):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- theorem E1
def test_e1_lfp0_is_weight_magnitude_scaled_gradient_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 12, bias=False), nn.ReLU(), nn.Linear(12, 10, bias=False),
                          nn.ReLU(), nn.Linear(10, 4, bias=False)).double()
    x, y = randn(16, 8), torch.randint(0, 4, (16,))
    lfp, bp = grads(model, "lfp0", x, y), grads(model, "bp", x, y)
    for (name, p) in model.named_parameters():
        # feedback F = -|W| o dL/dW, and the trainer's grad is -F
        torch.testing.assert_close(lfp[name], p.detach().abs() * bp[name], rtol=1e-9, atol=1e-12)


def test_e1_lfp0_is_weight_magnitude_scaled_gradient_cnn():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, bias=False), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(6, 3, bias=False)).double()
    x, y = randn(5, 2, 8, 8), torch.randint(0, 3, (5,))
    lfp, bp = grads(model, "lfp0", x, y), grads(model, "bp", x, y)
    for (name, p) in model.named_parameters():
        torch.testing.assert_close(lfp[name], p.detach().abs() * bp[name], rtol=1e-9, atol=1e-12)


def test_lfp_eps_is_not_the_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = randn(16, 8), torch.randint(0, 3, (16,))
    lfp, bp = grads(model, "lfp_eps", x, y), grads(model, "bp", x, y)
    assert not torch.allclose(lfp["0.weight"], bp["0.weight"])


# ----------------------------------------------------------------------------- references
def reference_messages(x, w, b, reward, variant, eps=1e-6, alpha=2.0, beta=1.0):
    """Per-sample messages R[n, j, i] from output j to input i (bias = input index fan_in),
    from the equations in bpfree/rules/lfp.py, with explicit contributions."""
    n, fan_in = x.shape
    z_c = w[None, :, :] * x[:, None, :]                      # (n, out, in)
    if b is not None:
        z_c = torch.cat([z_c, b[None, :, None].expand(n, -1, 1)], dim=2)
    z = z_c.sum(2)
    if variant == "eps":
        stab = z + eps * torch.where(z >= 0, 1.0, -1.0).double()
        return z_c / stab[:, :, None] * reward[:, :, None]
    pos, neg = z_c.clamp(min=0), z_c.clamp(max=0)
    zp, zn = pos.sum(2) + 1e-6, neg.sum(2) - 1e-6
    if variant == "alpha_beta":
        frac = alpha * pos / zp[:, :, None] - beta * neg / zn[:, :, None]
    else:
        frac = 0.5 * (pos / zp[:, :, None] + neg / zn[:, :, None])
    return frac * reward[:, :, None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule, variant, options", [
    ("lfp_eps", "eps", {}), ("lfp_eps", "eps", {"eps": 0.3}), ("lfp_ab", "alpha_beta", {}),
    ("lfp_ab", "alpha_beta", {"alpha": 1.0, "beta": 0.0}), ("lfp_zpzm", "zplus_zminus", {}),
])
def test_linear_layer_matches_reference(rule, variant, options, bias):
    torch.manual_seed(3)
    layer = nn.Linear(5, 4, bias=bias).double()
    x = randn(6, 5).requires_grad_(True)
    reward = randn(6, 4)
    with apply_rule(layer, rule, reward="negative_gradient", **options):
        layer.zero_grad()
        layer(x).backward(-reward)  # reward = -grad
    ref_options = {k: v for k, v in options.items()}
    messages = reference_messages(x.detach(), layer.weight.detach(), layer.bias.detach() if bias else None,
                                  reward, variant, **ref_options)
    torch.testing.assert_close(x.grad, messages[:, :, :5].sum(1), rtol=1e-9, atol=1e-12)
    share = messages.sum(0)                                   # (out, in [+ bias])
    torch.testing.assert_close(-layer.weight.grad, torch.sign(layer.weight.detach()) * share[:, :5],
                               rtol=1e-9, atol=1e-12)
    if bias:
        torch.testing.assert_close(-layer.bias.grad, torch.sign(layer.bias.detach()) * share[:, 5],
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule, variant", [("lfp_eps", "eps"), ("lfp_ab", "alpha_beta"),
                                           ("lfp_zpzm", "zplus_zminus")])
def test_conv_layer_matches_unfolded_reference(rule, variant):
    """A conv layer is a Linear over image patches: compare with the Linear reference on im2col."""
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2).double()
    x = randn(2, 2, 5, 5).requires_grad_(True)
    with torch.no_grad():
        out_shape = conv(x).shape
    reward = randn(*out_shape)
    with apply_rule(conv, rule, reward="negative_gradient"):
        conv.zero_grad()
        conv(x).backward(-reward)
    cols = F.unfold(x.detach(), 3, padding=1, stride=2)          # (n, in*9, L)
    n, k, L = cols.shape
    patches = cols.transpose(1, 2).reshape(n * L, k)
    r = reward.reshape(n, 3, L).transpose(1, 2).reshape(n * L, 3)
    m = reference_messages(patches, conv.weight.detach().reshape(3, k), conv.bias.detach(), r, variant)
    r_cols = m[:, :, :k].sum(1).reshape(n, L, k).transpose(1, 2)
    torch.testing.assert_close(x.grad, F.fold(r_cols, (5, 5), 3, padding=1, stride=2), rtol=1e-9, atol=1e-12)
    share = m.sum(0)
    torch.testing.assert_close(-conv.weight.grad.reshape(3, k),
                               torch.sign(conv.weight.detach().reshape(3, k)) * share[:, :k],
                               rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("rule", ["lfp_ab", "lfp_zpzm"])
def test_split_rules_conserve_reward_across_a_bias_free_layer(rule):
    """With 40 mixed-sign inputs every output has positive and negative contributions, so
    alpha-beta sends (alpha - beta) r = r and z+z- sends r, up to the 1e-6 stabilisers."""
    torch.manual_seed(5)
    layer = nn.Linear(40, 5, bias=False).double()
    x = randn(9, 40).requires_grad_(True)
    reward = randn(9, 5)
    with apply_rule(layer, rule, reward="negative_gradient"):
        layer(x).backward(-reward)
    torch.testing.assert_close(x.grad.sum(1), reward.sum(1), rtol=1e-4, atol=1e-5)


def test_eps_rule_conserves_reward_up_to_its_stabiliser():
    torch.manual_seed(5)
    layer = nn.Linear(7, 5, bias=False).double()
    x = randn(9, 7).requires_grad_(True)
    reward = randn(9, 5)
    with apply_rule(layer, "lfp_eps", reward="negative_gradient", eps=0.01):
        z = layer(x)
        z.backward(-reward)
    z = z.detach()
    absorbed = z / (z + 0.01 * torch.where(z >= 0, 1.0, -1.0).double())  # the share eps keeps
    torch.testing.assert_close(x.grad.sum(1), (reward * absorbed).sum(1), rtol=1e-10, atol=1e-12)


def test_zpzm_conserves_reward_with_bias_and_never_amplifies_it():
    torch.manual_seed(6)
    layer = nn.Linear(40, 5).double()
    x = randn(9, 40).requires_grad_(True)
    reward = randn(9, 5)
    with apply_rule(layer, "lfp_zpzm", reward="negative_gradient"):
        layer(x).backward(-reward)
    bias_share = reference_messages(x.detach(), layer.weight.detach(), layer.bias.detach(), reward,
                                    "zplus_zminus")[:, :, 40].sum(1)
    torch.testing.assert_close(x.grad.sum(1) + bias_share, reward.sum(1), rtol=1e-4, atol=1e-5)
    assert x.grad.abs().sum() <= reward.abs().sum() * (1 + 1e-9)


def test_residual_sum_splits_reward_by_contribution():
    a = torch.tensor([[1.0, 3.0]], dtype=D, requires_grad=True)
    b = torch.tensor([[3.0, -1.0]], dtype=D, requires_grad=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2, bias=False).double()
            self.add = Add()

        def forward(self, inputs):
            u, v = inputs
            return self.fc(self.add(u, v))

    net = Net()
    with torch.no_grad():
        net.fc.weight.copy_(torch.eye(2, dtype=D))
    with apply_rule(net, "lfp_eps", reward="negative_gradient"):
        net((a, b)).backward(-torch.tensor([[4.0, 2.0]], dtype=D))
    torch.testing.assert_close(a.grad, torch.tensor([[1.0, 3.0]], dtype=D), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.tensor([[3.0, -1.0]], dtype=D), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- step nets
def test_step_net_gets_feedback_where_the_gradient_is_zero():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 8), Heaviside(), nn.Linear(8, 3)).double()
    x, y = randn(12, 6), torch.randint(0, 3, (12,))
    bp = grads(model, "bp", x, y)
    assert torch.count_nonzero(bp["0.weight"]) == 0  # the step's derivative is 0
    for rule in LFP_RULES:
        g = grads(model, rule, x, y)
        assert torch.count_nonzero(g["0.weight"]) > 0, rule
        assert torch.isfinite(g["0.weight"]).all(), rule


def test_lfp_eps_trains_a_step_net():
    torch.manual_seed(8)
    x = torch.randn(256, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(10, 32), Heaviside(), nn.Linear(32, 2))
    handle = apply_rule(model, "lfp_eps")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    handle.remove()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85, acc


# ----------------------------------------------------------------------------- options
def test_update_norm_clipping_bounds_the_feedback():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = randn(12, 6) * 100, torch.randint(0, 3, (12,))
    handle = apply_rule(model, "lfp_eps", clip_update_norm=0.5)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    handle.before_step()
    total = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert total <= 0.5 + 1e-9
    handle.remove()


@pytest.mark.parametrize("rule, options, msg", [
    ("lfp_ab", {"alpha": 2.0, "beta": 0.5}, "alpha - beta = 1"),
    ("lfp_eps", {"reward": "accuracy"}, "unknown reward"),
    ("lfp_eps", {"eps": -1.0}, "eps"),
    ("lfp_eps", {"clip_update_norm": 0}, "clip_update_norm"),
])
def test_bad_options(rule, options, msg):
    with pytest.raises(ValueError, match=msg):
        apply_rule(nn.Linear(2, 2), rule, **options)


def test_batchnorm_is_a_per_channel_linear_map():
    """Training-mode BN: r_x = x (gamma / sigma) s, F_gamma = |gamma| sum(x_hat s), F_beta = |beta| sum(s)."""
    torch.manual_seed(10)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn
            self.fc = nn.Conv2d(3, 3, 1, bias=False).double()
            with torch.no_grad():
                self.fc.weight.copy_(torch.eye(3, dtype=D).reshape(3, 3, 1, 1))

        def forward(self, x):
            return self.fc(self.bn(x))

    net = Wrap()
    x = randn(4, 3, 5, 5).requires_grad_(True)
    reward = randn(4, 3, 5, 5)
    with apply_rule(net, "lfp_eps", reward="negative_gradient", eps=0.01):
        y = net(x)
        y.backward(-reward)
    # through the identity 1x1 conv the reward reaching BN's output is reward * y / (y + eps sign y)
    stab = lambda z: z + 0.01 * torch.where(z >= 0, 1.0, -1.0).double()  # noqa: E731
    y = y.detach()
    r_bn = reward * y / stab(y)
    s = r_bn / stab(y)
    mean, var = x.detach().mean((0, 2, 3)), x.detach().var((0, 2, 3), unbiased=False)
    inv = (var + bn.eps).rsqrt().reshape(1, -1, 1, 1)
    x_hat = (x.detach() - mean.reshape(1, -1, 1, 1)) * inv
    torch.testing.assert_close(x.grad, x.detach() * bn.weight.detach().reshape(1, -1, 1, 1) * inv * s)
    torch.testing.assert_close(-bn.weight.grad, bn.weight.detach().abs() * (x_hat * s).sum((0, 2, 3)))
    torch.testing.assert_close(-bn.bias.grad, bn.bias.detach().abs() * s.sum((0, 2, 3)))


def _lfp_sign_flips(momentum: float) -> float:
    from bpfree.pruning import sign_flip_fraction
    from bpfree.loop import optimisation_step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_rule(model, "lfp_eps", reward_scale="sum")
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=momentum)
    x = torch.randn(640, 20)
    y = x[:, :5].argmax(1)
    for _ in range(3):
        for i in range(0, len(y), 32):
            optimisation_step(model, handle, opt, x[i:i + 32], y[i:i + 32])
    return sign_flip_fraction(before, model.state_dict())


def test_the_authors_step_can_flip_a_sign():
    """E5's sign check can fail: w <- w (1 + eta sign(w) a s) keeps every sign at small steps
    without momentum, but with the authors' transfer step (per-sample reward, lr 0.005,
    momentum 0.9, batch 32) the carried steps outgrow small weights and cross 0."""
    assert _lfp_sign_flips(momentum=0.0) == 0.0
    assert _lfp_sign_flips(momentum=0.9) > 0.005


@pytest.mark.parametrize("conv", [False, True])
def test_split_variants_skip_the_zero_products_behind_a_relu_bit_for_bit(conv):
    """For x >= 0 the z+/z- and alpha-beta messages skip the six products with x- = 0: the
    same values bit for bit as the general path (float64 and float32)."""
    from bpfree.rules import lfp as R
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        if conv:
            x = torch.relu(torch.randn(4, 3, 8, 8, dtype=dtype))
            w, b = torch.randn(5, 3, 3, 3, dtype=dtype), torch.randn(5, dtype=dtype)
            ops, z = R._ConvOps(x, ((1, 1), (1, 1), (1, 1), 1), w), F.conv2d(x, w, b, 1, 1)
        else:
            x = torch.relu(torch.randn(6, 7, dtype=dtype))
            w, b = torch.randn(5, 7, dtype=dtype), torch.randn(5, dtype=dtype)
            ops, z = R._LinearOps(x), F.linear(x, w, b)
        reward = torch.randn_like(z)
        args = (ops, x, R._pos(w), R._neg(w), ops.bias_view(R._pos(b), z), ops.bias_view(R._neg(b), z), reward)
        for a, beta in ((2.0, 1.0), (0.5, -0.5)):
            fast, general = R.split_messages_nonnegative(*args, a, beta), R.split_messages(*args, a, beta)
            assert all(torch.equal(f, g) for f, g in zip(fast, general))


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_split_variants_in_two_stacked_products_equal_the_twelve_product_messages(conv, signed):
    """split_messages_stacked (what training runs: one forward and one backward call of a
    layer stacked from the sign pieces) gives split_messages' reward to the input, weight
    share and normalised rewards, in float64 to rounding; for x >= 0 (behind a ReLU) the
    x- pieces are dropped."""
    from bpfree.rules import lfp as R
    torch.manual_seed(0)
    dtype = torch.float64
    if conv:
        x = torch.randn(4, 3, 8, 8, dtype=dtype)
        w, b = torch.randn(5, 3, 3, 3, dtype=dtype), torch.randn(5, dtype=dtype)
    else:
        x = torch.randn(6, 2, 7, dtype=dtype)  # a sequence layer's leading dims too
        w, b = torch.randn(5, 7, dtype=dtype), torch.randn(5, dtype=dtype)
    x = x if signed else torch.relu(x)
    ops = R._ConvOps(x, ((1, 1), (1, 1), (1, 1), 1), w) if conv else R._LinearOps(x)
    z = F.conv2d(x, w, b, 1, 1) if conv else F.linear(x, w, b)
    reward = torch.randn_like(z)
    args = (ops, x, R._pos(w), R._neg(w), ops.bias_view(R._pos(b), z), ops.bias_view(R._neg(b), z), reward)
    for a, beta in ((2.0, 1.0), (0.5, -0.5)):
        stacked, general = R.split_messages_stacked(*args, a, beta), R.split_messages(*args, a, beta)
        for got, want in zip(stacked, general):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        assert R.split_messages_stacked(*args, a, beta, need_input=False)[0] is None


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("signed", [False, True])
def test_a_split_layer_computes_its_sign_pieces_once(conv, signed):
    """A split layer's forward computes z+ and z- and outputs z+ + z- + bias (the layer's z to
    rounding); its backward reuses them, so the feedback is the one a backward computing them
    afresh gives, bit for bit, and behind a ReLU a step does 6 products of the layer, not 7
    (z+, z-, their sends and collects). A signed Linear input keeps the layer's own z and its
    backward computes the pieces: 13 products (z, 4 pieces, 4 sends, 4 collects)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bpfree.rules import lfp as R
    torch.manual_seed(0)
    if conv:
        layer, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 6, 6)
        unit = 2 * 2 * 36 * 4 * 3 * 9  # one product of the layer: 2 x N x HW x out x in x k x k
    else:
        layer, x = nn.Linear(5, 4), torch.randn(6, 5)
        unit = 2 * 6 * 4 * 5
    x = x if signed else torch.relu(x)
    apply_rule(layer, "lfp_ab", reward="negative_gradient")
    x_in = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        z = layer(x_in)
        reward = torch.randn_like(z)
        z.backward(-reward)  # reward = -grad
    plain = F.conv2d(x, layer.weight, layer.bias, padding=1) if conv else F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(z, plain, rtol=1e-5, atol=1e-5)
    if conv:  # stacked: [x+, x-] doubles a signed input
        assert counter.get_total_flops() == (2 if signed else 1) * 6 * unit
    else:
        assert counter.get_total_flops() == (13 if signed else 6) * unit
    w = layer.weight.detach()
    ops = R._ConvOps(x, ((1, 1), (1, 1), (1, 1), 1), w) if conv else R._LinearOps(x)
    b = ops.bias_view(layer.bias.detach(), z)
    fresh = R._split(ops, x)(ops, x, R._pos(w), R._neg(w), R._pos(b), R._neg(b), reward, 2.0, 1.0)  # lfp_ab
    assert torch.equal(x_in.grad, fresh[0]) and torch.equal(-layer.weight.grad, torch.sign(w) * fresh[1])


def test_the_epsilon_division_keeps_its_values_bit_for_bit():
    """_divide's in-place form gives what r / (z + eps sign z) with sign(0) = +1 gives, and
    LFP-0's zero for z = 0, to the bit (smoke runs recorded with the old form stay valid)."""
    from bpfree.rules.lfp import _divide
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(1000, dtype=dtype)
        z[::7] = 0.0
        r = torch.randn_like(z)
        want = r / (z + 1e-6 * torch.where(z >= 0, 1.0, -1.0).to(dtype))
        assert torch.equal(_divide(r, z, 1e-6), want)
        want0 = torch.where(z != 0, r / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(r))
        assert torch.equal(_divide(r, z, 0.0), want0)


@pytest.mark.parametrize("rule", ["lfp_eps", "lfp_ab"])
def test_lfp_skips_the_reward_to_the_data_and_changes_nothing_else(rule, monkeypatch):
    """The first layer's input takes no reward (as autograd skips BP's input gradient), so its
    transposed product is not computed; every parameter's feedback is the same either way."""
    import bpfree.rules.lfp as R
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    apply_rule(model, rule)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    sends = []
    original = R._LinearOps.send
    monkeypatch.setattr(R._LinearOps, "send", lambda self, s, w: sends.append(w.shape) or original(self, s, w))

    def feedback(inp):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(inp), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    skipped = feedback(x)
    # only the second layer sends (its weight, or lfp_ab's stack of sign pieces, has 5 columns)
    assert all(shape[1] == 5 for shape in sends) and sends
    sends.clear()
    x_in = x.clone().requires_grad_(True)
    full = feedback(x_in)
    assert any(shape[1] in (6, 12) for shape in sends) and x_in.grad is not None  # 12: [x+, x-]
    for a, b in zip(skipped, full):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lfp_allows_in_place_ops_after_an_activation():
    """The pass-through hands on the activation's output detached from the activation's own
    node: an in-place op on it (a residual `out += skip`, an in-place dropout) must not trip
    that node's saved output."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)

        def forward(self, x):
            h = self.act(self.fc1(x))
            h += 1.0
            return self.fc2(h)

    torch.manual_seed(0)
    net = Net()
    apply_rule(net, "lfp_eps")
    torch.nn.functional.cross_entropy(net(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_the_pass_through_shares_the_activations_memory_and_gives_the_copys_feedback():
    """No copy per activation (the next layer reads the activation's own memory), and the
    same feedback, bit for bit, as handing on a copy did."""
    import bpfree.rules.lfp as lfp

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))

    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    ours, seen = net(), {}
    ours[1].register_forward_hook(lambda m, i, o: seen.update(activation=o.data_ptr()))  # before the rule's
    ours[2].register_forward_pre_hook(lambda m, i: seen.update(next_layer=i[0].data_ptr()))
    apply_rule(ours, "lfp_eps")
    torch.nn.functional.cross_entropy(ours(x), y).backward()
    assert seen["activation"] == seen["next_layer"]

    class Copying(lfp._PassReward):
        @staticmethod
        def forward(ctx, x_, y_, copy=False):
            return y_.detach().clone()

    original, lfp._PassReward = lfp._PassReward, Copying
    try:
        theirs = net()
        apply_rule(theirs, "lfp_eps")
        torch.nn.functional.cross_entropy(theirs(x), y).backward()
    finally:
        lfp._PassReward = original
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_in_place_activations_run_out_of_place_while_the_rule_is_applied():
    """torchvision's conv -> ReLU(inplace=True): in place, the ReLU would overwrite the z its
    layer saved. The rule runs it out of place (the same feedback as a plain ReLU, bit for
    bit) and puts `inplace` back on removal."""
    def net(inplace):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(inplace=inplace), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 6 * 6, 3))

    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    grads = []
    for inplace in (True, False):
        model = net(inplace)
        handle = apply_rule(model, "lfp_eps")
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])
        handle.remove()
        assert model[1].inplace is inplace
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
