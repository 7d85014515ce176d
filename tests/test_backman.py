"""BackMAN against a float64 reference written from the paper's equations (claims.md C)."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree.rules import apply_rule



def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def mlp(bias=True, seed=0, sizes=(10, 16, 12, 4)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).double()


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)).double()


def grads(model, rule, x, y, **options):
    x = x.clone().requires_grad_(True)
    with apply_rule(model, rule, **options):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["input"] = x.grad.clone()
    return out


def reference(model, x, y, alpha):
    """r[L] = -dl/da[L]; c_i = alpha_i / ||(r^T a)_i||; g = r diag(c); dW = g^T a;
    r[l-1] = (g W) o M[l-1]. Returns per-layer dW (the step direction), the bias steps
    (unnormalised r) and the signal sent to the input, all in float64."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    acts, pre = [x], []
    a = x
    for i, lin in enumerate(linears):
        z = a @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
        pre.append(z)
        a = torch.relu(z) if i < len(linears) - 1 else z
        acts.append(a)
    logits = acts[-1].detach().requires_grad_(True)
    loss = F.cross_entropy(logits, y)
    (grad_logits,) = torch.autograd.grad(loss, logits)
    r = -grad_logits
    d_w, d_b = {}, {}
    for i in reversed(range(len(linears))):
        lin = linears[i]
        local = r.T @ acts[i].detach()
        c = alpha[i] / local.norm(dim=1)
        g = r * c
        d_w[i] = g.T @ acts[i].detach()
        d_b[i] = r.sum(0)
        signal = g @ lin.weight.detach()
        r = signal * (pre[i - 1] > 0).double() if i > 0 else signal
    return d_w, d_b, r


def test_unit_c_is_exactly_backprop_mlp():
    model = mlp()
    x, y = randn(32, 10), torch.randint(0, 4, (32,))
    bp = grads(model, "bp", x, y)
    bm = grads(model, "backman", x, y, unit_c=True)
    for name in bp:
        assert torch.equal(bp[name], bm[name]), name


def test_unit_c_is_exactly_backprop_cnn():
    model = cnn()
    x, y = randn(8, 2, 7, 7), torch.randint(0, 4, (8,))
    bp = grads(model, "bp", x, y)
    bm = grads(model, "backman", x, y, unit_c=True)
    for name in bp:
        torch.testing.assert_close(bm[name], bp[name], rtol=0, atol=1e-14)


def test_every_neuron_update_has_norm_alpha_per_layer():
    model = mlp()
    x, y = randn(64, 10), torch.randint(0, 4, (64,))
    alpha = [0.5, 2.0, 1.0]
    g = grads(model, "backman", x, y, alpha=alpha)
    for i, name in enumerate(["0.weight", "2.weight", "4.weight"]):
        norms = g[name].norm(dim=1)
        live = norms > 0  # a ReLU neuron dead on the whole batch has no update to normalise
        assert live.sum() >= len(norms) - 2
        torch.testing.assert_close(norms[live], torch.full((int(live.sum()),), alpha[i], dtype=torch.float64))


def test_matches_float64_reference_from_the_equations():
    model = mlp(bias=True, seed=3)
    x, y = randn(40, 10), torch.randint(0, 4, (40,))
    alpha = [0.3, 0.7, 1.1]
    g = grads(model, "backman", x, y, alpha=alpha)
    d_w, d_b, signal = reference(model, x, y, alpha)
    for i, name in enumerate(["0", "2", "4"]):
        torch.testing.assert_close(-g[f"{name}.weight"], d_w[i], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(-g[f"{name}.bias"], d_b[i], rtol=1e-10, atol=1e-12)
    # The signal that leaves the first layer is the normalised one, g[1] W[1].
    torch.testing.assert_close(-g["input"], signal, rtol=1e-10, atol=1e-12)


def test_normalised_signal_travels_down_not_the_raw_error():
    """Scaling the loss changes nothing below the top layer (normalisation) but changes BP."""
    model = mlp(bias=False)
    x, y = randn(16, 10), torch.randint(0, 4, (16,))
    base = grads(model, "backman", x, y)

    def scaled(rule):
        xx = x.clone().requires_grad_(True)
        with apply_rule(model, rule):
            model.zero_grad()
            (7.0 * F.cross_entropy(model(xx), y)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}
    s = scaled("backman")
    for name in ("0.weight", "2.weight", "4.weight"):
        torch.testing.assert_close(s[name], base[name])


def test_conv_channel_norms_are_alpha():
    model = cnn(seed=1)
    x, y = randn(8, 2, 7, 7), torch.randint(0, 4, (8,))
    g = grads(model, "backman", x, y, alpha=0.25)
    for name in ("0.weight", "2.weight"):
        norms = g[name].flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, 0.25))
    bp = grads(model, "bp", x, y)
    assert torch.isfinite(g["0.bias"]).all()
    assert not torch.allclose(g["0.weight"], bp["0.weight"])


def test_conv_matches_manual_channel_scaling():
    """The top conv's normalised signal equals BP's input gradient with grad_out scaled per channel."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = randn(5, 3, 6, 6).requires_grad_(True)
    target = randn(5, 4, 6, 6)
    out = conv(x)
    gout = torch.autograd.grad(((out - target) ** 2).sum(), out)[0]
    local = torch.nn.grad.conv2d_weight(x.detach(), conv.weight.shape, gout, padding=1)
    c = 1.0 / local.flatten(1).norm(dim=1)
    expected_x = torch.nn.grad.conv2d_input(x.shape, conv.weight.detach(), gout * c[None, :, None, None], padding=1)
    with apply_rule(conv, "backman"):
        xx = x.detach().clone().requires_grad_(True)
        conv.zero_grad()
        ((conv(xx) - target) ** 2).sum().backward()
    torch.testing.assert_close(xx.grad, expected_x)
    torch.testing.assert_close(conv.weight.grad, local * c[:, None, None, None])


def test_neuron_without_signal_uses_layer_mean_norm():
    model = mlp(bias=False, sizes=(6, 5, 3))
    with torch.no_grad():
        model[2].weight[:, 0] = 0.0  # hidden neuron 0 sends nothing up -> gets no error
    x, y = randn(20, 6), torch.randint(0, 3, (20,))
    g = grads(model, "backman", x, y)
    assert torch.isfinite(g["0.weight"]).all()
    norms = g["0.weight"].norm(dim=1)
    assert norms[0] == 0.0  # zero update stays zero (scaled by 1 / mean norm, not 1 / 0)
    torch.testing.assert_close(norms[1:], torch.ones(4, dtype=torch.float64))


def test_sgd_step_moves_each_neuron_by_lr_times_alpha():
    model = mlp(bias=False)
    x, y = randn(32, 10), torch.randint(0, 4, (32,))
    before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    with apply_rule(model, "backman", alpha=1.0):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for w0, m in zip(before, [m for m in model if isinstance(m, nn.Linear)]):
        torch.testing.assert_close((m.weight.detach() - w0).norm(dim=1), torch.full((w0.shape[0],), 0.05, dtype=torch.float64))


@pytest.mark.parametrize("options, msg", [
    ({"alpha": 0}, "alpha"), ({"alpha": [1.0, -1.0]}, "alpha"), ({"unit_c": 1}, "unit_c"),
    ({"alpha": [1.0, 1.0]}, "3 Linear/Conv layers"),
])
def test_bad_options_are_rejected_before_any_change(options, msg):
    model = mlp()
    with pytest.raises(ValueError, match=msg):
        apply_rule(model, "backman", **options)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)


# --- the authors' own hooks (tests/reference/backman_reference.py writes the .pt) ----------
REFERENCE = Path(__file__).resolve().parent / "reference" / "backman_reference.pt"


def reference_net(name):
    """The nets of backman_reference.py, with the weights and batch it stored."""
    entry = torch.load(REFERENCE)["nets"][name]
    if name == "mlp":
        model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(),
                              nn.Flatten(), nn.Linear(27, 3))
    model = model.double()
    model.load_state_dict(entry["state_dict"])
    return model, entry


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_frobenius_mode_matches_the_authors_forgetting_hook(net):
    """alpha_mode 'frobenius' = forgetting_hook (neurips 0a607f3 models.py:12-47) in every gradient."""
    model, entry = reference_net(net)
    g = grads(model, "backman", entry["x"], entry["y"], alpha_mode="frobenius")
    expected = entry["forgetting_hook"]
    assert set(g) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(g[name], value, rtol=0, atol=1e-10, msg=name)
    # The hook's defining property: per layer, ||g||_F = ||r||_F / 2, so the top layer's row
    # norms are far from 1 (what the default mode gives).
    top = "4.weight" if net == "mlp" else "5.weight"
    assert g[top].flatten(1).norm(dim=1).max() < 0.5


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_default_mode_is_not_the_forgetting_hook(net):
    model, entry = reference_net(net)
    g = grads(model, "backman", entry["x"], entry["y"])
    for name, value in entry["forgetting_hook"].items():
        if name.endswith(".bias") and name.startswith(("4.", "5.")):
            continue  # the top bias gets the raw error in both modes
        assert (g[name] - value).abs().max() > 1e-3, name


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_default_mode_matches_the_authors_master_hook(net):
    """alpha_mode 'fixed' with alpha 1 = master a2def09 models.py:14-57, for Linear and Conv2d."""
    model, entry = reference_net(net)
    g = grads(model, "backman", entry["x"], entry["y"], alpha_mode="fixed", alpha=1.0)
    for name, value in entry["master_hook"].items():
        torch.testing.assert_close(g[name], value, rtol=0, atol=1e-10, msg=name)


def test_frobenius_mode_float32_and_no_signal():
    model, entry = reference_net("cnn")
    model = model.float()
    g = grads(model, "backman", entry["x"].float(), entry["y"], alpha_mode="frobenius")
    for name, value in entry["forgetting_hook"].items():
        torch.testing.assert_close(g[name].double(), value, rtol=1e-4, atol=1e-6, msg=name)
    # No signal anywhere (zero input, no bias): zero updates, no NaN.
    model = mlp(bias=False)
    g = grads(model, "backman", torch.zeros(4, 10, dtype=torch.float64), torch.randint(0, 4, (4,)),
              alpha_mode="frobenius")
    for name, value in g.items():
        assert torch.equal(value, torch.zeros_like(value)), name


@pytest.mark.parametrize("options, msg", [
    ({"alpha_mode": "frob"}, "alpha_mode must be one of"), ({"alpha_mode": None}, "alpha_mode must be one of"),
    ({"alpha_mode": "Fixed"}, "alpha_mode must be one of"),
    ({"alpha_mode": "frobenius", "alpha": 0.5}, "leave alpha at 1"),
    ({"alpha_mode": "frobenius", "alpha": [1.0, 2.0, 1.0]}, "leave alpha at 1"),
    ({"alpha_mode": "frobenius", "unit_c": True}, "unit_c"),
])
def test_bad_alpha_mode_is_rejected(options, msg):
    model = mlp()
    with pytest.raises(ValueError, match=msg):
        apply_rule(model, "backman", **options)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
