"""The nets of the LFP parity test, in plain torch, shared by tests/test_lfprop_parity.py and
tests/reference/lfprop_reference.py (which runs in lfprop's own environment)."""
import torch
from torch import nn

SEED = 20261127
BATCH = 8


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(5, 3))


def step_net(step: type = nn.Identity) -> nn.Module:
    """E4's kind of net: step activations between conv, max-pool and linear layers. The step
    module is the caller's: lfprop's Step in the reference run, our Heaviside in the test."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), step(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(36, 6), step(), nn.Dropout(0.0), nn.Linear(6, 3))


MODELS = {"mlp": (mlp, (10,)), "conv": (conv_net, (2, 8, 8)), "step": (step_net, (1, 8, 8))}


def build(name: str, **options) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The float64 net with seeded weights, and a batch (x, y)."""
    make, shape = MODELS[name]
    gen = torch.Generator().manual_seed(SEED)
    model = make(**options).double()
    with torch.no_grad():
        for p in model.parameters():  # biases drawn too: the eps rule gives them feedback
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    x = torch.randn((BATCH, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (BATCH,), generator=gen)
    return model, x, y
