"""Direct Feedback Alignment (Nokland 2016) through one central autograd function.

Each converted layer marks its *input* as a feedback point and consumes a detached copy,
so no error flows between converted layers. A forward hook on the model routes the
output through `_DirectFeedbackHub`, whose backward receives e = dL/d(output) and hands
every point its own fixed random projection B_l e. The projection then flows back
through the activation (and any norm layer) to the previous converted layer, which gives
Nokland's delta_l = (B_l e) o f'(a_l). Because points are layer inputs rather than
module positions in a chain, this works for any graph, transformers included (a token
tensor (N, T, F) receives B_l e broadcast over tokens when the output is per sequence).

Skip connections that bypass a converted layer still carry their (BP) gradient between
points; DFA papers on ResNets differ on this, and this implementation documents rather
than hides it.

Conv layers take one of two feedback shapes (option `conv_feedback`):
- "dense" (default): one matrix from the C classes to every input unit (C_in*H*W), so each
  input position has its own random weights;
- "kernel": biotorch's shape (C, C_in, kh, kw) (C, C_in, k for a Conv1d) (biotorch/layers/dfa/conv.py:51-54, Xavier-
  uniform at :74): the error is copied to every output position of the conv and sent
  through its transposed convolution (conv2d_input, :110-129), so every position shares
  one kernel and border inputs, which fewer output positions see, receive less.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from bpfree import distributed
from bpfree.rules.base import CONV_LAYERS, Rule, _remove_state, conv_padding, register_rule

CONV_FEEDBACK = ("dense", "kernel")


class _DirectFeedbackHub(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, layers, *points):
        ctx.layers = layers
        ctx.point_shapes = [p.shape for p in points]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        grads = [
            project_error_through_kernel(layer, grad_output, shape) if layer.dfa_feedback.dim() > 2
            else project_error(layer.dfa_feedback, grad_output, shape, tokens=not isinstance(layer, CONV_LAYERS))
            for layer, shape in zip(ctx.layers, ctx.point_shapes)
        ]
        return (grad_output, None, *grads)


def conv_output_size(layer: nn.Conv1d | nn.Conv2d, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """The spatial size the conv gives for an input of spatial size `sizes`."""
    if layer.padding == "same":
        return tuple(sizes)
    padding = conv_padding(layer)
    return tuple(
        (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
        for size, pad, dil, k, stride in zip(sizes, padding, layer.dilation, layer.kernel_size, layer.stride))


def project_error_through_kernel(layer: nn.Conv1d | nn.Conv2d, error: torch.Tensor,
                                 shape: torch.Size) -> torch.Tensor:
    """biotorch's conv DFA: e copied to every output position, then the conv's transposed
    convolution with the kernel-shaped B (C, C_in, *kernel) gives the input's gradient."""
    kernel = layer.dfa_feedback.to(error.dtype)
    error = error.reshape(error.shape[0], -1)
    sizes = conv_output_size(layer, tuple(shape[2:]))
    spread = error[(..., *[None] * len(sizes))].expand(*error.shape, *sizes)
    conv_input = torch.nn.grad.conv1d_input if len(sizes) == 1 else torch.nn.grad.conv2d_input
    return conv_input(shape, kernel, spread, layer.stride, conv_padding(layer), layer.dilation)


def project_error(matrix: torch.Tensor, error: torch.Tensor, shape: torch.Size, tokens: bool = True) -> torch.Tensor:
    """B_l e in the shape of point l: per token for a Linear's (N, T, F) input, one flat
    vector per sample for a conv's feature map (a Conv1d's (N, C, L) included)."""
    matrix = matrix.to(error.dtype)
    if tokens and len(shape) == 3:
        projected = error @ matrix.t()  # (N, C) -> (N, F) or (N, T, C) -> (N, T, F)
        if projected.dim() == 2:
            projected = projected.unsqueeze(1).expand(shape)
        return projected
    return (error.reshape(error.shape[0], -1) @ matrix.t()).reshape(shape)


@register_rule
class DirectFeedbackAlignment(Rule):
    """DFA: every hidden layer is driven by a fixed random projection of the output error.

    Each point l has its own matrix B_l (never slices of a shared one), drawn on first use
    Xavier-uniform over its (d_in, d_out) shape, bound sqrt(6 / (d_in + d_out)), like
    biotorch; a scale independent of d_in (e.g. U(+-1/sqrt(d_out))) makes the summed
    updates of wide conv layers explode. Stored on the consuming layer as buffer
    `dfa_feedback`, so it lands in state_dict and checkpoints.
    """

    name = "dfa"
    defaults = {"seed": None, "conv_feedback": "dense"}
    feedback_replaces_weight = False

    def validate_options(self) -> None:
        if self.options["conv_feedback"] not in CONV_FEEDBACK:
            raise ValueError(f"rule 'dfa': unknown conv_feedback {self.options['conv_feedback']!r}; "
                             f"choices: {', '.join(CONV_FEEDBACK)}")

    def __init__(self, **options):
        super().__init__(**options)
        self._points: list[torch.Tensor] = []
        self._point_ids: dict[int, int] = {}
        self._point_layers: list[nn.Module] = []

    # The first layer to consume a tensor owns its point; sharing consumers (Q/K/V) reuse it.
    def forward(self, layer, x):
        native = layer._bpfree_original_class.forward
        if not (torch.is_grad_enabled() and x.requires_grad and layer.training):
            return native(layer, x)
        key = id(x)
        if key not in self._point_ids:
            self._point_ids[key] = len(self._points)
            self._points.append(x)
            self._point_layers.append(layer)
        return native(layer, x.detach())

    def feedback(self, layer):
        return layer._buffers.get("dfa_feedback")

    def restore_layer(self, layer):
        _remove_state(layer, ("dfa_feedback",))

    def _reset(self, *_):
        self._points, self._point_ids, self._point_layers = [], {}, []

    def _route_output(self, module, inputs, output):
        points, layers = self._points, self._point_layers
        self._reset()
        if not points or not self.active:
            return output
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"rule 'dfa' needs the model to return a tensor (got {type(output).__name__}); "
                "wrap the model so its forward returns the logits"
            )
        # Per-sequence (N, C) and per-token (N, T, C) outputs project from C; any other
        # output (e.g. a conv feature map (N, C, H, W)) is one flat error vector per sample.
        out_dim = output.shape[-1] if output.dim() <= 3 else output[0].numel()
        for layer, point in zip(layers, points):
            self._ensure_matrix(layer, point, out_dim, output)
        return _DirectFeedbackHub.apply(output, tuple(layers), *points)

    def _ensure_matrix(self, layer, point, out_dim, output):
        kernel = self.options["conv_feedback"] == "kernel" and isinstance(layer, CONV_LAYERS)
        if kernel:
            if layer.groups != 1 or layer.padding_mode != "zeros":
                raise ValueError(f"rule 'dfa': conv_feedback 'kernel' needs a plain convolution (groups 1, "
                                 f"zero padding); {layer} has groups {layer.groups}, padding "
                                 f"{layer.padding_mode!r}; use conv_feedback 'dense'")
            shape = (out_dim, layer.in_channels, *layer.kernel_size)
        else:
            tokens = point.dim() == 3 and not isinstance(layer, CONV_LAYERS)
            shape = (point.shape[-1] if tokens else point[0].numel(), out_dim)
        existing = layer._buffers.get("dfa_feedback")
        if existing is not None and existing.shape == shape:
            return
        if existing is not None:
            raise ValueError(
                f"rule 'dfa': the input of {type(layer).__name__} changed shape "
                f"(feedback is {tuple(existing.shape)}, need {shape})"
            )
        # Xavier-uniform over B's own shape: for a kernel, fan_in C_in*kh*kw and fan_out C*kh*kw
        # (torch's fans of a (C, C_in, kh, kw) tensor), as biotorch draws it.
        if kernel:
            receptive = math.prod(layer.kernel_size)
            fan_sum = (layer.in_channels + out_dim) * receptive
        else:
            fan_sum = shape[0] + shape[1]
        bound = (6.0 / fan_sum) ** 0.5
        matrix = torch.empty(shape, device=output.device, dtype=torch.float32)
        matrix.uniform_(-bound, bound, generator=self.generator(output.device))
        distributed.broadcast_(matrix)  # drawn lazily: data-parallel ranks take rank 0's draw
        layer.register_buffer("dfa_feedback", matrix)

    def attach(self, model, layers):
        return [
            model.register_forward_pre_hook(self._reset),
            model.register_forward_hook(self._route_output),
        ]
