"""Writes tests/reference/deepersnn_snntorch.pt: the LFP authors' DeeperSNN run by snnTorch.

Runs in lfprop's own environment (see lfprop_reference.py for its venv):

    /tmp/lfpvenv/bin/pip install snntorch==1.0.0
    /tmp/lfpvenv/bin/python tests/reference/deepersnn_reference.py

lfprop 1.0.0's DeeperSNN (model/spiking_networks.py:353-487; snnTorch Leaky, beta 0.9,
reset by subtraction with reset_delay, atan surrogate) in float64, with weights drawn by
snn_case.draw_weights (tests/test_spiking.py redraws them the same way, parameter by
parameter in creation order), presented STEPS times to one batch as forward_fn_spiking does
(model/models.py:199-232). It records the output spike train (steps, batch, classes) and
the gradient of snnTorch's ce_rate_loss (lfprop's "snnratecodedloss", the BP criterion of
configs/snn-training) with respect to every weight: its norm and every k-th entry (`sample`).
"""
import sys
from importlib import metadata
from pathlib import Path

import snntorch.functional as SF
import torch
from lfprop.model.spiking_networks import DeeperSNN
from snntorch import surrogate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snn_case import BATCH, CLASSES, STEPS, batch, draw_weights, sample  # noqa: E402


def _atan_forward_in_input_dtype(ctx, input_, alpha):
    """snnTorch's ATan.forward (surrogate.py:186-191) but without its .float(): the spikes
    keep the membrane's dtype, so the whole run is float64 and no spike sits within float32
    rounding of the threshold. Nothing else changes."""
    ctx.save_for_backward(input_)
    ctx.alpha = alpha
    return (input_ > 0).to(input_.dtype)


surrogate.ATan.forward = staticmethod(_atan_forward_in_input_dtype)

OUT = Path(__file__).resolve().parent / "deepersnn_snntorch.pt"


def authors_case():
    """(the authors' DeeperSNN in float64 with the parity case's weights, its parameter names,
    x, y), hidden state reset; noise off as in every SNN config (SNN_APPLY_NOISE [False])."""
    torch.manual_seed(0)
    model = DeeperSNN(3, CLASSES, 0.9, spike_grad="atan", reset_delay=True, apply_noise=False).double()
    names = [n for n, _ in model.named_parameters()]
    draw_weights([p for _, p in model.named_parameters()])
    model.reset()
    return model, names, *batch()


def main():
    model, names, x, y = authors_case()
    spikes = torch.stack([model(x)[0] for _ in range(STEPS)])
    loss = SF.ce_rate_loss()(spikes, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    record = {
        "versions": {k: metadata.version(k) for k in ("lfprop", "snntorch", "torch")},
        "names": names, "spikes": spikes.detach(), "loss": loss.detach(),
        "grad_norms": [g.norm() for g in grads],
        "grad_samples": [sample(g) for g in grads],
    }
    torch.save(record, OUT)
    print(f"wrote {OUT}: spikes {tuple(spikes.shape)}, {int(spikes.sum())} output spikes, loss {loss.item():.6f}, "
          f"grad norms {[round(g.norm().item(), 6) for g in grads]}")


if __name__ == "__main__":
    main()
