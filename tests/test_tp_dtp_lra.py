"""TP, DTP and LRA at block granularity, and FA/WM/KP on the BERT-style encoder.

The float64 references below are written from the equations in the module docstring of
bpfree/rules/tp_dtp_lra.py, without the rule's hooks.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree.models import build_model
from bpfree.rules import apply_rule, get_rule_class
from bpfree.loop import optimisation_step

BLOCK_RULES = ("tp", "dtp", "lra")


class TanhBlocks(nn.Module):
    """Embedding Linear, blocks of Linear + tanh, a Linear head: the smallest block model."""

    def __init__(self, d_in=4, width=5, depth=2, classes=3, activation=nn.Tanh):
        super().__init__()
        self.embed = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), activation()) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def tiny_bert(depth=3, seed=0):
    torch.manual_seed(seed)
    return build_model("bert_classifier", 3, vocab_size=50, dim=16, depth=depth, heads=2, ffn_dim=32,
                       max_len=12, dropout=0.0)


def token_batch(batch=6, length=10, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (batch, length), generator=gen)
    segments = torch.zeros_like(ids)
    segments[:, length // 2:] = 1
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return torch.stack([ids, segments, mask], 1), torch.randint(0, 3, (batch,), generator=gen)


def reference_gradients(model, rule, x, y, options, noise_seed):
    """Every parameter's gradient after one step of `rule`, from the equations, in float64."""
    embed, head = model.embed, model.head
    linears = [block[0] for block in model.blocks]
    feedback = model.bpfree_feedback
    batch = x.shape[0]
    h = [x @ embed.weight.T + embed.bias]
    for linear in linears:
        h.append(torch.tanh(h[-1] @ linear.weight.T + linear.bias))
    logits = h[-1] @ head.weight.T + head.bias
    delta_out = (torch.softmax(logits, 1) - F.one_hot(y, 3).double()) / batch  # dL/dlogits, batch mean
    grads = {"head.weight": delta_out.T @ h[-1], "head.bias": delta_out.sum(0)}
    dl_dh_top = delta_out @ head.weight * batch  # per-example loss gradient at the head's input

    def inverse(index, v):
        g = feedback[index]
        z = v @ g.linear.weight.T + g.linear.bias
        mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        return (z - mean) / torch.sqrt(var + g.norm.eps) * g.norm.weight + g.norm.bias

    t = [None] * len(h)
    t[-1] = h[-1] - options["target_lr"] * dl_dh_top
    for l in range(len(h) - 1, 0, -1):
        if rule == "tp":
            t[l - 1] = inverse(l - 1, t[l])
        elif rule == "dtp":
            t[l - 1] = h[l - 1] + inverse(l - 1, t[l]) - inverse(l - 1, h[l])
        else:
            t[l - 1] = h[l - 1] - options["beta"] * (h[l] - t[l]) @ feedback[l - 1].weight.T
    # layer losses 1/2 ||h - t||^2 / B; tanh blocks: delta = (h - t)(1 - h^2)
    err0 = (h[0] - t[0]) / batch
    grads["embed.weight"], grads["embed.bias"] = err0.T @ x, err0.sum(0)
    for l, linear in enumerate(linears, start=1):
        delta = (h[l] - t[l]) * (1 - h[l] ** 2) / batch
        grads[f"blocks.{l - 1}.0.weight"], grads[f"blocks.{l - 1}.0.bias"] = delta.T @ h[l - 1], delta.sum(0)
    # feedback losses, with the noise drawn in the rule's order (block 0 first)
    torch.manual_seed(noise_seed)
    noise = options["noise"]
    for l, linear in enumerate(linears):
        below = h[l]
        eps = noise * torch.randn_like(below)
        f = lambda v: torch.tanh(v @ linear.weight.T + linear.bias)  # noqa: E731
        if rule in ("tp", "dtp"):
            g = feedback[l]
            response = f(below + eps)
            z = response @ g.linear.weight.T + g.linear.bias
            z = z.detach().requires_grad_(True)
            weight = g.norm.weight.detach().clone().requires_grad_(True)
            bias = g.norm.bias.detach().clone().requires_grad_(True)
            with torch.enable_grad():  # LayerNorm's own backward, on a graph of its inputs only
                recon = F.layer_norm(z, (z.shape[-1],), weight, bias, g.norm.eps)
                loss = 0.5 * (recon - (below + eps)).pow(2).sum() / batch
                dz, dw, db = torch.autograd.grad(loss, (z, weight, bias))
            grads[f"bpfree_feedback.{l}.linear.weight"] = dz.T @ response
            grads[f"bpfree_feedback.{l}.linear.bias"] = dz.sum(0)
            grads[f"bpfree_feedback.{l}.norm.weight"], grads[f"bpfree_feedback.{l}.norm.bias"] = dw, db
        else:
            response = f(below + eps) - f(below)
            residual = eps @ feedback[l].weight - response
            grads[f"bpfree_feedback.{l}.weight"] = eps.T @ residual / batch / noise ** 2
    return grads


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rule", BLOCK_RULES)
def test_block_rules_match_float64_reference(rule, seed):
    torch.manual_seed(seed)
    model = TanhBlocks(depth=3).double()
    options = {"target_lr": 0.7, "noise": 0.3}
    if rule == "lra":
        options["beta"] = 0.8
    handle = apply_rule(model, rule, **options)
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    with torch.no_grad():
        expected = reference_gradients(model, rule, x, y, options, noise_seed=100 + seed)
    torch.manual_seed(100 + seed)
    loss = F.cross_entropy(model(x), y)
    handle.add_local_loss(loss, y).backward()
    names = dict(model.named_parameters())
    assert set(expected) == set(names)
    for name, grad in expected.items():
        torch.testing.assert_close(names[name].grad, grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("rule", ["dtp", "lra"])
def test_target_equals_activation_when_output_target_equals_output(rule):
    """DTP's difference correction (and LRA's zero error units) leave every layer where it is."""
    model = tiny_bert()
    handle = apply_rule(model, rule)
    x, _ = token_batch()
    model(x)
    recorded = handle.rule._recorded
    hidden = [h.detach() for h in recorded.inputs] + [recorded.top_output.detach()]
    targets = handle.rule.layer_targets(recorded, torch.zeros_like(hidden[-1]))
    for h, t in zip(hidden, targets):
        torch.testing.assert_close(t, h, rtol=0, atol=1e-6)


def test_plain_tp_has_no_difference_correction():
    model = tiny_bert()
    handle = apply_rule(model, "tp")
    x, _ = token_batch()
    model(x)
    recorded = handle.rule._recorded
    targets = handle.rule.layer_targets(recorded, torch.zeros_like(recorded.top_output))
    assert (targets[0] - recorded.inputs[0].detach()).abs().max() > 0.1  # g_1(h_1) is not h_0


@pytest.mark.parametrize("rule", BLOCK_RULES)
def test_no_gradient_crosses_block_boundaries(rule):
    model = tiny_bert(depth=3)
    handle = apply_rule(model, rule)
    seen = []

    def inspect_input(block, args):
        seen.append(args[0])
    hooks = [block.register_forward_pre_hook(inspect_input) for block in model.blocks]
    pooled = []
    hooks.append(model.pooler.register_forward_pre_hook(lambda m, args: pooled.append(args[0])))
    x, y = token_batch()
    loss = F.cross_entropy(model(x), y)
    assert all(not h.requires_grad for h in seen)  # every block reads a detached input
    assert pooled[0].grad_fn is not None and pooled[0].grad_fn.next_functions[0][0] is not None
    loss.backward()  # the global loss alone reaches only the head
    for name, p in model.named_parameters():
        if name.startswith(("pooler", "classifier")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("rule", BLOCK_RULES)
def test_block_losses_stay_inside_their_block(rule):
    """A block's parameters get the same gradient whether or not the blocks above exist in
    the graph: a change of block 2's weights after the targets are fixed cannot reach block 0."""
    model = tiny_bert(depth=3)
    handle = apply_rule(model, rule)
    x, y = token_batch()
    torch.manual_seed(5)
    loss = F.cross_entropy(model(x), y)
    handle.add_local_loss(loss, y).backward()
    first = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith("blocks.0.")}
    model.zero_grad()
    # second step with block 2's output scaled inside the graph: only targets may change
    torch.manual_seed(5)
    loss = F.cross_entropy(model(x), y)
    recorded = handle.rule._recorded
    local = handle.rule.local_loss(y, loss)
    grads = torch.autograd.grad(local, [p for n, p in model.named_parameters() if n.startswith("blocks.0.")],
                                allow_unused=True)
    for (name, expected), grad in zip(first.items(), grads):
        torch.testing.assert_close(grad, expected, msg=name)
    # and block 0's loss term has no path into block 1's or 2's parameters
    h1 = recorded.inputs[1]
    upstream = torch.autograd.grad(0.5 * h1.pow(2).sum(), [p for n, p in model.named_parameters()
                                                           if n.startswith(("blocks.1.", "blocks.2."))],
                                   allow_unused=True)
    assert all(g is None for g in upstream)


def test_lra_target_moves_against_the_error():
    """With E_l = W_l^T (the exact Jacobian of a linear block) the target of the layer below
    is a step down the per-example loss gradient, scaled by beta x target_lr."""
    torch.manual_seed(0)
    model = TanhBlocks(depth=2, activation=nn.Identity).double()
    handle = apply_rule(model, "lra", target_lr=0.5, beta=0.4)
    with torch.no_grad():
        for block, feedback in zip(model.blocks, model.bpfree_feedback):
            feedback.weight.copy_(block[0].weight.T)
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = model(x)
    recorded = handle.rule._recorded
    hidden = [h.detach().requires_grad_(True) for h in recorded.inputs]
    # the per-example loss gradient at h_1 (the last block's input), through the real graph
    with handle.suspended():
        out = model.head(model.blocks[1](hidden[1]))
    (grad_h1,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), hidden[1])
    loss = F.cross_entropy(logits, y)
    (top_grad,) = torch.autograd.grad(loss, recorded.top_leaf, retain_graph=True)
    targets = handle.rule.layer_targets(recorded, top_grad * len(y))
    displacement = targets[1] - hidden[1].detach()
    torch.testing.assert_close(displacement, -0.4 * 0.5 * grad_h1)
    assert (displacement * grad_h1).sum() < 0


def test_lra_error_weights_learn_the_transposed_jacobian():
    torch.manual_seed(0)
    model = TanhBlocks(depth=1, width=6, activation=nn.Identity)
    handle = apply_rule(model, "lra", noise=0.5)
    weight = model.blocks[0][0].weight.detach()
    feedback = model.bpfree_feedback[0].weight
    optimizer = torch.optim.SGD([feedback], lr=0.05)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))

    def angle():
        cos = F.cosine_similarity(feedback.detach().flatten(), weight.T.flatten(), dim=0)
        return torch.rad2deg(torch.acos(cos.clamp(-1, 1))).item()
    before = angle()
    for _ in range(300):
        optimizer.zero_grad()
        model.zero_grad()
        handle.add_local_loss(F.cross_entropy(model(x), y), y).backward()
        optimizer.step()
    assert before > 45 and angle() < 5


@pytest.mark.parametrize("rule", ["fa", "wm", "kp"])
def test_weight_transport_rules_with_feedback_equal_weight_match_bp_on_bert(rule):
    x, y = token_batch()
    reference = tiny_bert()
    F.cross_entropy(reference(x), y).backward()
    model = tiny_bert()
    # KP's gradient carries its decay term d x W; a negligible d leaves the transport itself
    handle = apply_rule(model, rule, **({"decay": 1e-12} if rule == "kp" else {}))
    assert handle.counts == {"Linear": 6 * 3 + 2}  # q, k, v, out, ffn1, ffn2 per block; pooler; classifier
    with torch.no_grad():
        for layer in handle.layers:
            layer.feedback_weight.copy_(layer.weight)
    F.cross_entropy(model(x), y).backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name in ref:
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-5, atol=1e-7, msg=name)


def test_fa_with_random_feedback_differs_from_bp_on_bert():
    x, y = token_batch()
    reference = tiny_bert()
    F.cross_entropy(reference(x), y).backward()
    model = tiny_bert()
    apply_rule(model, "fa")
    F.cross_entropy(model(x), y).backward()
    assert not torch.allclose(model.blocks[0].ffn1.weight.grad, reference.blocks[0].ffn1.weight.grad)


@pytest.mark.parametrize("rule", BLOCK_RULES)
def test_block_rules_train_bert_and_restore(rule):
    model = tiny_bert(depth=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = apply_rule(model, rule)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # after apply_rule: the feedback maps
    assert any(p is q for p in optimizer.param_groups[0]["params"] for q in model.bpfree_feedback.parameters())
    x, y = token_batch(batch=12)
    losses = [optimisation_step(model, handle, optimizer, x, y)[0].item() for _ in range(40)]
    assert losses[-1] < losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))
    handle.remove()
    assert not hasattr(model, "bpfree_feedback")
    assert set(model.state_dict()) == set(before)
    with handle.suspended():
        pass  # suspending a removed handle is harmless


def test_block_rules_reject_bad_models_options_and_misuse():
    with pytest.raises(ValueError, match="`blocks`"):
        apply_rule(build_model("mlp", 10, in_features=784), "dtp")
    with pytest.raises(ValueError, match="noise must be a number > 0"):
        apply_rule(tiny_bert(), "dtp", noise=0)
    with pytest.raises(ValueError, match="unknown option"):
        apply_rule(tiny_bert(), "tp", beta=1.0)
    model = tiny_bert()
    handle = apply_rule(model, "lra")
    x, y = token_batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="add_local_loss"):
        handle.before_step()
    model(x)
    with pytest.raises(ValueError, match="global loss"):
        handle.local_loss(y)


def test_block_rules_are_registered_as_block_level():
    assert set(BLOCK_RULES) <= set(bpfree.list_rules())
    assert not set(BLOCK_RULES) & set(bpfree.list_layer_rules())
    assert all(get_rule_class(r).granularity == "block" for r in BLOCK_RULES)


@pytest.mark.parametrize("rule", BLOCK_RULES)
def test_suspended_block_rule_is_plain_bp(rule):
    x, y = token_batch()
    reference = tiny_bert()
    F.cross_entropy(reference(x), y).backward()
    model = tiny_bert()
    handle = apply_rule(model, rule)
    with handle.suspended():
        F.cross_entropy(model(x), y).backward()
    ref = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name in ref:
            torch.testing.assert_close(p.grad, ref[name].grad, msg=name)
