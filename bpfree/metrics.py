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
        loss_fn(model(inputs), targets).backward()
        rule_grads = _layer_weight_grads(handle)
        model.zero_grad(set_to_none=True)
        rewind_rng()
        with handle.suspended():
            loss_fn(model(inputs), targets).backward()
        true_grads = _layer_weight_grads(handle)
    angles = {}
    for (name, _), rule_grad, true_grad in zip(handle.named_layers, rule_grads, true_grads):
        if rule_grad is not None and true_grad is not None:
            angles[name] = angle_degrees(rule_grad, true_grad)
    return angles


def alignment_report(model, handle, loss_fn, inputs, targets) -> dict[str, dict[str, float]]:
    """Both alignment measures in one dict, ready to log into a run's metrics."""
    return {
        "weight_feedback_angle_deg": weight_feedback_angles(handle),
        "update_gradient_angle_deg": update_gradient_angles(model, handle, loss_fn, inputs, targets),
    }
