"""Parity with the authors' package: our FA, uSF, brSF, frSF and DFA gradients equal biotorch's.

biotorch 0.0.16 (Sanfiz & Akrout 2021, PyPI; installed by .ci/run from requirements-parity.txt
with --no-deps, since its declared dependencies are heavy and unpinned, and it needs only
torch) is run side by side with bpfree on the same float64 weights and batch, with
biotorch's feedback tensors copied into our layers:
- FA: B itself (`weight_backward`, biotorch/layers/fa_constructor/*.py);
- uSF: nothing to copy (B = sqrt(2 / (fan_in + fan_out)) sign(W) in both);
- brSF: the magnitudes biotorch drew in this forward (it redraws from torch's global stream
  in every forward; ours from a private generator per batch, switched off here);
- frSF: the magnitudes |M| drawn at construction;
- DFA: B per layer, with our kernel-shaped conv feedback (`conv_feedback: kernel`), the
  shape biotorch uses (biotorch/layers/dfa/conv.py:51-54; linear B is its transpose).
Every weight and bias gradient must agree to 1e-10. A mutated rule (FA sending the error
through W) must not, so the comparison can fail.
"""
import contextlib
import copy
import io
import os

import pytest
import torch
from torch import nn

import bpfree

if os.environ.get("BPFREE_REQUIRE_PARITY") == "1":  # CI: the parity reference must be there
    import biotorch  # noqa: F401
else:
    pytest.importorskip("biotorch", reason="biotorch not installed: pip install --no-deps -r requirements-parity.txt")

from biotorch.models.le_net import LeNetCIFAR, LeNetMNIST  # noqa: E402
from biotorch.module.biomodule import BioModule  # noqa: E402

# biotorch's DFA layers use a module backward hook that torch 2.x warns about; its result
# is what the authors' code computes, which is what these tests compare against.
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")
TOL = 1e-10
RULES = ("fa", "usf", "brsf", "frsf", "dfa")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 64), nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc3(torch.relu(self.fc2(x)))


MODELS = {"lenet_mnist": (LeNetMNIST, (1, 32, 32)), "lenet_cifar": (LeNetCIFAR, (3, 32, 32)),
          "mlp": (MLP, (1, 28, 28))}


def converted(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def twin_models(arch, rule: str, seed: int = 0):
    """biotorch's converted model and ours, with the same float64 forward weights."""
    torch.manual_seed(seed)
    plain = arch()
    with contextlib.redirect_stdout(io.StringIO()):  # biotorch prints its conversion summary
        bio = BioModule(copy.deepcopy(plain), mode=rule, copy_weights=False,
                        layer_config={"type": rule, "options": {"init": "xavier", "constrain_weights": False,
                                                                "gradient_clip": False}},
                        output_dim=10).double()
    ours = copy.deepcopy(plain).double()
    bio_layers, our_layers = converted(bio.module), converted(ours)
    assert sorted(bio_layers) == sorted(our_layers)
    with torch.no_grad():
        for name, layer in our_layers.items():
            layer.weight.copy_(bio_layers[name].weight)
            layer.bias.copy_(bio_layers[name].bias)
    options = {"conv_feedback": "kernel"} if rule == "dfa" else {}
    handle = bpfree.apply_rule(ours, rule, **options)
    return bio, ours, handle


def batch(shape, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 10, (16,), generator=gen)


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{p}": getattr(m, p).grad.clone() for n, m in converted(model).items() for p in ("weight", "bias")}


def biotorch_gradients(bio, rule, x, y):
    bio.train()
    bio.zero_grad()
    loss_fn = nn.CrossEntropyLoss()
    out = bio(x, y, loss_fn) if rule == "dfa" else bio(x)
    loss_fn(out, y).backward()
    return gradients(bio.module)


def our_gradients(ours, handle, rule, x, y, bio):
    bio_layers, our_layers = converted(bio.module), converted(ours)
    ours.train()
    if rule == "dfa":  # B is drawn on the first forward; then replaced by biotorch's
        nn.functional.cross_entropy(ours(x), y).backward()
    with torch.no_grad():
        for name, layer in our_layers.items():
            bio_b = bio_layers[name].weight_backward.detach().to(torch.float64)
            if rule == "fa":
                layer.feedback_weight.copy_(bio_b)
            elif rule in ("brsf", "frsf"):
                layer.feedback_magnitude.copy_(bio_b.abs())
            elif rule == "dfa" and hasattr(layer, "dfa_feedback"):
                layer.dfa_feedback = bio_b.t().contiguous() if bio_b.dim() == 2 else bio_b.clone()
    ours.zero_grad()
    nn.functional.cross_entropy(ours(x), y).backward()
    return gradients(ours)


def max_difference(model_name: str, rule: str, monkeypatch) -> float:
    arch, shape = MODELS[model_name]
    bio, ours, handle = twin_models(arch, rule)
    if rule == "brsf":  # keep the magnitudes copied from biotorch's draw for this batch
        monkeypatch.setattr(handle.rule, "prepare_batch", lambda layer: None)
    x, y = batch(shape)
    expected = biotorch_gradients(bio, rule, x, y)
    got = our_gradients(ours, handle, rule, x, y, bio)
    assert sorted(expected) == sorted(got)
    assert all(g.abs().max() > 0 for g in expected.values())  # every layer learns: nothing trivially equal
    return max((expected[k] - got[k]).abs().max().item() for k in expected)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("rule", RULES)
def test_gradients_equal_biotorchs(model_name, rule, monkeypatch):
    assert max_difference(model_name, rule, monkeypatch) <= TOL


def test_a_one_line_mutation_breaks_parity(monkeypatch):
    """FA whose backward uses W instead of B (that is, BP) must differ from biotorch's FA."""
    from bpfree.rules import fa as feedback_alignment
    monkeypatch.setattr(feedback_alignment.FeedbackAlignment, "feedback", lambda self, layer: layer.weight.detach())
    assert max_difference("lenet_cifar", "fa", monkeypatch) > 1e-4


def test_dense_conv_feedback_is_not_biotorchs():
    """Our default dense conv feedback is a different rule from biotorch's kernel-shaped one."""
    bio, ours, handle = twin_models(LeNetCIFAR, "dfa")
    handle.remove()
    ours = copy.deepcopy(ours)
    dense = bpfree.apply_rule(ours, "dfa")
    x, y = batch((3, 32, 32))
    nn.functional.cross_entropy(ours(x), y).backward()
    assert ours.conv2.dfa_feedback.shape == (32 * 15 * 15, 10)  # one weight per input unit
    dense.remove()
