"""Rules that learn their feedback so it comes to align with W: Kolen-Pollack and Weight Mirror.

Both follow Akrout et al. (NeurIPS 2019). By default they fix what switches the mechanism
off in the reference code (makrout/Deep-Learning-without-Weight-Transport at 688f47a): KP's
decay factor defaulting to 1, i.e. no decay (fcnn/FCNN_KP.py:30, never passed by
main.py:122), and WM's no-op rescale (fcnn/FCNN_WM.py:53-58). The runs that code reported
(experiments/mnist/*-V0) were made that way, so a reproduction of those numbers selects the
reference behaviour explicitly: KP with `decay: 0`, WM with `mirror: hebbian`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import distributed
from bpfree.rules.base import CONV_LAYERS, register_rule
from bpfree.rules.fa import StoredFeedbackRule, draw_like_weight
from bpfree.rules.functional import conv_weight_gradient


@register_rule
class KolenPollack(StoredFeedbackRule):
    """KP: B is a trainable Parameter that receives the same local update as W.

    With an L2 decay d on both, an SGD step with learning rate eta gives
    W <- (1 - eta d) W - eta dW and B <- (1 - eta d) B - eta dW, so W - B shrinks by
    lambda = 1 - eta d every step and B converges to W whatever its start. Because B is an
    ordinary Parameter with an ordinary .grad, any optimizer, scheduler, AMP and DDP apply
    to it unchanged; build the optimizer after apply_rule so it sees B.

    `decay: 0` is the reference code's reported run (its factor 1): W and B then receive the
    same increments, so B - W keeps its initial value and B aligns with W only as W grows
    away from its small initial scale.

    That identity needs an optimizer that maps equal gradients to equal steps. Adam does
    not: it normalises W's and B's gradients separately, the decay terms d W and d B are
    normalised away with them, and W - B barely shrinks (KP then behaves like FA; measured
    on the F transformer runs). ``match='update'`` keeps KP's invariant under any optimizer:
    B receives exactly W's applied update, and W - B shrinks by the factor (1 - shrink)
    after every step (SGD-KP's eta d). It stores the offset B - W, so B = W + offset.
    """

    name = "kp"
    defaults = {"init": "xavier_uniform", "decay": 1e-3, "match": "gradient", "shrink": 1e-2, "seed": None}
    state_names = ("feedback_weight", "feedback_offset")

    def validate_options(self):
        super().validate_options()
        decay = self.options["decay"]
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0:
            raise ValueError(
                f"rule 'kp': decay must be >= 0 (got {decay!r}); 0 is the reference code's reported "
                "run, where W - B keeps its initial value"
            )
        if self.options["match"] not in ("gradient", "update"):
            raise ValueError(f"rule 'kp': match must be 'gradient' or 'update', got {self.options['match']!r}")
        shrink = self.options["shrink"]
        if not isinstance(shrink, (int, float)) or not 0 < shrink < 1:
            raise ValueError(f"rule 'kp': shrink must be in (0, 1), got {shrink!r}")

    @property
    def matches_update(self) -> bool:
        return self.options["match"] == "update"

    @property
    def decay(self) -> float:
        return 0.0 if self.matches_update else float(self.options["decay"])

    def convert_layer(self, layer, index):
        with torch.no_grad():
            feedback = draw_like_weight(layer.weight, self.options["init"], self.generator(layer.weight.device))
        if self.matches_update:
            layer.register_buffer("feedback_offset", feedback - layer.weight.detach())
        else:
            layer.register_parameter("feedback_weight", nn.Parameter(feedback))

    def feedback(self, layer):
        if self.matches_update:
            return layer.weight.detach() + layer.feedback_offset
        return layer.feedback_weight

    @torch.no_grad()
    def after_step(self, layers):
        if self.matches_update:
            for layer in layers:
                layer.feedback_offset.mul_(1.0 - self.options["shrink"])


def _scaled(noise: torch.Tensor, std: float) -> torch.Tensor:
    """noise * std in place; unit noise (the default) is left as drawn, the same values."""
    return noise if std == 1.0 else noise.mul_(std)


@register_rule
class WeightMirror(StoredFeedbackRule):
    """WM: after each optimizer step, a mirror phase drives B towards W with noise alone.

    Mirror phase per layer: inject x ~ N(0, sigma^2) (no bias, no nonlinearity), y = W x,
    then B <- B + eta_m * (y x^T / (n sigma^2) - B). Since E[y x^T] = n sigma^2 W, B relaxes
    to W at rate eta_m per mirror step and its scale stays bounded -- the role the
    reference code's (no-op) rescale was meant to play. Conv layers use unpadded stride-1
    noise so every kernel tap is exercised at every position.

    ``mirror='hebbian'`` is the reference code's mirror (fcnn/FCNN_WM.py:30-58, 80, 101):
    x ~ U[-a/2, a/2) (a = noise_amplitude), y = act(W x + b) with the layer's bias and
    activation (the reference nets are all-sigmoid), B <- B + eta_m y^T x summed over the
    noise batch, with no decay and no bound; `warmup_steps` mirror steps run once before
    training (the reference runs one pass over the training batches, 468 for MNIST at 128).
    Linear layers only, as in the reference.
    """

    name = "wm"
    defaults = {
        "init": "xavier_uniform",
        "mirror": "estimate",
        "mirror_lr": 0.05,
        "mirror_batch": 64,
        "mirror_steps": 1,
        "noise_std": 1.0,
        "noise_amplitude": 0.1,
        "mirror_activation": "identity",
        "warmup_steps": 0,
        "seed": None,
    }
    MIRRORS = ("estimate", "hebbian")
    ACTIVATIONS = {"identity": lambda z: z, "sigmoid": torch.sigmoid}

    def validate_options(self):
        super().validate_options()
        opts = self.options
        if not 0 < opts["mirror_lr"] <= 1:
            raise ValueError(f"rule 'wm': mirror_lr must be in (0, 1], got {opts['mirror_lr']!r}")
        for key in ("mirror_batch", "mirror_steps"):
            if not isinstance(opts[key], int) or opts[key] < 1:
                raise ValueError(f"rule 'wm': {key} must be a positive int, got {opts[key]!r}")
        if opts["noise_std"] <= 0:
            raise ValueError(f"rule 'wm': noise_std must be > 0, got {opts['noise_std']!r}")
        if opts["mirror"] not in self.MIRRORS:
            raise ValueError(f"rule 'wm': mirror must be one of {', '.join(self.MIRRORS)}, got {opts['mirror']!r}")
        if opts["mirror_activation"] not in self.ACTIVATIONS:
            raise ValueError(f"rule 'wm': mirror_activation must be one of {', '.join(self.ACTIVATIONS)}, "
                             f"got {opts['mirror_activation']!r}")
        if not opts["noise_amplitude"] > 0:
            raise ValueError(f"rule 'wm': noise_amplitude must be > 0, got {opts['noise_amplitude']!r}")
        if not isinstance(opts["warmup_steps"], int) or opts["warmup_steps"] < 0:
            raise ValueError(f"rule 'wm': warmup_steps must be an int >= 0, got {opts['warmup_steps']!r}")

    def initial_feedback(self, layer):
        return draw_like_weight(layer.weight, self.options["init"], self.generator(layer.weight.device))

    def convert_layer(self, layer, index):
        if self.options["mirror"] == "hebbian" and not isinstance(layer, nn.Linear):
            raise ValueError(f"rule 'wm': mirror 'hebbian' (the reference code's) is defined for Linear "
                             f"layers only, not {type(layer).__name__}; use mirror 'estimate'")
        super().convert_layer(layer, index)
        with torch.no_grad():
            for _ in range(self.options["warmup_steps"]):  # before training, as the reference
                self.mirror(layer)

    @torch.no_grad()
    def hebbian_mirror(self, layer: nn.Linear) -> None:
        """The reference code's step: B += eta_m act(W x + b)^T x, x uniform, no decay."""
        opts = self.options
        weight = layer.weight.detach()
        gen = self.generator(weight.device)
        x = torch.rand((opts["mirror_batch"], weight.shape[1]), generator=gen, device=weight.device,
                       dtype=weight.dtype)
        x = opts["noise_amplitude"] * (x - 0.5)
        z = x @ weight.t() + (layer.bias.detach() if layer.bias is not None else 0.0)
        y = self.ACTIVATIONS[opts["mirror_activation"]](z)
        layer.feedback_weight.add_(y.t() @ x, alpha=opts["mirror_lr"])

    @torch.no_grad()
    def mirror(self, layer: nn.Module) -> None:
        """One mirror step on one layer."""
        opts = self.options
        if opts["mirror"] == "hebbian":
            return self.hebbian_mirror(layer)
        weight = layer.weight.detach()
        std = opts["noise_std"]
        n = opts["mirror_batch"]
        gen = self.generator(weight.device)
        if isinstance(layer, CONV_LAYERS):  # a Conv1d as a Conv2d of height 1
            one_d = isinstance(layer, nn.Conv1d)
            kernel = weight.unsqueeze(-2) if one_d else weight
            dilation = (1, *layer.dilation) if one_d else tuple(layer.dilation)
            (kh, kw), (dh, dw) = kernel.shape[-2:], dilation
            shape = (n, layer.in_channels, dh * (kh - 1) + kh, dw * (kw - 1) + kw)
            x = _scaled(torch.randn(shape, generator=gen, device=weight.device, dtype=weight.dtype), std)
            y = F.conv2d(x, kernel, None, 1, 0, dilation, layer.groups)
            positions = y.shape[-1] * y.shape[-2]
            outer = conv_weight_gradient(x, y, kernel.shape, dilation, layer.groups)
            estimate = outer.div_(n * positions * std**2).view_as(weight)
        else:
            x = _scaled(torch.randn((n, weight.shape[1]), generator=gen, device=weight.device, dtype=weight.dtype), std)
            y = x @ weight.t()
            estimate = (y.t() @ x).div_(n * std**2)
        layer.feedback_weight.lerp_(estimate, opts["mirror_lr"])

    def after_step(self, layers):
        if not layers:
            return
        # The mirror phase is its own fp32 computation, whatever autocast the caller is in.
        with torch.autocast(layers[0].weight.device.type, enabled=False):
            for _ in range(self.options["mirror_steps"]):
                for layer in layers:
                    self.mirror(layer)
        for layer in layers:  # data-parallel ranks keep rank 0's mirror (their noise may differ)
            distributed.broadcast_(layer.feedback_weight)
