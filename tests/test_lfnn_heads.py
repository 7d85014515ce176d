"""Rule `lfnn_heads`: the LFNN authors' released step, checked against their Keras code in float64."""
from __future__ import annotations

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree.rules import lfnn_heads as leader_heads
from bpfree.loop import optimisation_step

REFERENCE = Path(__file__).resolve().parent / "reference" / "lfnn_tf_reference.npz"
TOLERANCE = 1e-10
# torch layer of the small net <- the Keras Dense whose weights it gets (tests/reference/lfnn_tf_reference.py)
LAYERS = {"backbone": 0, "proj": 2, "global": 4}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets: one intra-op thread (several threads on busy cores made a 40-step run take seconds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as data:
        return {k: data[k] for k in data.files}


def small_net() -> nn.Sequential:
    """12 -> 16 relu (backbone) -> 8 relu (the LF block's input_proj) -> 10 (the global head)."""
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10)).double()


def authors_step(ref: dict, mutate=None):
    """The rule's step on the reference net and batch: (losses, leaders, {name: (dW, db)} in Keras layout)."""
    model = small_net()
    handle = bpfree.apply_rule(model, "lfnn_heads", workers=32, delta=0.7)
    heads = handle.rule.heads
    modules = {**{name: model[i] for name, i in LAYERS.items()}, "workers": heads}
    with torch.no_grad():
        for name, layer in modules.items():
            layer.weight.copy_(torch.from_numpy(ref[f"{name}_kernel"]).T)  # Keras kernels are (in, out)
            layer.bias.copy_(torch.from_numpy(ref[f"{name}_bias"]))
    x, y = torch.from_numpy(ref["x"]), torch.from_numpy(ref["y"]).long()
    loss = F.cross_entropy(model(x), y)  # the global head's CE: the trainer's loss
    total = handle.add_local_loss(loss, y)
    total.backward()
    selection = handle.rule.last_selection
    losses = [selection["leader_loss"].item(), selection["follower_loss"].item(), loss.item(), total.item()]
    grads = {name: (layer.weight.grad.T.numpy(), layer.bias.grad.numpy()) for name, layer in modules.items()}
    handle.remove()
    return losses, selection["leaders"].numpy(), grads


def max_grad_error(grads, ref) -> float:
    return max(float(np.abs(g - ref[f"grad_{name}_{part}"]).max())
               for name, pair in grads.items() for part, g in zip(("kernel", "bias"), pair))


# ------------------------------------------------------------------------------------ reference
def test_matches_the_authors_keras_train_step_in_float64(reference):
    losses, leaders, grads = authors_step(reference)
    np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=TOLERANCE)
    assert losses[3] == pytest.approx(sum(losses[:3]), abs=1e-12)  # leader + follower + global, weights 1
    assert leaders.shape == (16, 23)
    assert (leaders == reference["leader_idx"]).all()  # the same 23 leaders per sample, in CE order
    assert set(grads) == {"backbone", "proj", "workers", "global"}
    assert max_grad_error(grads, reference) < TOLERANCE
    # plain backprop: every parameter, the backbone included, gets a non-zero gradient
    assert all(np.abs(g).max() > 1e-3 for pair in grads.values() for g in pair)


def _mutated(function, old: str, new: str):
    """`function` recompiled from its source with one line changed (the line must exist)."""
    source = inspect.getsource(function)
    assert source.count(old) == 1, old
    namespace: dict = {}
    exec(compile(source.replace(old, new), inspect.getsourcefile(function), "exec"),  # noqa: S102
         vars(leader_heads), namespace)
    return namespace[function.__name__]


MUTATIONS = {
    "floor_for_ceil": (leader_heads.leader_count, "math.ceil(product.item())", "math.floor(product.item())"),
    "best_target_not_detached": (leader_heads.leader_follower_losses,
                                 "order[:, 0]].detach()", "order[:, 0]]"),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_one_line_mutation_breaks_the_reference_match(reference, mutation, monkeypatch):
    function, old, new = MUTATIONS[mutation]
    monkeypatch.setattr(leader_heads, function.__name__, _mutated(function, old, new))
    losses, leaders, grads = authors_step(reference)
    error = max_grad_error(grads, reference)
    assert error > 1e3 * TOLERANCE, f"{mutation}: gradients still within {error:.1e} of the reference"
    if mutation == "floor_for_ceil":
        assert leaders.shape == (16, 22)
    else:  # the same losses and leaders: only the gradient path through the target changed
        np.testing.assert_allclose(losses, reference["losses"], rtol=0, atol=TOLERANCE)
        assert (leaders == reference["leader_idx"]).all()


# ------------------------------------------------------------------------------------ semantics
def test_heads_are_one_keras_initialised_linear_the_optimizer_sees():
    torch.manual_seed(0)
    model = small_net()
    before = list(model.parameters())
    handle = bpfree.apply_rule(model, "lfnn_heads")
    heads = handle.rule.heads
    assert type(heads) is nn.Linear and (heads.in_features, heads.out_features) == (8, 320)
    assert heads.weight.dtype == torch.float64
    assert model[4].lfnn_heads is heads and "4.lfnn_heads.weight" in model.state_dict()
    params = list(model.parameters())
    assert len(params) == len(before) + 2 and any(p is heads.weight for p in params)
    bound = math.sqrt(6 / (8 + 320))  # Glorot-uniform of one Dense(8 -> 32 x 10), as Keras
    assert heads.weight.abs().max() <= bound and heads.weight.abs().max() > 0.9 * bound
    assert torch.equal(heads.bias, torch.zeros(320, dtype=torch.float64))
    assert handle.counts == {"Linear": 3} and handle.rule.leaders == 23


def test_forward_and_evaluation_are_unchanged():
    torch.manual_seed(1)
    model = small_net()
    x, y = torch.randn(5, 12, dtype=torch.float64), torch.randint(0, 10, (5,))
    expected = model(x)
    handle = bpfree.apply_rule(model, "lfnn_heads", workers=4, delta=0.5)
    assert torch.equal(model(x), expected)  # the prediction is the classifier's
    handle.local_loss(y)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    assert handle.local_loss(y) is None  # nothing captured by a no-grad forward
    with handle.suspended():
        model(x)
    assert handle.local_loss(y) is None  # nor while suspended (plain BP)
    loss = F.cross_entropy(model(x), y)
    assert handle.add_local_loss(loss, y) > loss


def test_delta_one_has_no_followers():
    torch.manual_seed(2)
    model = small_net()
    handle = bpfree.apply_rule(model, "lfnn_heads", workers=4, delta=1.0)
    y = torch.randint(0, 10, (6,))
    model(torch.randn(6, 12, dtype=torch.float64))
    handle.local_loss(y)
    assert handle.rule.leaders == 4 and handle.rule.last_selection["follower_loss"].item() == 0.0


def test_leader_count_is_computed_in_float32_as_the_authors_do():
    assert leader_heads.leader_count(32, 0.7) == 23
    assert leader_heads.leader_count(32, 0.3) == 10
    assert leader_heads.leader_count(25, 0.6) == 16  # float32(0.6) * 25 = 15.0000006; float64 gives 15
    assert leader_heads.leader_count(10, 0.01) == 1 and leader_heads.leader_count(7, 1.0) == 7


@pytest.mark.parametrize("options, message", [
    ({"workers": 0}, "workers"), ({"workers": 2.0}, "workers"), ({"workers": True}, "workers"),
    ({"delta": 0}, "delta"), ({"delta": 1.5}, "delta"), ({"delta": "0.7"}, "delta"),
    ({"leaders": 3}, "unknown option"),
])
def test_bad_options_are_rejected(options, message):
    model = small_net()
    with pytest.raises(ValueError, match=message):
        bpfree.apply_rule(model, "lfnn_heads", **options)
    assert not hasattr(model[4], "lfnn_heads") and not hasattr(model[0], "_bpfree_rule")


def test_needs_a_linear_classifier_and_integer_labels():
    with pytest.raises(ValueError, match="Linear classifier"):
        bpfree.apply_rule(nn.Sequential(nn.Linear(4, 8), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 3, 1)),
                          "lfnn_heads")
    model = small_net()
    handle = bpfree.apply_rule(model, "lfnn_heads", workers=2)
    model(torch.randn(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="integer class labels"):
        handle.local_loss(torch.rand(3, 10))


def test_a_resumed_model_continues_with_the_same_heads():
    """The heads live in the model's state_dict; the rule itself has no other state to resume."""
    torch.manual_seed(4)
    model, twin = small_net(), small_net()
    handle = bpfree.apply_rule(model, "lfnn_heads", workers=4)
    twin_handle = bpfree.apply_rule(twin, "lfnn_heads", workers=4)
    twin.load_state_dict(model.state_dict())  # raises on a missing or extra key
    twin_handle.rule.load_resume_state(handle.rule.resume_state())
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 10, (6,))
    losses = [h.add_local_loss(F.cross_entropy(m(x), y), y) for m, h in ((model, handle), (twin, twin_handle))]
    assert torch.equal(*losses)


# ------------------------------------------------------------------------------------ training
def test_training_lowers_the_loss_and_remove_restores_the_model():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))

    handle = bpfree.apply_rule(model, "lfnn_heads", workers=8, delta=0.7)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    heads_before = handle.rule.heads.weight.detach().clone()

    def total():
        return handle.add_local_loss(F.cross_entropy(model(x), y), y).item()

    first, first_ce = total(), F.cross_entropy(model(x), y).item()
    for _ in range(40):
        optimisation_step(model, handle, optimizer, x, y)
    assert total() < 0.5 * first
    with torch.no_grad():
        assert F.cross_entropy(model(x), y).item() < 0.7 * first_ce
    assert not torch.equal(handle.rule.heads.weight, heads_before)  # the heads trained too

    handle.remove()
    handle.remove()  # idempotent
    assert [id(p) for p in model.parameters()] == params
    assert list(model.state_dict()) == keys
    assert not model[4]._forward_hooks and not hasattr(model[4], "lfnn_heads")
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in model.modules())
