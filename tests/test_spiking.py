"""Step and spiking nets: LIF dynamics, surrogate vs plain gradient, reward through spikes."""
import math

import pytest
import torch
import torch.nn.functional as F

from bpfree.models import LIF, SpikeFunction, build_model
from bpfree.rules import apply_rule


def test_lif_integrates_leaks_and_resets_by_subtraction():
    lif = LIF(beta=0.9, threshold=1.0)
    lif.reset()
    out = [lif(torch.tensor([0.6])).item() for _ in range(3)]
    # mem: 0.6 -> 0.9*0.6+0.6 = 1.14 (spike, -> 0.14) -> 0.9*0.14+0.6 = 0.726
    assert out == [0.0, 1.0, 0.0]
    assert lif.mem.item() == pytest.approx(0.726)


def test_surrogate_gradient_is_atan_and_plain_gradient_is_zero():
    v = torch.tensor([-0.5, 0.0, 0.3], requires_grad=True)
    SpikeFunction.apply(v, "atan", 2.0).sum().backward()
    expected = 1.0 / (1 + (math.pi * v.detach()) ** 2)
    torch.testing.assert_close(v.grad, expected)
    v.grad = None
    SpikeFunction.apply(v, "none", 2.0).sum().backward()
    assert torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("name, shape", [("spiking_mlp", (6, 1, 28, 28)), ("spiking_convnet", (6, 1, 28, 28))])
def test_spiking_nets_count_spikes_and_train_by_each_route(name, shape):
    torch.manual_seed(0)
    x, y = torch.rand(*shape) * 3, torch.randint(0, 10, (6,))
    grads = {}
    for route, rule, surrogate in (("surrogate", "bp", "atan"), ("plain", "bp", "none"), ("lfp", "lfp_eps", "none")):
        torch.manual_seed(1)
        model = build_model(name, 10, steps=5, surrogate=surrogate)
        counts = model(x)
        assert counts.shape == (6, 10) and (counts >= 0).all() and (counts <= 5).all()
        assert torch.equal(counts, counts.round())
        with apply_rule(model, rule):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        first = next(p for n, p in model.named_parameters() if n.endswith("weight"))
        grads[route] = first.grad.clone()
    assert torch.count_nonzero(grads["plain"]) == 0  # the step blocks the plain gradient
    assert torch.count_nonzero(grads["surrogate"]) > 0
    assert torch.count_nonzero(grads["lfp"]) > 0 and torch.isfinite(grads["lfp"]).all()



def test_unknown_surrogate_is_rejected():
    with pytest.raises(ValueError, match="surrogate"):
        build_model("spiking_mlp", 10, surrogate="sigmoid")
