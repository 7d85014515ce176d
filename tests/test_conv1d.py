"""Conv1d under every layer rule: exactly the rule's Conv2d on a height-1 input, in float64,
plus direct float64 references for FA's and DFA's kernel feedback on Conv1d."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import tiny_options
import bpfree

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

RULES = bpfree.list_layer_rules()


def conv_net(one_d: bool, padding_mode: str = "circular") -> nn.Sequential:
    """Two convs (zero and circular padding, stride 2, dilation 2) and a Linear head; with
    one_d=False the same net as Conv2d of kernel (1, k) on (N, C, 1, L) inputs."""
    def conv(cin, cout, k, **kw):
        if one_d:
            return nn.Conv1d(cin, cout, k, **kw)
        lift = {key: ((0 if key == "padding" else 1, v) if isinstance(v, int) else v) for key, v in kw.items()}
        return nn.Conv2d(cin, cout, (1, k), **lift)
    return nn.Sequential(
        conv(3, 4, 3, padding=1),
        nn.ReLU(),
        conv(4, 6, 3, stride=2, dilation=2, padding=2, padding_mode=padding_mode),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 6, 3),
    ).double()


def paired_nets(rule: str, options: dict):
    mode = "zeros" if options.get("conv_feedback") == "kernel" else "circular"  # kernel DFA: zero padding only
    torch.manual_seed(0)
    net1 = conv_net(True, mode)
    net2 = conv_net(False, mode)
    with torch.no_grad():
        for a, b in zip(net1.parameters(), net2.parameters()):
            b.copy_(a.view_as(b))
    torch.manual_seed(1)
    h1 = bpfree.apply_rule(net1, rule, **options)
    torch.manual_seed(1)
    h2 = bpfree.apply_rule(net2, rule, **options)
    return net1, h1, net2, h2


def rule_state(layer):
    """The rule's own tensors on a layer (feedback, read-outs), by name."""
    own = {**layer._buffers, **layer._parameters}
    return {k: v for k, v in own.items() if k not in ("weight", "bias") and v is not None}


def step(net, handle, x, y):
    net.zero_grad()
    out = net(x)
    handle.add_local_loss(F.cross_entropy(out, y), y).backward()
    return out


CASES = [(rule, {}) for rule in RULES] + [("dfa", {"conv_feedback": "kernel"}), ("backman", {"alpha_mode": "frobenius"})]


@pytest.mark.parametrize("rule,extra", CASES, ids=[f"{r}{'-' + '-'.join(e.values()) if e else ''}" for r, e in CASES])
def test_a_layer_rule_on_conv1d_is_the_rule_on_a_height_one_conv2d_in_float64(rule, extra):
    """Every gradient (and WM's mirrored B) of a Conv1d net under a rule equals the same rule
    on the height-1 Conv2d net, whose conv paths the float64 references of
    test_rules_reference.py cover: Conv1d is governed, not silently back-propagated."""
    options = {**tiny_options(rule), **extra}
    net1, h1, net2, h2 = paired_nets(rule, options)
    assert h1.counts == {"Conv1d": 2, "Linear": 1} and not h1.report.ungoverned
    x = torch.randn(5, 3, 12, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    differs_from_bp = []
    exactly_bp = rule == "bp" or (rule == "backman" and not extra)  # BackMAN's c = 1 is BP exactly
    for _ in range(2):  # the second step runs on state the first changed (WM's B, brSF's draw)
        for l1, l2 in zip(h1.layers, h2.layers):
            s1, s2 = rule_state(l1), rule_state(l2)
            assert s1.keys() == s2.keys()
            with torch.no_grad():
                for k in s1:
                    s2[k].copy_(s1[k].view_as(s2[k]))
        torch.manual_seed(3)  # rules that draw per batch (brSF) or lazily (DFA) draw alike
        out1 = step(net1, h1, x, y)
        torch.manual_seed(3)
        out2 = step(net2, h2, x.unsqueeze(2), y)
        torch.testing.assert_close(out1, out2, rtol=0, atol=1e-12)
        for (name, p), q in zip(net1.named_parameters(), net2.parameters()):
            if p.grad is None:
                assert q.grad is None, name
                continue
            torch.testing.assert_close(p.grad, q.grad.view_as(p.grad), rtol=0, atol=1e-10, msg=name)
        if not exactly_bp:
            bp = conv_net(True)
            bp.load_state_dict({k: v for k, v in net1.state_dict().items() if k in bp.state_dict()})
            bp.zero_grad()
            F.cross_entropy(bp(x), y).backward()
            differs_from_bp.append(not torch.allclose(bp[0].weight.grad, net1[0].weight.grad))
        for opt_net, handle in ((net1, h1), (net2, h2)):
            handle.before_step()
            with torch.no_grad():
                for p in opt_net.parameters():
                    if p.grad is not None:
                        p -= 0.1 * p.grad
            torch.manual_seed(2)  # WM's mirror noise
            handle.after_step()
        for l1, l2 in zip(h1.layers, h2.layers):
            for k, v in rule_state(l1).items():
                torch.testing.assert_close(v, rule_state(l2)[k].view_as(v), rtol=0, atol=1e-12, msg=k)
    assert exactly_bp or any(differs_from_bp)


@pytest.mark.parametrize("padding,mode", [(2, "zeros"), ("same", "circular"), ("valid", "reflect")])
def test_fa_on_conv1d_sends_the_error_through_b_against_torch_reference_in_float64(padding, mode):
    """FA on Conv1d: input gradient = the transposed convolution of the error with B (after
    the padding mode's own backward); kernel gradient = the true local one."""
    torch.manual_seed(0)
    stride, dilation = (1, 3) if padding == "same" else (2, 2)
    layer = nn.Conv1d(3, 4, 3, stride=stride, dilation=dilation, padding=padding, padding_mode=mode).double()
    handle = bpfree.apply_rule(layer, "fa")
    B = layer.feedback_weight.clone()
    x = torch.randn(2, 3, 17, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    # reference: pad as the mode does, then the plain transposed conv with B
    ref_x = x.detach().clone().requires_grad_(True)
    if mode == "zeros":
        pad = 2 if padding == 2 else 0
        padded, conv_pad = ref_x, pad
    else:
        pad = dilation * (3 - 1) // 2 if padding == "same" else 0
        padded, conv_pad = F.pad(ref_x, (pad, pad), mode=mode), 0
    grad_padded = torch.nn.grad.conv1d_input(padded.shape, B, g, stride, conv_pad, dilation)
    padded.backward(grad_padded)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=0, atol=1e-12)
    grad_w = torch.nn.grad.conv1d_weight(padded.detach(), layer.weight.shape, g, stride, conv_pad, dilation)
    torch.testing.assert_close(layer.weight.grad, grad_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 2)), rtol=0, atol=1e-12)
    bp_x = x.detach().clone().requires_grad_(True)
    with handle.suspended():
        layer(bp_x).backward(g)
    assert not torch.allclose(x.grad, bp_x.grad)
    handle.remove()


def test_dfa_kernel_feedback_on_conv1d_against_an_explicit_loop_in_float64():
    """biotorch's kernel-shaped DFA on a Conv1d, written as the sum it is: every output
    position t sends sum_c e_c B[c, :, j] to input position t*stride + j*dilation - padding."""
    torch.manual_seed(0)
    conv = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1).double()
    head = nn.Linear(3 * 5, 4).double()
    net = nn.Sequential(conv, nn.Flatten(), head)
    bpfree.apply_rule(net, "dfa", conv_feedback="kernel")
    x = torch.randn(2, 2, 10, dtype=torch.float64, requires_grad=True)
    out = net(x)
    e = torch.randn_like(out)
    out.backward(e)
    B = conv.dfa_feedback
    assert B.shape == (4, 2, 3)
    ref = torch.zeros_like(x)
    for n in range(2):
        for t in range(5):
            for j in range(3):
                pos = t * 2 + j - 1
                if 0 <= pos < 10:
                    ref[n, :, pos] += (e[n, :, None] * B[:, :, j]).sum(0)
    torch.testing.assert_close(x.grad, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rule", RULES)
def test_every_layer_rule_trains_a_conv1d_model(rule):
    from test_apply_rule import train_step
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6, 3))
    handle = bpfree.apply_rule(model, rule, **tiny_options(rule))
    assert handle.counts == {"Conv1d": 2, "Linear": 1}
    train_step(model, handle, torch.randn(4, 2, 8), torch.tensor([0, 1, 2, 1]))
    handle.remove()
    assert all(type(m) in (nn.Conv1d, nn.ReLU, nn.Flatten, nn.Linear) for m in model[:])
