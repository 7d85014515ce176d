"""Autograd functions whose backward uses a feedback matrix in place of the forward weight.

The forward pass is the ordinary torch op, so forward numerics equal BP's exactly; only
the error sent to the layer's input changes. The weight gradient is the true local one
(error times input), which is what every feedback-alignment variant prescribes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _with_decay(local: torch.Tensor, tensor: torch.Tensor, decay: float) -> torch.Tensor:
    """local + decay * tensor (KP's decay on W and on B), in the buffer of the product: the
    same values, one allocation fewer."""
    return local if decay == 0 else torch.mul(tensor, decay).add_(local)


class FeedbackLinearFunction(torch.autograd.Function):
    """y = x W^T + b; backward sends grad_y @ B to x instead of grad_y @ W.

    Works on inputs of any rank (batch, ..., features), as Linear does, so transformer
    token tensors need no reshaping by the caller. If the feedback tensor itself requires
    grad (Kolen-Pollack), it receives the same local gradient as W plus its own decay.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, decay):
        ctx.save_for_backward(x, weight, feedback)
        ctx.has_bias = bias is not None
        ctx.decay = decay
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, feedback = ctx.saved_tensors
        needs_x, needs_w, needs_b, needs_fb, _ = ctx.needs_input_grad
        grad_x = grad_w = grad_b = grad_fb = None
        if needs_x:
            grad_x = (grad_out @ feedback.to(grad_out.dtype)).to(x.dtype)
        if needs_w or needs_fb or needs_b:
            flat_grad = grad_out.reshape(-1, grad_out.shape[-1])
            if needs_w or needs_fb:
                flat_x = x.reshape(-1, x.shape[-1]).to(flat_grad.dtype)
                local = (flat_grad.t() @ flat_x).to(weight.dtype)
                if needs_w:
                    grad_w = _with_decay(local, weight, ctx.decay)
                if needs_fb:
                    grad_fb = _with_decay(local, feedback, ctx.decay)
            if needs_b and ctx.has_bias:
                grad_b = flat_grad.sum(0).to(weight.dtype)
        return grad_x, grad_w, grad_b, grad_fb, None


class FeedbackConv2dFunction(torch.autograd.Function):
    """conv2d whose input gradient is computed with the feedback kernel.

    One fused aten.convolution_backward call with the feedback tensor in the weight slot
    gives the input gradient through B and the (weight-independent) kernel gradient, so
    the rule costs the same kernels as BP.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, decay, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight, feedback)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.decay = decay
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs_x, needs_w, needs_b, needs_fb = ctx.needs_input_grad[:4]
        mask = [needs_x, needs_w or needs_fb, needs_b and ctx.has_bias]
        grad_x, local, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            x.to(grad_out.dtype),
            feedback.to(grad_out.dtype),
            [weight.shape[0]] if ctx.has_bias else None,
            list(stride), list(padding), list(dilation), False, [0, 0], groups, mask,
        )
        grad_w = grad_fb = None
        if local is not None:
            local = local.to(weight.dtype)
            if needs_w:
                grad_w = _with_decay(local, weight, ctx.decay)
            if needs_fb:
                grad_fb = _with_decay(local, feedback, ctx.decay)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(weight.dtype)
        return grad_x, grad_w, grad_b, grad_fb, None, None, None, None, None


def conv_weight_gradient(x: torch.Tensor, grad_out: torch.Tensor, weight_shape, dilation, groups):
    """Kernel gradient of a stride-1, unpadded conv: sum over positions of grad_out x input patch.

    Used by the weight-mirror phase, whose noise input must see every kernel tap at every
    output position so that E[update] is exactly proportional to W.
    """
    dummy = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_out, x, dummy, None, [1, 1], [0, 0], list(dilation), False, [0, 0], groups,
        [False, True, False],
    )
    return grad_w
