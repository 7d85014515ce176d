"""Alignment diagnostics with one definition for every rule.

Angles are in degrees between flattened tensors. The update/gradient angle compares the
.grad a rule produces with the true BP gradient on the SAME full batch, with the same
dropout masks, and leaves the model exactly as it found it: parameters, existing grads,
buffers (BatchNorm statistics, brSF magnitudes) and every RNG stream are restored.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import nn

from bpfree.rules import RuleHandle


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two tensors seen as vectors; NaN when either is zero."""
    a64 = a.detach().reshape(-1).double()
    b64 = b.detach().reshape(-1).double()
    denom = a64.norm() * b64.norm()
    if denom == 0:
        return math.nan
    cosine = torch.clamp(a64 @ b64 / denom, -1.0, 1.0)
    return math.degrees(math.acos(cosine.item()))


def weight_feedback_angles(handle: RuleHandle) -> dict[str, float]:
    """Angle between W and its feedback, for rules whose feedback has W's shape."""
    angles = {}
    if not handle.rule.feedback_replaces_weight:
        return angles
    for name, layer in handle.named_layers:
        feedback = layer.feedback
        if feedback is not None and feedback.shape == layer.weight.shape:
            angles[name] = angle_degrees(layer.weight, feedback)
    return angles


@contextlib.contextmanager
def _preserved_state(model: nn.Module, handle: RuleHandle) -> Iterator[Callable[[], None]]:
    """Snapshot grads, buffers and RNG; yield a function that rewinds the RNG to the snapshot."""
    grads = {id(p): (p, None if p.grad is None else p.grad.clone()) for p in model.parameters()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    buffer_names = {module: set(module._buffers) for module in model.modules()}
    cuda = torch.cuda.is_available()
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if cuda else None
    rule_rng = handle.rule.private_rng_states()
    seeded_draws = handle.rule._draws  # a seeded rule derives each draw's seed from this count

    def rewind_rng():
        handle.rule.set_private_rng_states(rule_rng)
        handle.rule._draws = seeded_draws
        torch.set_rng_state(cpu_rng)
        if cuda:
            torch.cuda.set_rng_state_all(cuda_rng)

    try:
        yield rewind_rng
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        # State a rule creates lazily on its first forward (DFA's B_l) is dropped again, so
        # the first training step draws it exactly as it would have without this report.
        for module, names in buffer_names.items():
            for name in set(module._buffers) - names:
                del module._buffers[name]
        for param, saved in grads.values():
            param.grad = saved
        rewind_rng()


def _layer_weight_grads(handle: RuleHandle) -> list[torch.Tensor | None]:
    return [None if layer.weight.grad is None else layer.weight.grad.detach().clone() for layer in handle.layers]


def update_gradient_angles(
    model: nn.Module,
    handle: RuleHandle,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> dict[str, float]:
    """Per-layer angle between the rule's weight update and the true BP gradient."""
    with _preserved_state(model, handle) as rewind_rng:
        model.zero_grad(set_to_none=True)
        # rules with local objectives (LFNN) update on both
        handle.add_local_loss(loss_fn(model(inputs), targets), targets).backward()
        rule_grads = _layer_weight_grads(handle)
        model.zero_grad(set_to_none=True)
        rewind_rng()
        with handle.suspended():
            loss_fn(model(inputs), targets).backward()
        true_grads = _layer_weight_grads(handle)
    return _angles_between(handle, rule_grads, true_grads)


def alignment_report(model, handle, loss_fn, inputs, targets) -> dict[str, dict[str, float]]:
    """Both alignment measures in one dict, ready to log into a run's metrics."""
    return {
        "weight_feedback_angle_deg": weight_feedback_angles(handle),
        "update_gradient_angle_deg": update_gradient_angles(model, handle, loss_fn, inputs, targets),
    }


# ----------------------------------------------------------------------------- conservation
def _neuron_pairs(handle: RuleHandle) -> list[tuple[str, nn.Module, nn.Module]]:
    """(hidden layer name, layer i, layer i+1) for consecutive converted layers whose shapes
    chain: W_{i+1} has one input column (or input channel) per output neuron of W_i."""
    layers = handle.named_layers
    pairs = []
    for (name, lower), (_, upper) in zip(layers, layers[1:]):
        if upper.weight.dim() >= 2 and upper.weight.shape[1] == lower.weight.shape[0]:
            pairs.append((name, lower, upper))
    return pairs


class ConservationTracker:
    """Per-neuron check of the FA conservation law (Robertson & Koyejo 2024, Thm 5.2).

    For hidden neuron k of layer i in a bias-free (leaky-)ReLU net trained by gradient flow
    with feedback B, d(1/2 ||W_i[k,:]||^2) = d<W_{i+1}[:,k], B_{i+1}[:,k]>. Both sides are
    accumulated from the moment the tracker is created; their per-neuron ratio should stay
    at 1, and the layer's mean |ratio - 1| measures how far discrete steps, momentum or
    biases move training off the law. When the feedback IS the weight (GD) the right side
    is d(1/2 ||W_{i+1}[:,k]||^2), the gradient-flow balance law of Du et al. 2018. For a
    conv layer a neuron is an output channel. Rules whose B is learned (KP) are measured the
    same way, but the law is not expected to hold for them.
    """

    def __init__(self, handle: RuleHandle, zero_tolerance: float = 1e-6):
        self.handle = handle
        self.zero_tolerance = zero_tolerance
        self.pairs = _neuron_pairs(handle)
        self._start = {name: self._sides(lower, upper) for name, lower, upper in self.pairs}

    def state(self) -> dict:
        """The starting values, so a resumed run keeps accumulating from its real start."""
        return {name: list(sides) for name, sides in self._start.items()}

    def load_state(self, state: dict) -> None:
        device = self.pairs[0][1].weight.device if self.pairs else None
        self._start = {name: tuple(t.to(device) for t in sides) for name, sides in state.items()}

    @staticmethod
    @torch.no_grad()
    def _sides(lower: nn.Module, upper: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        w_in = lower.weight.detach().double().flatten(1)                    # (k, fan_in)
        w_out = upper.weight.detach().double().transpose(0, 1).flatten(1)   # (k, out * kernel)
        feedback = upper.feedback
        if feedback is None or feedback is upper.weight:
            outgoing = 0.5 * (w_out * w_out).sum(1)
        else:
            b_out = feedback.detach().double().transpose(0, 1).flatten(1)
            outgoing = (w_out * b_out).sum(1)
        return 0.5 * (w_in * w_in).sum(1), outgoing

    def report(self) -> dict[str, dict[str, float | int]]:
        """Per hidden layer: mean |ratio - 1| over neurons, the neurons counted and excluded.

        A neuron is excluded when its outgoing change is below zero_tolerance relative to
        the size of the quantity itself (float32 training cannot resolve smaller changes),
        so a dead neuron does not turn into a 0/0 ratio.
        """
        out = {}
        for name, lower, upper in self.pairs:
            in0, out0 = self._start[name]
            in1, out1 = self._sides(lower, upper)
            d_in, d_out = in1 - in0, out1 - out0
            scale = torch.maximum(out0.abs(), out1.abs()).clamp_min(1e-30)
            keep = d_out.abs() > self.zero_tolerance * scale
            ratio = d_in[keep] / d_out[keep]
            deviation = (ratio - 1).abs()
            out[name] = {
                "mean_abs_deviation": deviation.mean().item() if keep.any() else math.nan,
                "median_abs_deviation": deviation.median().item() if keep.any() else math.nan,
                "neurons": int(keep.sum()),
                "excluded": int((~keep).sum()),
                "sum_d_incoming": d_in.sum().item(),
                "sum_d_outgoing": d_out.sum().item(),
            }
        return out


@torch.no_grad()
def _angles_between(handle: RuleHandle, rule_grads, true_grads) -> dict[str, float]:
    angles = {}
    for (name, _), rule_grad, true_grad in zip(handle.named_layers, rule_grads, true_grads):
        if rule_grad is not None and true_grad is not None:
            angles[name] = angle_degrees(rule_grad, true_grad)
    return angles


def step_gradient_angles(model, handle, loss_fn, inputs, targets) -> dict[str, float]:
    """Angle between the .grad the rule JUST produced on (inputs, targets) and the true gradient.

    For full-batch training this is the update-vs-gradient angle of the training step itself
    at the cost of one extra forward/backward (update_gradient_angles needs two): the true
    gradient comes from torch.autograd.grad, so .grad, buffers and RNG are left untouched.
    """
    weights = [layer.weight for layer in handle.layers]
    rule_grads = [None if w.grad is None else w.grad.detach().clone() for w in weights]
    with _preserved_state(model, handle), torch.enable_grad(), handle.suspended():
        loss = loss_fn(model(inputs), targets)
        true_grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return _angles_between(handle, rule_grads, true_grads)
