"""BackMAN (Soltani Moakhar et al., arXiv 2310.09952): neurons as agents with normalised updates.

Paper notation, per layer l (batch rows): r[L] = -dl/da[L];
c[l]_i = alpha[l]_i / ||(r[l]^T a[l-1])_i||; g[l] = r[l] diag(c[l]);
r[l-1] = (g[l] W[l]) o M[l-1]; W[l] <- W[l] + g[l]^T a[l-1].

In autograd terms the error reaching a layer's output is grad_out = -r[l]. The layer's
backward scales each output neuron's error by c_i, so (1) its weight gradient row has norm
exactly alpha_i and (2) the NORMALISED signal g travels to the layer below, where the
activation's own backward applies the mask M. Parameters receive grad = -g^T a, so a plain
SGD step with lr eta moves every neuron's incoming weights by exactly eta * alpha. As in
the authors' code the bias gets the unnormalised signal (the BP bias gradient), and a
neuron whose update norm is ~0 is normalised by the layer's mean norm instead of
blowing up. With `unit_c` every c is 1 and the rule is exactly backpropagation.
For a Conv2d layer a neuron is an output channel (norm over in x kh x kw).

alpha_mode (default "fixed") says where alpha_i comes from:

- "fixed": alpha_i = the `alpha` option (1 per layer by default). With alpha 1 this is the
  hook of the authors' master branch (github.com/ckodser/greedyneuron a2def09, models.py:14-57:
  Grn = Gr/2 at :51, so every row / filter of dW has norm 1).
- "frobenius": `forgetting_hook` of the authors' released branch (neurips 0a607f3,
  models.py:12-47), the hook their Split-MNIST forgetting script registers
  (forgetting_check_hard.py:67-68). Per layer and per backward, with r = dL/dz (B x N; for a
  conv B x C x H x W) and n_i = ||(r^T a)_i|| (the hook reads Gw = (r/2)^T a through its
  (A + B)/2 module, so f_i = ||Gw_i|| = n_i/2 at :27/:29):

      Gr   = r / f = 2 r diag(1/n)                                        (:41)
      Grn  = r / f_normalize,  f_normalize = f / (||r/2||_F / ||Gr||_F)   (:42-44)
           = r diag(1/n) * ||r||_F / (2 ||r diag(1/n)||_F)

  i.e. c_i = alpha_l / n_i with alpha_l = ||r||_F / (2 ||r diag(1/n)||_F), so that the
  layer's normalised error g = Grn has ||g||_F = ||r||_F / 2. g replaces dL/dA (:47), so
  dW = g^T a and the layer below receives g W (then its activation mask); the bias, added
  outside the hooked module (:137, :159), gets the unnormalised r summed over the batch. For a
  Conv2d layer the Frobenius norms run over all of batch x channel x height x width (:27
  makes f a (1, C, 1, 1) tensor that broadcasts over Go). `alpha` must stay 1 and `unit_c`
  false in this mode.

Differences from the authors' hooks, all of the order of their eps (1e-15) or outside normal
training: their +1e-15 terms; their tiny-norm test is absolute (f < 1e-15, replaced by the
mean of all f) where ours is relative (see neuron_scales); their hook leaves the BP gradient
untouched when sum(Gw^2) <= 1e-15 (ours sends 0 when every norm is 0) and acts only in
training mode (ours whenever autograd records).
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from bpfree.rules.base import CONV_LAYERS, Rule, conv2d_call, register_rule

_ALPHA = "_bpfree_backman_alpha"


def neuron_scales(local: torch.Tensor, alpha, eps: float) -> torch.Tensor:
    """c_i = alpha_i / ||local_i|| per output neuron (row / output channel) of a weight gradient.

    Neurons whose norm is below eps (relative to the largest) use the layer's mean norm.
    """
    norms = local.detach().flatten(1).norm(dim=1)
    tiny = norms <= eps * norms.max().clamp_min(torch.finfo(norms.dtype).tiny)
    if tiny.all():
        return torch.zeros_like(norms)  # no signal anywhere: nothing to normalise, no update
    norms = torch.where(tiny, norms[~tiny].mean(), norms)
    return torch.as_tensor(alpha, dtype=norms.dtype, device=norms.device) / norms


def frobenius_scales(local: torch.Tensor, error_norms: torch.Tensor, eps: float) -> torch.Tensor:
    """forgetting_hook's c_i = (1/n_i) * ||r||_F / (2 ||r diag(1/n)||_F) (neurips 0a607f3, models.py:41-44).

    local: the layer's weight gradient r^T a (one row / output channel per neuron);
    error_norms: ||r_{:, i}|| per neuron over every other axis (batch, and height x width for a
    conv), so ||r||_F^2 = sum_i error_norms_i^2. Both Frobenius norms are taken after dividing by
    their largest entry, which leaves the ratio unchanged and keeps squares in range.
    """
    unit = neuron_scales(local, 1.0, eps)
    acc = torch.promote_types(unit.dtype, torch.float32)
    unit, e = unit.to(acc), error_norms.detach().to(acc)
    tiny = torch.finfo(acc).tiny
    u_max, e_max = unit.max(), e.max()
    e = e / e_max.clamp_min(tiny)
    factor = e.norm() / (2 * u_max * (unit / u_max.clamp_min(tiny) * e).norm()).clamp_min(tiny)
    # No signal (every unit or error 0): nothing to normalise, no update. torch.where, not an
    # `if`, so the GPU is not synchronised a second time per layer.
    return torch.where((u_max > 0) & (e_max > 0), unit * factor, torch.zeros_like(unit))


class BackmanLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, alpha, eps, unit_c, frobenius=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.alpha, ctx.eps, ctx.unit_c = bias is not None, alpha, eps, unit_c
        ctx.frobenius = frobenius
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
        flat_x = x.reshape(-1, x.shape[-1]).to(flat_grad.dtype)
        local = flat_grad.t() @ flat_x  # dL/dW: each row is one neuron's incoming update (negated)
        if ctx.unit_c:
            scale = None
        elif ctx.frobenius:
            scale = frobenius_scales(local, torch.linalg.vector_norm(flat_grad, dim=0), ctx.eps)
            scale = scale.to(flat_grad.dtype)
        else:
            scale = neuron_scales(local, ctx.alpha, ctx.eps).to(flat_grad.dtype)
        grad_x = grad_w = grad_b = None
        if needs_w:
            grad_w = (local if scale is None else local * scale[:, None]).to(weight.dtype)
        if needs_x:
            signal = grad_out if scale is None else grad_out * scale
            grad_x = (signal @ weight.to(signal.dtype)).to(x.dtype)
        if needs_b and ctx.has_bias:
            grad_b = flat_grad.sum(0).to(weight.dtype)  # bias: the unnormalised signal
        return grad_x, grad_w, grad_b, None, None, None, None


class BackmanConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, alpha, eps, unit_c, stride, padding, dilation, groups, frobenius=False):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.alpha, ctx.eps, ctx.unit_c = bias is not None, alpha, eps, unit_c
        ctx.frobenius = frobenius
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs_x, needs_w, needs_b = ctx.needs_input_grad[:3]
        conv_args = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        x_ = x.to(grad_out.dtype)
        w_ = weight.to(grad_out.dtype)
        if ctx.unit_c:  # exactly BP: one fused call
            grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x_, w_, [weight.shape[0]] if ctx.has_bias else None, *conv_args,
                [needs_x, needs_w, needs_b and ctx.has_bias])
            return (None if grad_x is None else grad_x.to(x.dtype),
                    None if grad_w is None else grad_w.to(weight.dtype),
                    None if grad_b is None else grad_b.to(weight.dtype),
                    None, None, None, None, None, None, None, None)
        _, local, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x_, w_, [weight.shape[0]] if ctx.has_bias else None, *conv_args,
            [False, True, needs_b and ctx.has_bias])
        if ctx.frobenius:
            scale = frobenius_scales(local, torch.linalg.vector_norm(grad_out, dim=(0, 2, 3)), ctx.eps)
        else:
            scale = neuron_scales(local, ctx.alpha, ctx.eps)
        scale = scale.to(grad_out.dtype)
        grad_w = (local * scale[:, None, None, None]).to(weight.dtype) if needs_w else None
        grad_x = None
        if needs_x:
            signal = grad_out * scale[None, :, None, None]
            grad_x, _, _ = torch.ops.aten.convolution_backward(
                signal, x_, w_, None, *conv_args, [True, False, False])
            grad_x = grad_x.to(x.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


@register_rule
class BackMAN(Rule):
    """Per-neuron normalised updates whose normalised error is what the layer below receives.

    alpha: a number (every layer) or one number per converted layer, in module order.
    alpha_mode: "fixed" (alpha as given) or "frobenius" (the authors' forgetting_hook: per layer
    and step alpha_l = ||r||_F / (2 ||r diag(1/n)||_F); see the module docstring).
    """

    name = "backman"
    alpha_modes = ("fixed", "frobenius")
    defaults = {"alpha": 1.0, "unit_c": False, "eps": 1e-12, "alpha_mode": "fixed"}
    feedback_replaces_weight = False  # the backward uses W itself; there is no B to align

    def validate_options(self) -> None:
        alpha = self.options["alpha"]
        values = alpha if isinstance(alpha, (list, tuple)) else [alpha]
        if not values or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and a > 0
                                 for a in values):
            raise ValueError(f"rule 'backman': alpha must be a number > 0 or a list of them, got {alpha!r}")
        if not isinstance(self.options["unit_c"], bool):
            raise ValueError("rule 'backman': unit_c must be true or false")
        eps = self.options["eps"]
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps < 1:
            raise ValueError(f"rule 'backman': eps must be a number in [0, 1), got {eps!r}")
        mode = self.options["alpha_mode"]
        if not isinstance(mode, str) or mode not in self.alpha_modes:
            raise ValueError(f"rule 'backman': alpha_mode must be one of {', '.join(map(repr, self.alpha_modes))}, "
                             f"got {mode!r}")
        if mode == "frobenius":
            if any(float(a) != 1.0 for a in values):
                raise ValueError("rule 'backman': alpha_mode 'frobenius' sets each layer's alpha from the error "
                                 f"norms (the authors' forgetting_hook); leave alpha at 1, got {alpha!r}")
            if self.options["unit_c"]:
                raise ValueError("rule 'backman': unit_c true (plain backprop) contradicts alpha_mode 'frobenius'")

    def check_layers(self, layers) -> None:
        alpha = self.options["alpha"]
        if isinstance(alpha, (list, tuple)) and len(alpha) != len(layers):
            raise ValueError(f"rule 'backman': alpha lists {len(alpha)} values but the model has "
                             f"{len(layers)} Linear/Conv layers; give one per layer or a single number")

    def convert_layer(self, layer: nn.Module, index: int) -> None:
        alpha = self.options["alpha"]
        if isinstance(alpha, (list, tuple)):
            alpha = alpha[index]
        setattr(layer, _ALPHA, float(alpha))

    def restore_layer(self, layer: nn.Module) -> None:
        if hasattr(layer, _ALPHA):
            delattr(layer, _ALPHA)

    def forward(self, layer, x):
        if not torch.is_grad_enabled():
            return layer._bpfree_original_class.forward(layer, x)
        args = (getattr(layer, _ALPHA), float(self.options["eps"]), bool(self.options["unit_c"]))
        frobenius = self.options["alpha_mode"] == "frobenius"
        if isinstance(layer, CONV_LAYERS):
            c = conv2d_call(layer, x)
            return c.output(BackmanConv2dFunction.apply(c.x, c.lift(layer.weight), layer.bias, *args, *c.args,
                                                        frobenius))
        return BackmanLinearFunction.apply(x, layer.weight, layer.bias, *args, frobenius)
