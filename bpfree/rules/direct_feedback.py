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
"""
from __future__ import annotations

import torch
from torch import nn

from bpfree import distributed
from bpfree.rules.base import Rule, _remove_state, register_rule


class _DirectFeedbackHub(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, layers, *points):
        ctx.layers = layers
        ctx.point_shapes = [p.shape for p in points]
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output):
        grads = [
            project_error(layer.dfa_feedback, grad_output, shape)
            for layer, shape in zip(ctx.layers, ctx.point_shapes)
        ]
        return (grad_output, None, *grads)


def project_error(matrix: torch.Tensor, error: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B_l e in the shape of point l."""
    matrix = matrix.to(error.dtype)
    if len(shape) == 3:
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
    defaults = {"seed": None}
    feedback_replaces_weight = False

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
        in_dim = point.shape[-1] if point.dim() == 3 else point[0].numel()
        existing = layer._buffers.get("dfa_feedback")
        if existing is not None and existing.shape == (in_dim, out_dim):
            return
        if existing is not None:
            raise ValueError(
                f"rule 'dfa': the input of {type(layer).__name__} changed shape "
                f"(feedback is {tuple(existing.shape)}, need {(in_dim, out_dim)})"
            )
        bound = (6.0 / (in_dim + out_dim)) ** 0.5
        matrix = torch.empty(in_dim, out_dim, device=output.device, dtype=torch.float32)
        matrix.uniform_(-bound, bound, generator=self.generator(output.device))
        distributed.broadcast_(matrix)  # drawn lazily: data-parallel ranks take rank 0's draw
        layer.register_buffer("dfa_feedback", matrix)

    def attach(self, model, layers):
        return [
            model.register_forward_pre_hook(self._reset),
            model.register_forward_hook(self._route_output),
        ]
