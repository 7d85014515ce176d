"""BP and the feedback-alignment family: FA, sign-concordant FA (uSF, brSF, frSF), adaFA.

Every rule here is "BP with the forward weight W replaced by a feedback tensor B of the
same shape in the backward pass"; they differ only in how B is built. Feedback
constructions follow biotorch (Sanfiz & Akrout 2021), adaFA follows Robertson & Koyejo
(ICML 2024).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.init import _calculate_fan_in_and_fan_out

from bpfree.rules.base import CONV_LAYERS, Rule, _remove_state, conv2d_call, register_rule
from bpfree.rules.functional import FeedbackConv2dFunction, FeedbackLinearFunction

# normal_fan_sum: N(0, 1/(fan_in + fan_out)), Akrout et al.'s B (fcnn/FCNN_FA.py:30).
FEEDBACK_INITS = ("xavier_uniform", "kaiming_uniform", "normal_fan_sum")


@register_rule
class Backprop(Rule):
    """Plain backpropagation: converted layers run their native forward and backward.

    Converting (rather than skipping) keeps BP on the same code path as every other rule,
    so counts, diagnostics and timings compare like with like.
    """

    name = "bp"
    defaults = {}


def draw_like_weight(weight: torch.Tensor, init: str, generator, out: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh random tensor shaped and scaled like a freshly initialised weight (drawn into
    `out`, a contiguous tensor of the weight's shape, when given)."""
    tensor = torch.empty_like(weight, memory_format=torch.contiguous_format) if out is None else out
    if init == "xavier_uniform":
        nn.init.xavier_uniform_(tensor, generator=generator)
    elif init == "kaiming_uniform":
        nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
    elif init == "normal_fan_sum":
        fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
        nn.init.normal_(tensor, std=(fan_in + fan_out) ** -0.5, generator=generator)
    else:  # validated earlier; kept for safety
        raise ValueError(f"unknown feedback init {init!r}; choices: {FEEDBACK_INITS}")
    return tensor


def sign_scale(weight: torch.Tensor) -> float:
    """uSF's scale s = sqrt(2 / (fan_in + fan_out)), the Xavier-normal std."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(weight)
    return math.sqrt(2.0 / (fan_in + fan_out))


class FeedbackRule(Rule):
    """Shared machinery: forward through an autograd function that uses self.feedback(layer)."""

    decay = 0.0

    def validate_options(self) -> None:
        init = self.options.get("init")
        if init is not None and init not in FEEDBACK_INITS:
            raise ValueError(f"rule {self.name!r}: unknown init {init!r}; choices: {', '.join(FEEDBACK_INITS)}")

    def prepare_batch(self, layer: nn.Module) -> None:
        """Per-batch work before the forward (brSF redraws its magnitudes here)."""

    def forward(self, layer, x):
        if not torch.is_grad_enabled():
            return layer._bpfree_original_class.forward(layer, x)
        if layer.training:
            self.prepare_batch(layer)
        feedback = self.feedback(layer)
        if isinstance(layer, CONV_LAYERS):
            c = conv2d_call(layer, x)
            return c.output(FeedbackConv2dFunction.apply(
                c.x, c.lift(layer.weight), layer.bias, c.lift(feedback), self.decay, *c.args))
        return FeedbackLinearFunction.apply(x, layer.weight, layer.bias, feedback, self.decay)


class StoredFeedbackRule(FeedbackRule):
    """B is a tensor stored on the layer as `feedback_weight` (a buffer unless learned)."""

    state_names = ("feedback_weight",)

    def initial_feedback(self, layer) -> torch.Tensor:
        raise NotImplementedError

    def convert_layer(self, layer, index):
        with torch.no_grad():
            feedback = self.initial_feedback(layer)
        layer.register_buffer("feedback_weight", feedback)

    def restore_layer(self, layer):
        _remove_state(layer, self.state_names)

    def feedback(self, layer):
        return layer.feedback_weight


@register_rule
class FeedbackAlignment(StoredFeedbackRule):
    """FA (Lillicrap et al. 2016): a fixed random B drawn like W (Xavier-uniform, as biotorch)."""

    name = "fa"
    defaults = {"init": "xavier_uniform", "seed": None}

    def initial_feedback(self, layer):
        return draw_like_weight(layer.weight, self.options["init"], self.generator(layer.weight.device))


@register_rule
class AdaptiveFeedbackAlignment(StoredFeedbackRule):
    """adaFA (Robertson & Koyejo 2024): B equals W at initialisation, then stays fixed.

    The first step is therefore exactly BP; W drifts away from B afterwards.
    """

    name = "adafa"
    defaults = {}

    def initial_feedback(self, layer):
        return layer.weight.detach().clone()


@register_rule
class UniformSignFeedback(FeedbackRule):
    """uSF: B = s * sign(W), recomputed from the current W at every forward."""

    name = "usf"
    defaults = {}

    def feedback(self, layer):
        weight = layer.weight.detach()
        return torch.sign(weight) * sign_scale(weight)


class RandomMagnitudeSignFeedback(FeedbackRule):
    """B = |M| o sign(W): sign-concordant feedback with random magnitudes M."""

    defaults = {"init": "xavier_uniform", "seed": None}

    def draw_magnitude(self, layer) -> torch.Tensor:
        return draw_like_weight(layer.weight, self.options["init"], self.generator(layer.weight.device)).abs_()

    def convert_layer(self, layer, index):
        with torch.no_grad():
            layer.register_buffer("feedback_magnitude", self.draw_magnitude(layer))

    def restore_layer(self, layer):
        _remove_state(layer, ("feedback_magnitude",))

    def feedback(self, layer):
        return torch.sign(layer.weight.detach()).mul_(layer.feedback_magnitude)


@register_rule
class BatchRandomSignFeedback(RandomMagnitudeSignFeedback):
    """brSF: magnitudes |M| redrawn for every training batch.

    Redraws come from the rule's own generator (seeded once at apply time from `seed` or
    the global stream), so they never shift dropout masks or data order.
    """

    name = "brsf"

    def __init__(self, **options):
        super().__init__(**options)
        self._redraw_seed = None
        self._redraw_generators: dict[torch.device, torch.Generator] = {}

    def convert_layer(self, layer, index):
        super().convert_layer(layer, index)
        if self._redraw_seed is None:
            seed = self.options["seed"]
            self._redraw_seed = int(torch.randint(2**62, ()).item()) if seed is None else int(seed) + 7919

    def private_rng_states(self):
        return {device: gen.get_state() for device, gen in self._redraw_generators.items()}

    def set_private_rng_states(self, states):
        # A generator created after the snapshot (lazily, on the first training forward)
        # must go too, or the next batch would continue its stream instead of starting it.
        for device in list(self._redraw_generators):
            if device not in states:
                del self._redraw_generators[device]
        for device, state in states.items():
            self._redraw_generator(device).set_state(state)

    def _redraw_generator(self, device) -> torch.Generator:
        gen = self._redraw_generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._redraw_seed)
            self._redraw_generators[device] = gen
        return gen

    def prepare_batch(self, layer):
        gen = self._redraw_generator(layer.weight.device)
        magnitude = layer.feedback_magnitude
        with torch.no_grad():
            if magnitude.is_contiguous():  # drawn in place: the same draws as into a fresh tensor
                draw_like_weight(layer.weight, self.options["init"], gen, out=magnitude).abs_()
            else:  # channels_last: draw in the weight's logical order, as always
                magnitude.copy_(draw_like_weight(layer.weight, self.options["init"], gen).abs_())


@register_rule
class FixedRandomSignFeedback(RandomMagnitudeSignFeedback):
    """frSF: magnitudes |M| drawn once and kept; only the signs follow W."""

    name = "frsf"
