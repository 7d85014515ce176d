"""The LFNN authors' released step: a backprop-trained network with leader-follower output heads.

This is what the Leader-Follower Neural Network authors' released MNIST code trains
(GitHub Belis0811/LFNN at 7b68aa4, model/LFNN/MNIST_LFNN.py, "M" below). It is **not** a
backprop-free rule: one backward pass of a summed loss reaches every parameter. The rule
``lfnn_heads`` reproduces that step on any model whose last converted layer is a Linear
classifier:

- ``apply_rule`` adds ONE ``nn.Linear(h, workers * classes)``, the "worker heads" (M:56-58),
  as a registered child module ``lfnn_heads`` of that final Linear (so ``model.parameters()``
  holds it and an optimiser built after ``apply_rule`` trains it; hanging it under the Linear
  keeps a ``nn.Sequential``'s forward unchanged). It reads the same input ``h`` as the final
  Linear, which plays the authors' global head (M:152, 176); the model's output (the
  prediction) is unchanged. Initialised like Keras's default for a single Dense(h -> W*C):
  Glorot-uniform kernel, bound sqrt(6 / (h + W*C)), and a zero bias (the 32 workers are one
  Dense in M, so the bound is that of the 320-wide layer, not of 32 separate h -> 10 heads).
  The heads always have a bias (Keras's Dense default), whatever the classifier has.
- Every layer keeps its native forward and backward (plain BP; ``feedback`` is W itself).
- In a forward with gradients enabled, a forward hook on the final Linear keeps its input h.
  ``handle.add_local_loss(loss, y)`` then returns ``loss + leader_loss + follower_loss`` from
  the worker logits z = heads(h).reshape(N, W, C), exactly as M's ``leader_follower_losses``
  (M:72-128), with all weights 1 (M:197-202):

  * ce[n, j]: cross-entropy of worker j on sample n (from logits, true label);
  * k = max(1, ceil(float32(delta) * float32(W))) leaders per sample (M:82-88 computes it in
    float32; this differs from a float64 ceil only where delta x W is within float rounding
    of an integer, e.g. W = 25, delta = 0.6 gives 16 in float32, 15 in float64; 23 for the
    released W = 32, delta = 0.7): the k lowest-CE workers of that sample, from a per-row
    argsort recomputed every step (ties: lower worker index first); best[n] = its lowest-CE
    worker;
  * leader_loss = mean of ce over the N x k (sample, leader) pairs (M:106-113);
  * follower_loss = mean over the N x (W - k) (sample, follower) pairs of the class-mean
    squared difference between the follower's logits and the *detached* logits of the
    sample's best worker (M:101-104, 114-116); 0 when k = W.

  The trainer's ``loss`` is the global head's cross-entropy (M:192), so the total is
  leader + follower + global and one ``backward()`` trains heads, classifier and backbone.
  The workers' CE always uses hard integer labels, whatever the trainer's own loss is.
- Evaluation (no grad) and ``handle.suspended()`` are plain forwards: nothing is captured.
- ``handle.remove()`` detaches the hook and deletes the heads module.

The model's final Linear may be applied to (N, ..., h) input; the leading dimensions are
flattened and must match the targets' shape. If the final Linear runs more than once in a
forward, the last call's input is the one used.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from bpfree.rules.base import Rule, register_rule

HEADS = "lfnn_heads"  # the child module of the final Linear that holds the worker heads


def leader_count(workers: int, delta: float) -> int:
    """Leaders per sample, computed as M:82-88 does it: max(1, ceil(float32(delta) * float32(W)))."""
    product = torch.tensor(float(delta), dtype=torch.float32) * torch.tensor(float(workers), dtype=torch.float32)
    return min(workers, max(1, math.ceil(product.item())))


def leader_follower_losses(z: torch.Tensor, targets: torch.Tensor, leaders: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(leader_loss, follower_loss, order) of worker logits z (N, W, C) for labels (N,).

    order (N, W) is each sample's workers by ascending cross-entropy: order[:, :leaders] are
    its leaders, order[:, 0] its best worker, order[:, leaders:] its followers.
    """
    n, workers, classes = z.shape
    ce = F.cross_entropy(z.reshape(n * workers, classes), targets.repeat_interleave(workers),
                         reduction="none").reshape(n, workers)
    order = torch.argsort(ce.detach(), dim=1, stable=True)
    leader_loss = ce.gather(1, order[:, :leaders]).mean()
    if leaders == workers:
        return leader_loss, ce.new_zeros(()), order
    best = z[torch.arange(n, device=z.device), order[:, 0]].detach()  # (N, C), a stop-gradient target
    mse = (z - best[:, None, :]).pow(2).mean(-1)  # (N, W)
    follower_loss = mse.gather(1, order[:, leaders:]).mean()
    return leader_loss, follower_loss, order


@register_rule
class LFNNHeads(Rule):
    """The LFNN authors' released step: a backprop-trained network with leader-follower output heads.

    Plain backprop of global CE + leader CE + follower MSE over `workers` linear heads that
    read the classifier's input (see the module docstring).
    """

    name = "lfnn_heads"
    defaults = {"workers": 32, "delta": 0.7}

    def __init__(self, **options):
        super().__init__(**options)
        self._head: nn.Linear | None = None
        self._features: torch.Tensor | None = None
        self.last_selection: dict | None = None

    def validate_options(self) -> None:
        workers, delta = self.options["workers"], self.options["delta"]
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"rule {self.name!r}: workers (the number of output heads) must be an "
                             f"integer >= 1, got {workers!r}")
        if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta <= 1:
            raise ValueError(f"rule {self.name!r}: delta (the leader fraction) must be in (0, 1], got {delta!r}")
        self.leaders = leader_count(workers, delta)

    def check_layers(self, layers) -> None:
        head = layers[-1]
        if not isinstance(head, nn.Linear):
            raise ValueError(f"rule {self.name!r}: the last converted layer must be the Linear classifier "
                             f"(the worker heads read its input), got {type(head).__name__}")
        if HEADS in head._modules:
            raise ValueError(f"rule {self.name!r}: the classifier already has a {HEADS!r} module")
        self._head = head

    @property
    def heads(self) -> nn.Linear | None:
        """The worker heads (one Linear h -> workers x classes), while the rule is applied."""
        return None if self._head is None else self._head._modules.get(HEADS)

    def attach(self, model, layers) -> list:
        head = self._head
        workers, classes = self.options["workers"], head.out_features
        heads = nn.Linear(head.in_features, workers * classes, device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():  # Keras's Dense default: Glorot-uniform kernel, zero bias
            nn.init.xavier_uniform_(heads.weight)
            nn.init.zeros_(heads.bias)
        head.add_module(HEADS, heads)
        return [head.register_forward_hook(self._capture)]

    def _capture(self, module, args, output) -> None:
        if self.active and torch.is_grad_enabled():
            self._features = args[0]

    def restore_layer(self, layer: nn.Module) -> None:
        if layer is self._head:
            layer._modules.pop(HEADS, None)
            self._features = None
            self.last_selection = None

    def local_loss(self, targets: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        h, self._features = self._features, None
        if h is None:  # no training forward since the last call (evaluation, suspended)
            return None
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError(f"rule {self.name!r}: the workers' cross-entropy needs integer class labels, "
                             f"got {targets.dtype} targets")
        workers, classes = self.options["workers"], self._head.out_features
        z = self.heads(h).reshape(-1, workers, classes)
        y = targets.reshape(-1)
        if y.numel() != z.shape[0]:
            raise ValueError(f"rule {self.name!r}: {z.shape[0]} classifier inputs but {y.numel()} targets")
        if y.numel() == 0:
            return z.sum() * 0
        leader_loss, follower_loss, order = leader_follower_losses(z, y, self.leaders)
        self.last_selection = {"leaders": order[:, :self.leaders], "best": order[:, 0],
                               "leader_loss": leader_loss.detach(), "follower_loss": follower_loss.detach()}
        return leader_loss + follower_loss
