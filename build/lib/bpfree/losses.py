"""Training losses by name.

Every rule learns from what the loss sends back into the network (the error at the logits,
or a reward read off it), so an experiment trains with the loss its authors' code trains
with. Models return logits; a loss applies its own output non-linearity.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sigmoid_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sigmoid on every output unit, binary cross-entropy summed over classes, mean over the batch.

    Akrout et al. 2019's SigmoidCrossEntropyLoss (Deep-Learning-without-Weight-Transport,
    fcnn/FCNN_BP.py:65-73): its error at the output pre-activation is sigmoid(z) - onehot
    (:182), which is this loss's gradient at the logits, times the batch size.
    """
    onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / len(target)


def ce_rate(spike_train: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of every time step's output spikes, mean over steps and batch.

    snnTorch 1.0's ce_rate_loss (functional/loss.py:71-128), the LFP authors' gradient
    criterion for spiking nets ("snnratecodedloss", lfprop rewards/rewards.py:174). Takes the
    (batch, classes, steps) spike train of a SpikingNet with readout "steps"."""
    if spike_train.dim() != 3:
        raise ValueError(f"loss ce_rate takes a (batch, classes, steps) spike train (a spiking net with "
                         f"readout: steps), got shape {tuple(spike_train.shape)}")
    return F.cross_entropy(spike_train, target.unsqueeze(1).expand(-1, spike_train.shape[2]))


LOSSES: dict[str, LossFn] = {
    "cross_entropy": F.cross_entropy,
    "sigmoid_bce": sigmoid_bce,
    "ce_rate": ce_rate,
}
DEFAULT_LOSS = "cross_entropy"


def loss_function(name: str | None) -> LossFn:
    """The batch-mean loss registered under `name` (None: softmax cross-entropy)."""
    name = DEFAULT_LOSS if name is None else name
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]
