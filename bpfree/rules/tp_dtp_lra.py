"""Target propagation (TP, DTP) and local representation alignment (LRA), block by block.

Franceschi (seed 003) applies these to transformers with each encoder block as one
"layer". Here a layer is one entry of the model's ``blocks`` ModuleList (bert_classifier's
encoder blocks; any model with such a list works). Below the first block sits the
embedding layer, whose output h_0 is the first block's input; above the last block sits
the head (pooler and classifier), which learns from the global loss.

Forward pass: every block's input is detached, so no global error crosses a block
boundary, and the last block's output reaches the head through a fresh leaf, so the
global loss trains the head alone. Then ``local_loss(targets, loss)`` builds, with
h_l the output of layer l (l = 0 embeddings, 1..L blocks) and every target a constant:

1. Top target: t_L = h_L - target_lr * dl/dh_L, l the per-example loss (batch size times
   the gradient of the batch-mean loss, so the step does not depend on the batch size).
   Only the tokens the head reads (the first) get a displacement.
2. Targets downwards, for l = L..1, through the learned feedback of block l:
   - ``tp``:  t_{l-1} = g_l(t_l)
   - ``dtp``: t_{l-1} = h_{l-1} + g_l(t_l) - g_l(h_l)   (difference correction, Lee et al. 2015)
   - ``lra``: t_{l-1} = h_{l-1} - beta * E_l(e_l), error units e_l = h_l - t_l
     (the paper's section 6: error units times error weights, subtracted from the layer below)
3. Every layer's loss: 1/2 ||h_l - t_l||^2 summed over tokens and features, mean over the
   batch. Inside a block it is back-propagated (block granularity, as in the paper); with
   target_lr = 1 the top block's gradient equals BP's.
4. Feedback learning, from one extra no-grad forward of each block (eval mode) on a
   noise-corrupted input, one forward more for LRA:
   - TP/DTP inverse g_l(h) = LayerNorm(G_l h + c_l), per token: a linear map followed by
     the non-linearity the layer below ends with (the paper's phi-bar(E z)). It learns the
     noise-corrupted reconstruction 1/2 ||g_l(f_l(h_{l-1} + eps)) - (h_{l-1} + eps)||^2,
     eps ~ N(0, noise^2); f_l's parameters get nothing from it.
   - LRA error weights E_l (per token, no bias) learn the transpose of the block's
     token-local Jacobian from noise, as the weight mirror does (section 4.2): the
     regression 1/2 ||xi E_l - r||^2 / noise^2 with r = f_l(h_{l-1} + xi) - f_l(h_{l-1}),
     whose gradient is the Hebbian -xi r^T plus a decay. With E_l ~ J_l^T the displacement
     -beta E_l e_l points down the slope of the layer above's loss, which is what LRA's
     targets are for.

The feedback maps live in ``model.bpfree_feedback`` (so the optimizer, built after
``apply_rule``, trains them) and are removed with the handle.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from bpfree.rules.base import Rule, register_rule

FEEDBACK_ATTRIBUTE = "bpfree_feedback"


def block_widths(block: nn.Module) -> tuple[int, int]:
    """(input, output) features of a block: its first Linear's input, its last Linear's output."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"block {type(block).__name__} has no nn.Linear to read its widths from")
    return linears[0].in_features, linears[-1].out_features


class _Recorded:
    """What one training forward left for the local losses."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []  # h_0..h_{L-1}, each with the graph of the layer below
        self.call_args: list[tuple] = []  # the rest of each block's call (attention mask)
        self.call_kwargs: list[dict] = []
        self.top_output: torch.Tensor | None = None  # h_L with the graph of the last block
        self.top_leaf: torch.Tensor | None = None  # what the head read


class _RemoveAttribute:
    """A hook-like handle that takes the feedback maps off the model again."""

    def __init__(self, module: nn.Module, name: str):
        self.module, self.name = module, name

    def remove(self) -> None:
        if self.name in self.module._modules:
            delattr(self.module, self.name)


class BlockTargetRule(Rule):
    """Common machinery: hooks, top target, layer losses; subclasses say how targets go down."""

    feedback_replaces_weight = False  # no B stands in for a W
    granularity = "block"
    unconverted_trained_by = "backprop inside its block (or embedding), from that layer's local target"
    defaults = {"target_lr": 1.0, "noise": 0.1}

    def validate_options(self):
        for key, value in self.options.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"rule {self.name!r}: {key} must be a number > 0, got {value!r}")

    def check_model(self, model):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            raise ValueError(
                f"rule {self.name!r} trains a model block by block and needs its blocks in an "
                f"nn.ModuleList attribute `blocks` (as bert_classifier has); {type(model).__name__} has none")
        if hasattr(model, FEEDBACK_ATTRIBUTE):
            raise ValueError(f"{type(model).__name__} already has {FEEDBACK_ATTRIBUTE}; remove the other rule first")
        for block in blocks:
            block_widths(block)

    # --- subclass hooks ----------------------------------------------------------------
    def make_feedback(self, in_features: int, out_features: int) -> nn.Module:
        raise NotImplementedError

    def target_below(self, index: int, below: torch.Tensor, output: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def feedback_loss(self, index: int, recorded: _Recorded) -> torch.Tensor:
        raise NotImplementedError

    # --- hooks on the model ---------------------------------------------------------------
    def attach(self, model, layers):
        self._blocks = list(model.blocks)
        self._recorded: _Recorded | None = None
        self._feedback_pass = False
        reference = next(self._blocks[0].parameters())
        feedback = nn.ModuleList(self.make_feedback(*block_widths(block)) for block in self._blocks)
        model.add_module(FEEDBACK_ATTRIBUTE, feedback.to(device=reference.device, dtype=reference.dtype))
        self.feedback_maps = feedback
        handles = [_RemoveAttribute(model, FEEDBACK_ATTRIBUTE)]
        for index, block in enumerate(self._blocks):
            handles.append(block.register_forward_pre_hook(partial(self._enter_block, index), with_kwargs=True))
        handles.append(self._blocks[-1].register_forward_hook(self._leave_top_block))
        return handles

    def _recording(self) -> bool:
        return self.active and not self._feedback_pass and torch.is_grad_enabled()

    def _enter_block(self, index, block, args, kwargs):
        if not self._recording():
            return None
        if index == 0:
            self._recorded = _Recorded()
        recorded = self._recorded
        if recorded is None or len(recorded.inputs) != index or recorded.top_leaf is not None:
            return None  # a block called on its own, outside a model forward: not a training pass
        x = args[0]
        recorded.inputs.append(x)
        recorded.call_args.append(args[1:])
        recorded.call_kwargs.append(kwargs)
        return (x.detach(), *args[1:]), kwargs

    def _leave_top_block(self, block, args, output):
        recorded = self._recorded
        if not self._recording() or recorded is None or recorded.top_leaf is not None \
                or len(recorded.inputs) != len(self._blocks):
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"rule {self.name!r} needs blocks that return one tensor, got {type(output).__name__}")
        self._recorded.top_output = output
        self._recorded.top_leaf = output.detach().requires_grad_(True)
        return self._recorded.top_leaf

    def block_forward(self, index: int, x: torch.Tensor, recorded: _Recorded) -> torch.Tensor:
        """f_l on another input, without dropout and without the recording hooks."""
        block = self._blocks[index]
        was_training, self._feedback_pass = block.training, True
        block.train(False)
        try:
            return block(x, *recorded.call_args[index], **recorded.call_kwargs[index])
        finally:
            block.train(was_training)
            self._feedback_pass = False

    # --- the step ---------------------------------------------------------------------------
    def layer_targets(self, recorded: _Recorded, output_gradient: torch.Tensor) -> list[torch.Tensor]:
        """t_0..t_L from the per-example gradient at the head's input (constants)."""
        hidden = [h.detach() for h in recorded.inputs] + [recorded.top_output.detach()]
        with torch.no_grad():
            targets = [None] * len(hidden)
            targets[-1] = hidden[-1] - self.options["target_lr"] * output_gradient
            for index in range(len(hidden) - 1, 0, -1):
                targets[index - 1] = self.target_below(index - 1, hidden[index - 1], hidden[index], targets[index])
        return targets

    def local_loss(self, targets, loss=None):
        recorded, self._recorded = self._recorded, None
        if not self.active or recorded is None or recorded.top_leaf is None:
            return None
        if loss is None:
            raise ValueError(f"rule {self.name!r} sets its top target from the global loss: "
                             "call handle.add_local_loss(loss, targets)")
        (gradient,) = torch.autograd.grad(loss, recorded.top_leaf, retain_graph=True)
        batch = gradient.shape[0]
        hidden = recorded.inputs + [recorded.top_output]
        layer_targets = self.layer_targets(recorded, gradient * batch)
        layer_losses = [0.5 * (h - t).pow(2).sum() / batch for h, t in zip(hidden, layer_targets)]
        feedback_losses = [self.feedback_loss(index, recorded) for index in range(len(self._blocks))]
        return torch.stack(layer_losses).sum() + torch.stack(feedback_losses).sum()

    def before_step(self, layers):
        if self.active and self._recorded is not None and self._recorded.top_leaf is not None:
            self._recorded = None
            raise RuntimeError(f"rule {self.name!r}: backward() ran without the layer targets; call "
                               "handle.add_local_loss(loss, targets) and backward() on its result")


class InverseMapping(nn.Module):
    """g_l(h) = LayerNorm(G h + c), per token: maps a block's output space to its input space."""

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.linear = nn.Linear(out_features, in_features)
        self.norm = nn.LayerNorm(in_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.linear(h))


class _InverseTargetRule(BlockTargetRule):
    def make_feedback(self, in_features, out_features):
        return InverseMapping(out_features, in_features)

    def feedback_loss(self, index, recorded):
        below = recorded.inputs[index].detach()
        noisy = below + self.options["noise"] * torch.randn_like(below)
        with torch.no_grad():
            response = self.block_forward(index, noisy, recorded)
        reconstruction = self.feedback_maps[index](response)
        return 0.5 * (reconstruction - noisy).pow(2).sum() / below.shape[0]


@register_rule
class TargetPropagation(_InverseTargetRule):
    """TP: the layer below's target is the inverse of the target above."""

    name = "tp"

    def target_below(self, index, below, output, target):
        return self.feedback_maps[index](target)


@register_rule
class DifferenceTargetPropagation(_InverseTargetRule):
    """DTP: the inverse's error on h_l is cancelled, so t_l = h_l gives t_{l-1} = h_{l-1} exactly."""

    name = "dtp"

    def target_below(self, index, below, output, target):
        inverse = self.feedback_maps[index]
        return below + inverse(target) - inverse(output)


@register_rule
class LocalRepresentationAlignment(BlockTargetRule):
    """LRA: targets from error units through learned error weights E_l."""

    name = "lra"
    defaults = {"target_lr": 1.0, "beta": 1.0, "noise": 0.1}

    def make_feedback(self, in_features, out_features):
        return nn.Linear(out_features, in_features, bias=False)  # E_l: errors at l -> layer l-1

    def target_below(self, index, below, output, target):
        error_units = output - target
        return below - self.options["beta"] * self.feedback_maps[index](error_units)

    def feedback_loss(self, index, recorded):
        below = recorded.inputs[index].detach()
        noise = self.options["noise"]
        perturbation = noise * torch.randn_like(below)
        with torch.no_grad():
            response = self.block_forward(index, below + perturbation, recorded) \
                - self.block_forward(index, below, recorded)
        predicted = perturbation @ self.feedback_maps[index].weight  # xi E_l, the forward model
        return 0.5 * (predicted - response).pow(2).sum() / below.shape[0] / noise ** 2
