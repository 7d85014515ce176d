"""The DeeperSNN parity case, shared by deepersnn_reference.py (lfprop's venv) and
tests/test_spiking.py (ours): weights, batch and the gradient sample, from fixed seeds."""
import torch

STEPS, BATCH, CLASSES, SEED = 6, 3, 10, 2026


def draw_weights(params, seed: int = SEED) -> None:
    """Uniform weights at 3.5 / sqrt(fan_in): the output layer spikes 28 times in 6 steps."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            bound = 3.5 / p[0].numel() ** 0.5
            p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound)


def batch(seed: int = SEED):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(BATCH, 3, 32, 32, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    return x, y


def sample(g: torch.Tensor, n: int = 4096) -> torch.Tensor:
    """Every k-th entry of the flat gradient (about n of them): small enough to commit."""
    flat = g.detach().flatten()
    return flat[::max(1, flat.numel() // n)].clone()
