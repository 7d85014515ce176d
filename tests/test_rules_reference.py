"""Every rule against a slow float64 reference written straight from its equations.

The references below never call bpfree's autograd functions: the forward and backward of
Linear and Conv2d are written out with explicit matmuls (conv via an explicit padding
operator and im2col), and each rule only decides which matrix B stands in for W when the
error is sent to the layer's input:

    bp:         B = W
    fa, wm:     B = the layer's stored random feedback (fixed until a mirror step)
    adafa:      B = W as it was when the rule was applied
    usf:        B = sqrt(2 / (fan_in + fan_out)) * sign(W)
    brsf/frsf:  B = |M| o sign(W)
    kp:         B = trainable feedback; dL/dW = dW_local + d*W, dL/dB = dW_local + d*B
    dfa:        the layer's input receives B_l e (e = dL/d(output)) and no W at all
    backman:    B = W, but each output neuron's error is scaled by c_i = 1 / ||dL/dW_i||
                (alpha = 1) before it is sent down and before the weight gradient is formed

The weight gradient is the true local one (error x input) for every rule, and the bias
gradient the summed error.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bpfree

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # 2 workers x N intra-op threads on 2 cores is ~5x slower

# LFP rules send a reward, not an error through a feedback matrix, and leader-follower rules
# train on per-layer local losses over several layers: their own float64 references are in
# tests/test_lfp.py and tests/test_lfnn.py.
RULES = [r for r in bpfree.list_layer_rules() if not r.startswith(("lfp", "lfnn"))]
SEEDS = (0, 1, 2)
KP_DECAY = 0.3  # large enough that a missing decay term shows far above 1e-10
TOL = 1e-10

# (name, input shape, in_features, out_features)
LINEAR_CASES = {
    "rank2": ((3, 5), 5, 4),
    "rank3": ((3, 2, 5), 5, 4),
}

# (name, conv kwargs, input shape)
CONV_CASES = {
    "plain": (dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 6, 6)),
    "stride2_pad1": (dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1), (2, 3, 7, 7)),
    "rect_stride_pad": (
        dict(in_channels=2, out_channels=3, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
        (2, 2, 7, 6),
    ),
    "groups_dilation": (
        dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2),
        (2, 4, 7, 7),
    ),
    "depthwise": (dict(in_channels=3, out_channels=3, kernel_size=3, padding=1, groups=3), (2, 3, 5, 5)),
    "reflect": (dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"), (2, 3, 6, 6)),
    "reflect_stride_dil": (
        dict(in_channels=2, out_channels=4, kernel_size=3, stride=2, padding=2, dilation=2, padding_mode="reflect"),
        (2, 2, 8, 7),
    ),
    "same": (dict(in_channels=3, out_channels=4, kernel_size=3, padding="same", dilation=2), (2, 3, 6, 6)),
    "same_reflect": (
        dict(in_channels=2, out_channels=4, kernel_size=(3, 5), padding="same", padding_mode="reflect", groups=2),
        (2, 2, 6, 7),
    ),
}


# --------------------------------------------------------------------------------------
# Reference layers
# --------------------------------------------------------------------------------------
def pad_operator(size: int, before: int, after: int, mode: str) -> torch.Tensor:
    """Matrix P (size+before+after, size) with padded = P @ x along one axis."""
    rows = []
    for i in range(-before, size + after):
        row = torch.zeros(size, dtype=torch.float64)
        if 0 <= i < size:
            row[i] = 1.0
        elif mode == "reflect":
            j = -i if i < 0 else 2 * (size - 1) - i
            row[j] = 1.0
        elif mode != "zeros":
            raise NotImplementedError(mode)
        rows.append(row)
    return torch.stack(rows)


def conv_pads(kwargs) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) padding per spatial axis, from the layer's arguments."""
    k = _pair(kwargs["kernel_size"])
    d = _pair(kwargs.get("dilation", 1))
    padding = kwargs.get("padding", 0)
    if padding == "same":
        out = []
        for ki, di in zip(k, d):
            total = di * (ki - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    if padding == "valid":
        return ((0, 0), (0, 0))
    p = _pair(padding)
    return ((p[0], p[0]), (p[1], p[1]))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


class RefConv:
    """Conv2d as P_h x P_w^T padding followed by grouped im2col matmuls."""

    def __init__(self, kwargs, x_shape):
        self.k = _pair(kwargs["kernel_size"])
        self.stride = _pair(kwargs.get("stride", 1))
        self.dilation = _pair(kwargs.get("dilation", 1))
        self.groups = kwargs.get("groups", 1)
        mode = kwargs.get("padding_mode", "zeros")
        (ph0, ph1), (pw0, pw1) = conv_pads(kwargs)
        _, _, h, w = x_shape
        self.Ph = pad_operator(h, ph0, ph1, mode)
        self.Pw = pad_operator(w, pw0, pw1, mode)
        self.padded_hw = (h + ph0 + ph1, w + pw0 + pw1)

    def cols(self, x):
        xp = self.Ph @ x @ self.Pw.t()
        return F.unfold(xp, self.k, dilation=self.dilation, stride=self.stride)  # (N, C*k, L)

    def out_hw(self):
        return tuple(
            (p - d * (k - 1) - 1) // s + 1 for p, d, k, s in zip(self.padded_hw, self.dilation, self.k, self.stride)
        )

    def _split(self, weight):
        g = self.groups
        return weight.reshape(g, weight.shape[0] // g, -1)  # (g, O/g, C/g*k)

    def forward(self, x, weight, bias):
        n = x.shape[0]
        cols = self.cols(x)
        cols = cols.reshape(n, self.groups, -1, cols.shape[-1])  # (N, g, C/g*k, L)
        out = torch.einsum("gok,ngkl->ngol", self._split(weight), cols).reshape(n, weight.shape[0], -1)
        if bias is not None:
            out = out + bias[None, :, None]
        return out.reshape(n, weight.shape[0], *self.out_hw())

    def grad_input(self, grad_out, feedback, x_shape):
        n = grad_out.shape[0]
        g = grad_out.reshape(n, self.groups, feedback.shape[0] // self.groups, -1)  # (N, g, O/g, L)
        grad_cols = torch.einsum("gok,ngol->ngkl", self._split(feedback), g).reshape(n, -1, g.shape[-1])
        grad_xp = F.fold(grad_cols, self.padded_hw, self.k, dilation=self.dilation, stride=self.stride)
        grad_x = self.Ph.t() @ grad_xp @ self.Pw  # adjoint of the padding operator
        assert grad_x.shape == x_shape
        return grad_x

    def grad_weight(self, grad_out, x, weight_shape):
        n = grad_out.shape[0]
        cols = self.cols(x).reshape(n, self.groups, -1, grad_out.shape[-1] * grad_out.shape[-2])
        g = grad_out.reshape(n, self.groups, weight_shape[0] // self.groups, -1)
        return torch.einsum("ngol,ngkl->gok", g, cols).reshape(weight_shape)


def ref_linear_forward(x, weight, bias):
    out = x @ weight.t()
    return out if bias is None else out + bias


def ref_linear_grad_input(grad_out, feedback):
    return grad_out @ feedback


def ref_linear_grad_weight(grad_out, x):
    return grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def usf_scale(weight) -> float:
    receptive = weight[0, 0].numel()
    fan_in, fan_out = weight.shape[1] * receptive, weight.shape[0] * receptive
    return math.sqrt(2.0 / (fan_in + fan_out))


def reference_feedback(rule, layer, weight_at_apply):
    """B from the rule's equation, given the state the rule keeps."""
    w = layer.weight.detach()
    if rule == "bp":
        return w
    if rule in ("fa", "wm", "kp"):
        return layer.feedback_weight.detach()
    if rule == "adafa":
        return weight_at_apply
    if rule == "usf":
        return usf_scale(w) * torch.sign(w)
    if rule in ("brsf", "frsf"):
        magnitude = layer.feedback_magnitude
        assert (magnitude >= 0).all(), "brSF/frSF magnitudes must be non-negative"
        return magnitude * torch.sign(w)
    raise AssertionError(f"no reference for rule {rule!r}: add one when registering a rule")


def dfa_grad_input(layer, grad_out, x):
    """B_l e in the shape of the layer's input (e broadcast per token for rank-3 inputs)."""
    matrix = layer.dfa_feedback.double()
    if x.dim() == 3:
        assert matrix.shape == (x.shape[-1], grad_out.shape[-1])
        return grad_out @ matrix.t()
    n = x.shape[0]
    assert matrix.shape == (x[0].numel(), grad_out[0].numel())
    return (grad_out.reshape(n, -1) @ matrix.t()).reshape(x.shape)


# --------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------
def _options(rule):
    return {"decay": KP_DECAY} if rule == "kp" else {}


def _run(rule, layer, x_shape, seed):
    torch.manual_seed(seed)
    weight_at_apply = layer.weight.detach().clone()
    handle = bpfree.apply_rule(layer, rule, **_options(rule))
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    return handle, weight_at_apply, x, y, grad_out


def _close(actual, expected, what):
    assert actual is not None, f"{what}: no gradient"
    assert actual.dtype == torch.float64, f"{what}: dtype {actual.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= TOL * max(1.0, expected.abs().max().item()), f"{what}: max abs error {err:.3e}"


def _check_rule_grads(rule, layer, handle, weight_at_apply, x, grad_out, grad_input_ref, local):
    if rule == "backman":
        c = 1.0 / local.flatten(1).norm(dim=1)
        shape = (-1, 1, 1) if local.dim() == 4 else ()
        scaled = grad_out * c.reshape(*shape) if shape else grad_out * c
        _close(x.grad, grad_input_ref(layer.weight.detach(), scaled), "input gradient (normalised signal)")
        _close(layer.weight.grad, local * c.reshape(-1, *([1] * (local.dim() - 1))), "weight gradient")
        return
    if rule == "dfa":
        expected_gx = dfa_grad_input(layer, grad_out, x)
    else:
        feedback = reference_feedback(rule, layer, weight_at_apply)
        assert feedback.shape == layer.weight.shape
        expected_gx = grad_input_ref(feedback)
    _close(x.grad, expected_gx, "input gradient")
    w = layer.weight.detach()
    expected_gw = local + KP_DECAY * w if rule == "kp" else local
    _close(layer.weight.grad, expected_gw, "weight gradient")
    if rule == "kp":
        fb = layer.feedback_weight
        assert isinstance(fb, nn.Parameter)
        _close(fb.grad, local + KP_DECAY * fb.detach(), "KP feedback gradient")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("rule", RULES)
def test_linear_matches_reference(rule, case, bias, seed):
    x_shape, fin, fout = LINEAR_CASES[case]
    torch.manual_seed(1000 + seed)
    layer = nn.Linear(fin, fout, bias=bias).double()
    handle, w0, x, y, grad_out = _run(rule, layer, x_shape, seed)
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    _close(y.detach(), ref_linear_forward(x.detach(), w, b), "forward")
    local = ref_linear_grad_weight(grad_out, x.detach())
    _check_rule_grads(rule, layer, handle, w0, x, grad_out,
                      lambda fb, g=grad_out: ref_linear_grad_input(g, fb), local)
    if bias:
        _close(layer.bias.grad, grad_out.reshape(-1, fout).sum(0), "bias gradient")
    else:
        assert layer.bias is None


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("rule", RULES)
def test_conv2d_matches_reference(rule, case, bias, seed):
    kwargs, x_shape = CONV_CASES[case]
    torch.manual_seed(2000 + seed)
    layer = nn.Conv2d(**kwargs, bias=bias).double()
    ref = RefConv(kwargs, x_shape)
    handle, w0, x, y, grad_out = _run(rule, layer, x_shape, seed)
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    _close(y.detach(), ref.forward(x.detach(), w, b), "forward")
    local = ref.grad_weight(grad_out, x.detach(), w.shape)
    _check_rule_grads(
        rule, layer, handle, w0, x, grad_out, lambda fb, g=grad_out: ref.grad_input(g, fb, x.shape), local
    )
    if bias:
        _close(layer.bias.grad, grad_out.sum((0, 2, 3)), "bias gradient")


@pytest.mark.parametrize("case", ["stride2_pad1", "groups_dilation", "reflect", "same"])
def test_reference_conv_is_torch_conv(case):
    """The reference itself is checked against torch autograd for BP, so it cannot be wrong in
    the same way as the fast path without the BP rows above failing too."""
    kwargs, x_shape = CONV_CASES[case]
    torch.manual_seed(3)
    layer = nn.Conv2d(**kwargs).double()
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref = RefConv(kwargs, x_shape)
    _close(ref.forward(x.detach(), layer.weight.detach(), layer.bias.detach()), y.detach(), "ref forward")
    _close(ref.grad_input(g, layer.weight.detach(), x.shape), x.grad, "ref grad input")
    _close(ref.grad_weight(g, x.detach(), layer.weight.shape), layer.weight.grad, "ref grad weight")


@pytest.mark.parametrize("rule", [r for r in RULES if r not in ("bp", "adafa")])
def test_reference_feedback_is_not_weight(rule):
    """Guards the reference comparisons above against a vacuous pass: apart from bp and
    adafa-at-apply-time, each rule's input gradient must differ from BP's."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5).double()
    handle, w0, x, y, grad_out = _run(rule, layer, (4, 6), 0)
    bp_grad = grad_out @ layer.weight.detach()
    assert (x.grad - bp_grad).abs().max() > 1e-3


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_dfa_kernel_feedback_matches_the_transposed_convolution_written_out(stride, padding, dilation):
    """conv_feedback='kernel' (biotorch's DFA for Conv2d): the error e (N, C) is copied to every
    output position (oh, ow) and sent back through the kernel B (C, C_in, kh, kw):
    dL/dx[n, c, i, j] = sum over k, oh, ow of e[n, k] B[k, c, i - oh*s + p, j - ow*s + p]
    (where the kernel index, divided by the dilation, is a valid tap)."""
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation).double()
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).double()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)
    model(x)  # materialise the lazy layer before converting
    bpfree.apply_rule(model, "dfa", conv_feedback="kernel", seed=3)
    out = model(x)
    e = torch.randn_like(out)
    out.backward(e)
    kernel = conv.dfa_feedback.double()
    assert kernel.shape == (5, 3, 3, 3)
    bound = (6.0 / ((3 + 5) * 9)) ** 0.5  # Xavier-uniform over the kernel's own fans
    assert kernel.abs().max() <= bound
    out_h = (7 + 2 * padding - dilation * 2 - 1) // stride + 1
    expected = torch.zeros_like(x)
    for n in range(2):
        for k in range(5):
            for oh in range(out_h):
                for ow in range(out_h):
                    for a in range(3):
                        for b in range(3):
                            i, j = oh * stride - padding + a * dilation, ow * stride - padding + b * dilation
                            if 0 <= i < 7 and 0 <= j < 7:
                                expected[n, :, i, j] += e[n, k] * kernel[k, :, a, b]
    _close(x.grad, expected, "input gradient (kernel-shaped DFA)")


def test_kp_without_decay_keeps_w_minus_b_at_its_start():
    """decay 0 (the reference code's reported run): equal increments, so B - W never moves."""
    torch.manual_seed(3)
    layer = nn.Linear(6, 4).double()
    bpfree.apply_rule(layer, "kp", decay=0.0, seed=1)
    offset = (layer.feedback_weight - layer.weight).detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.3)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(8, 6, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(offset, torch.zeros_like(offset))
    _close((layer.feedback_weight - layer.weight).detach(), offset, "B - W after 5 steps")


def test_wm_hebbian_mirror_is_the_reference_codes_update():
    """mirror 'hebbian' (fcnn/FCNN_WM.py:48-51): x = a (U[0,1) - 1/2), y = sigmoid(W x + b),
    B += eta_m y^T x over the noise batch, no decay; warmup_steps of it at apply time."""
    torch.manual_seed(4)
    layer = nn.Linear(5, 3).double()
    opts = dict(mirror="hebbian", mirror_lr=0.01, mirror_batch=7, noise_amplitude=0.1,
                mirror_activation="sigmoid", warmup_steps=2, seed=11)
    handle = bpfree.apply_rule(layer, "wm", **opts)
    rule = handle.rule
    w, b = layer.weight.detach(), layer.bias.detach()

    def step(draw):  # the rule's generator for its draw-th use is seeded with seed + draw
        x = torch.rand((7, 5), generator=torch.Generator().manual_seed(11 + draw), dtype=torch.float64)
        x = 0.1 * (x - 0.5)
        return 0.01 * torch.sigmoid(x @ w.t() + b).t() @ x

    initial = draw_like = torch.empty_like(w)
    torch.nn.init.xavier_uniform_(draw_like, generator=torch.Generator().manual_seed(11))
    _close(layer.feedback_weight.detach(), initial + step(1) + step(2), "B after 2 warm-up mirror steps")
    before = layer.feedback_weight.detach().clone()
    rule.mirror(layer)
    _close(layer.feedback_weight.detach(), before + step(3), "B after one more mirror step")
    with pytest.raises(ValueError, match="Linear layers only"):
        bpfree.apply_rule(nn.Conv2d(2, 2, 3), "wm", mirror="hebbian")
