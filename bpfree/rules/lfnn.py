"""Leader-Follower networks (Yin et al., arXiv 2310.07885): workers, leaders, local alignment.

Every converted layer except the output head is split into `workers` equal groups of
output units (neurons of a Linear, filters of a Conv1d/Conv2d). A worker's output is
`activation(layer output)` restricted to its units; its own small read-out (a linear map
from the worker's units, averaged over positions for conv and over tokens for a Linear on
(batch, tokens, features) input, to the classes) gives the
worker's prediction loss, the batch-mean cross-entropy. Each training step, per layer, the
round(delta x workers) workers with the lowest prediction loss are the leaders and the
others followers; every follower has one assigned leader and its alignment loss is
MSE(y_follower, y_leader.detach()).

- ``lfnn_l`` (BP-free): every converted layer's input is detached, so no error crosses a
  layer boundary. Leaders train on their local prediction loss (through their read-out),
  followers on the alignment loss only; the output head trains on the global loss of its
  detached input.
- ``lfnn``: the global error is back-propagated as usual, but only the leaders' units
  receive it (the followers' share is masked to zero, so the error travels down through
  leaders only); followers train on the alignment loss alone. That loss is computed from a
  second forward of the layer on its detached input so it stays inside the layer: this
  second forward is LFNN's extra work over BP.

Read-outs always learn on their worker's detached output, so a follower's read-out keeps
up and the follower can be promoted. The source summary does not fix how followers pick
their leader: ``assignment='nearest'`` (default) pairs each follower with the leader whose
batch output is closest in mean squared distance, which keeps the layer's workers diverse;
``'best'`` pairs every follower with the lowest-loss leader. Also open is what a leader's
"local prediction error" reads: ``leader_readout='worker'`` (default) trains each leader
through its own read-out; ``'joint'`` (LFNN-l only) trains the leaders together through one
extra read-out of the whole layer (followers' units enter it detached), while the per-worker
read-outs still rank the workers.

The local losses need the labels, so the trainer calls ``handle.add_local_loss(loss, targets)``
after the forward pass and runs ``backward()`` on the sum.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from bpfree import distributed
from bpfree.rules.base import Rule, _remove_state, register_rule

_READOUT_STATE = ("lf_readout_weight", "lf_readout_bias", "lf_joint_weight", "lf_joint_bias")
_SELECTION = "_bpfree_lf_selection"


def worker_prediction_losses(pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                             targets: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy of every worker's read-out: pooled (B, W, k) -> (W,)."""
    logits = torch.einsum("bwk,wkc->bwc", pooled, weight) + bias  # (B, W, C)
    per_sample = F.cross_entropy(logits.transpose(1, 2), targets[:, None].expand(-1, pooled.shape[1]),
                                 reduction="none")  # (B, W)
    return per_sample.mean(0)


def rank_workers(losses: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(leaders, followers): the round(delta x workers) lowest-loss workers and the rest, from
    one sort whose split point is known on the host (no device sync; ties: lower index first)."""
    count = min(len(losses), max(1, round(delta * len(losses))))
    order = torch.argsort(losses.detach(), stable=True)
    return order[:count], order[count:].sort().values  # followers in worker order


def select_leaders(losses: torch.Tensor, delta: float) -> torch.Tensor:
    """Indices of the round(delta x workers) lowest-loss workers (ties: lower index first)."""
    return rank_workers(losses, delta)[0]


def _units(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class LeaderFollower(Rule):
    """Shared machinery of LFNN and LFNN-l; `local_only` says whether errors may cross layers."""

    name = "lfnn"
    local_only = False
    defaults = {"workers": 32, "delta": 0.7, "prediction_weight": 1.0, "alignment_weight": 1.0,
                "activation": "relu", "assignment": "nearest", "leader_readout": "worker"}
    feedback_replaces_weight = False  # the backward uses W itself; there is no B to align

    def __init__(self, **options):
        super().__init__(**options)
        self._hidden: list[nn.Module] = []
        self._outputs: dict[nn.Module, torch.Tensor] = {}
        self._masks: dict[nn.Module, torch.Tensor] = {}

    def validate_options(self) -> None:
        o = self.options
        workers = o["workers"]
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"rule {self.name!r}: workers must be an integer >= 1, got {workers!r}")
        delta = o["delta"]
        if not isinstance(delta, (int, float)) or isinstance(delta, bool) or not 0 < delta <= 1:
            raise ValueError(f"rule {self.name!r}: delta (the leader fraction) must be in (0, 1], got {delta!r}")
        for key in ("prediction_weight", "alignment_weight"):
            value = o[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"rule {self.name!r}: {key} must be a number >= 0, got {value!r}")
        if o["activation"] not in ("relu", "identity"):
            raise ValueError(f"rule {self.name!r}: activation must be 'relu' or 'identity', got {o['activation']!r}")
        if o["leader_readout"] not in ("worker", "joint"):
            raise ValueError(f"rule {self.name!r}: leader_readout must be 'worker' or 'joint', "
                             f"got {o['leader_readout']!r}")
        if o["leader_readout"] == "joint" and not self.local_only:
            raise ValueError(f"rule {self.name!r}: leader_readout 'joint' is for lfnn_l; in lfnn the "
                             "leaders learn from the back-propagated global error")
        if o["assignment"] not in ("nearest", "best"):
            raise ValueError(f"rule {self.name!r}: assignment must be 'nearest' or 'best', got {o['assignment']!r}")

    def check_layers(self, layers) -> None:
        head = layers[-1]
        if len(layers) < 2:
            raise ValueError(f"rule {self.name!r} needs at least one hidden Linear/Conv layer "
                             "before the output head to split into workers")
        if not isinstance(head, nn.Linear):
            raise ValueError(f"rule {self.name!r}: the last converted layer must be the Linear output "
                             f"head (its out_features are the classes), got {type(head).__name__}")
        workers = self.options["workers"]
        for layer in layers[:-1]:
            units = _units(layer)
            if units % workers:
                raise ValueError(f"rule {self.name!r}: a layer with {units} output units cannot be split "
                                 f"into {workers} equal workers; choose workers dividing every hidden width")
        self._classes = head.out_features
        self._head = head

    def convert_layer(self, layer: nn.Module, index: int) -> None:
        if layer is self._head:
            return
        units = _units(layer)
        workers = self.options["workers"]
        size = units // workers
        bound = 1.0 / math.sqrt(size)  # nn.Linear's default init for a size -> classes map
        like = dict(device=layer.weight.device, dtype=layer.weight.dtype)
        weight = torch.empty(workers, size, self._classes, **like).uniform_(-bound, bound)
        bias = torch.empty(workers, self._classes, **like).uniform_(-bound, bound)
        layer.register_parameter("lf_readout_weight", nn.Parameter(weight))
        layer.register_parameter("lf_readout_bias", nn.Parameter(bias))
        if self.local_only and self.options["leader_readout"] == "joint":
            bound = 1.0 / math.sqrt(units)
            layer.register_parameter("lf_joint_weight", nn.Parameter(
                torch.empty(units, self._classes, **like).uniform_(-bound, bound)))
            layer.register_parameter("lf_joint_bias", nn.Parameter(
                torch.empty(self._classes, **like).uniform_(-bound, bound)))
        self._hidden.append(layer)

    def restore_layer(self, layer: nn.Module) -> None:
        _remove_state(layer, _READOUT_STATE)
        if hasattr(layer, _SELECTION):
            delattr(layer, _SELECTION)
        self._outputs.pop(layer, None)
        self._masks.pop(layer, None)

    def forward(self, layer, x):
        base = layer._bpfree_original_class.forward
        if not torch.is_grad_enabled():
            return base(layer, x)
        if self.local_only:
            x = x.detach()
        y = base(layer, x)
        if layer is self._head:
            return y
        if self.local_only:
            self._outputs[layer] = y
        else:
            self._outputs[layer] = base(layer, x.detach())
            self._masks.pop(layer, None)
            y.register_hook(self._leader_mask_hook(layer))
        return y

    def _leader_mask_hook(self, layer):
        def hook(grad):
            mask = self._masks.pop(layer, None)
            if mask is None:
                raise RuntimeError(
                    "rule 'lfnn': backward() ran before handle.local_loss(targets) chose the leaders; "
                    "train through bpfree.loop.optimisation_step or call handle.local_loss first")
            shape = (1,) * (grad.dim() - 1) + (-1,) if isinstance(layer, nn.Linear) \
                else (1, -1) + (1,) * (grad.dim() - 2)
            return grad * mask.to(grad.dtype).view(shape)
        return hook

    def local_loss(self, targets: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        total = None
        for layer in self._hidden:
            y = self._outputs.pop(layer, None)
            if y is None:
                continue
            loss = self._layer_loss(layer, y, targets)
            total = loss if total is None else total + loss
        return total

    def _layer_loss(self, layer, y: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        workers = self.options["workers"]
        out = F.relu(y) if self.options["activation"] == "relu" else y
        if isinstance(layer, nn.Linear) and out.dim() > 2:
            out = out.movedim(-1, 1)  # (B, tokens..., units) -> (B, units, tokens...), as conv
        batch = out.shape[0]
        grouped = out.reshape(batch, workers, -1, *out.shape[2:])  # (B, W, k, *spatial)
        pooled = grouped.flatten(3).mean(3) if grouped.dim() > 3 else grouped  # (B, W, k)
        weight, bias = layer.lf_readout_weight, layer.lf_readout_bias
        with torch.no_grad():
            losses = distributed.average_(worker_prediction_losses(pooled, weight, bias, targets))
        leaders, followers = rank_workers(losses, self.options["delta"])  # the same on every rank
        is_leader = torch.zeros(workers, dtype=torch.bool, device=y.device)
        is_leader[leaders] = True
        setattr(layer, _SELECTION, {"losses": losses, "leaders": leaders})
        if not self.local_only:
            units_mask = is_leader.repeat_interleave(grouped.shape[2])
            self._masks[layer] = units_mask
        # Read-outs learn on detached outputs; in LFNN-l the leaders' prediction loss also
        # reaches their own units.
        joint = self.options["leader_readout"] == "joint"  # (validated: lfnn_l only)
        leaders_attached = torch.where(is_leader[None, :, None], pooled, pooled.detach()) \
            if self.local_only else None
        trained = leaders_attached if self.local_only and not joint else pooled.detach()
        loss = worker_prediction_losses(trained, weight, bias, targets).sum()
        if joint:  # the leaders learn together through one read-out of the whole layer
            logits = leaders_attached.flatten(1) @ layer.lf_joint_weight + layer.lf_joint_bias
            loss = loss + F.cross_entropy(logits, targets)
        loss = self.options["prediction_weight"] * loss
        if len(followers) and self.options["alignment_weight"]:
            flat = grouped.flatten(2)  # (B, W, k*spatial)
            target = flat[:, leaders].detach()
            if self.options["assignment"] == "best" or len(leaders) == 1:
                assigned = torch.zeros(len(followers), dtype=torch.long, device=y.device)
            else:
                with torch.no_grad():
                    a = flat[:, followers].transpose(0, 1).flatten(1)  # (F, B*k*spatial)
                    b = target.transpose(0, 1).flatten(1)  # (L, B*k*spatial)
                    if distributed.active():  # squared distances add up over the ranks' shards
                        assigned = distributed.sum_(torch.cdist(a, b).pow(2)).argmin(1)
                    else:
                        assigned = torch.cdist(a, b).argmin(1)
            gap = flat[:, followers] - target[:, assigned]
            loss = loss + self.options["alignment_weight"] * gap.pow(2).mean((0, 2)).sum()
        return loss

    def leader_selection(self, layer: nn.Module) -> dict | None:
        """The last step's per-worker prediction losses and leader indices of a hidden layer."""
        return getattr(layer, _SELECTION, None)


@register_rule
class LFNN(LeaderFollower):
    """Leaders learn from the back-propagated global error, followers by aligning to leaders."""

    name = "lfnn"
    local_only = False


@register_rule
class LFNNLocal(LeaderFollower):
    """The BP-free variant: local prediction loss for leaders, no error crosses a layer."""

    name = "lfnn_l"
    local_only = True
    unconverted_trained_by = ("nothing: every converted layer's input is detached, so no error reaches "
                              "a parameter between converted layers")
