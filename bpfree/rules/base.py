"""Rule registry, in-place layer conversion and the reversible handle.

A rule converts an existing model by swapping the *class* of each Linear/Conv1d/Conv2d instance
for a subclass whose forward asks the rule what to do. The module object, its Parameters
(and so any optimizer already holding them), hooks and state_dict keys stay the same, and
restoring is a class swap back. No model is ever copied per rule.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn
import torch.nn.functional as F

CONV_LAYERS = (nn.Conv1d, nn.Conv2d)
SUPPORTED_LAYERS = (nn.Linear, *CONV_LAYERS)
_RULES: dict[str, type["Rule"]] = {}
_CONVERTED_CLASSES: dict[type, type] = {}


def register_rule(cls: type["Rule"]) -> type["Rule"]:
    """Class decorator: one registry for every rule family, keyed by the rule's name."""
    if cls.name in _RULES:
        raise ValueError(f"rule {cls.name!r} is already registered")
    _RULES[cls.name] = cls
    return cls


def list_layer_rules() -> list[str]:
    """Rules that apply to any model with Linear/Conv layers (not only to block-structured ones)."""
    return [name for name in list_rules() if _RULES[name].granularity == "layer"]


def list_rules() -> list[str]:
    """Names accepted by apply_rule, in registration order."""
    return list(_RULES)


def get_rule_class(name: str) -> type["Rule"]:
    try:
        return _RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown rule {name!r}; known rules: {', '.join(list_rules())}"
        ) from None


class _RuleLayer:
    """Mixin placed in front of the layer's own class while a rule is applied."""

    def forward(self, x):  # noqa: D401 - dispatch only
        rule = self._bpfree_rule
        if rule.active:
            return rule.forward(self, x)
        return self._bpfree_original_class.forward(self, x)

    @property
    def feedback(self):
        """The tensor the backward pass uses in place of this layer's weight."""
        return self._bpfree_rule.feedback(self)


def _converted_class(cls: type) -> type:
    if cls not in _CONVERTED_CLASSES:
        _CONVERTED_CLASSES[cls] = type(f"Rule{cls.__name__}", (_RuleLayer, cls), {"__module__": __name__})
    return _CONVERTED_CLASSES[cls]


def conv_padding(layer: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """Numeric padding for convolution_backward, which does not accept 'same'/'valid'."""
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            return (0,) * len(layer.kernel_size)
        pads = []
        for k, d in zip(layer.kernel_size, layer.dilation):
            total = d * (k - 1)
            if total % 2:
                raise ValueError(
                    f"padding='same' with an even effective kernel ({k}, dilation {d}) pads "
                    "asymmetrically, which bpfree's conv rules do not support; use explicit padding"
                )
            pads.append(total // 2)
        return tuple(pads)
    return tuple(layer.padding)


def padded_input(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Apply non-zero padding modes explicitly, as nn.Conv1d/2d do, returning the conv padding."""
    if layer.padding_mode != "zeros":
        return F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), \
            (0,) * len(layer.kernel_size)
    return x, conv_padding(layer)


@dataclass(frozen=True)
class Conv2dCall:
    """A Conv1d or Conv2d call in Conv2d terms, so each rule keeps one conv path.

    A Conv1d over length L is exactly a Conv2d of height 1: input (N, C, 1, L), kernel
    (O, I, 1, k), stride/padding/dilation (1, s) / (0, p) / (1, d). `lift` views a Conv1d's
    (O, I, k) weight or feedback as that kernel (autograd carries the gradient back to the
    3-d tensor); `output` drops the height again.
    """

    x: torch.Tensor
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    one_d: bool

    def lift(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unsqueeze(-2) if self.one_d else tensor

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-2) if self.one_d else y

    @property
    def args(self) -> tuple:
        return self.stride, self.padding, self.dilation, self.groups


def conv2d_call(layer: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> Conv2dCall:
    """The padded input and geometry of `layer` on `x`, lifted to 2-d for a Conv1d."""
    x, padding = padded_input(layer, x)
    if isinstance(layer, nn.Conv1d):
        return Conv2dCall(x.unsqueeze(-2), (1, *layer.stride), (0, *padding), (1, *layer.dilation),
                          layer.groups, True)
    return Conv2dCall(x, tuple(layer.stride), padding, tuple(layer.dilation), layer.groups, False)


class Rule:
    """A learning rule: how converted layers run forward/backward and what happens after a step.

    Subclasses set `name`, `defaults` (every accepted option with its default) and override
    the hooks they need. Options are validated once, at apply time.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # False where `feedback()` is not a stand-in for W (DFA's B_l projects the output error).
    feedback_replaces_weight: ClassVar[bool] = True
    # "layer": works on any model's Linear/Conv1d/Conv2d layers; "block": needs the model's `blocks`
    # ModuleList (target propagation and LRA treat each block as one layer).
    granularity: ClassVar[str] = "layer"
    # What trains a parameter outside the converted layers (a norm's gain, an embedding):
    # the conversion report's "trained by" for it.
    unconverted_trained_by: ClassVar[str] = "backprop of the rule's error signal"

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            valid = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(f"rule {self.name!r} got unknown option(s) {unknown}; valid options: {valid}")
        self.options = {**self.defaults, **options}
        self.active = True
        self.validate_options()

    def validate_options(self) -> None:
        """Reject option values that would silently switch the mechanism off."""

    def generator(self, device) -> torch.Generator | None:
        """A dedicated generator when the user fixed a seed; else the global stream."""
        seed = self.options.get("seed")
        if seed is None:
            return None
        gen = torch.Generator(device=device)
        gen.manual_seed(int(seed) + self._draws)
        self._draws += 1
        return gen

    _draws = 0

    # --- per-layer hooks -------------------------------------------------------------
    def check_layers(self, layers: list[nn.Module]) -> None:
        """Reject options that do not fit this model (e.g. one value per layer, miscounted)."""

    def check_model(self, model: nn.Module) -> None:
        """Reject a model the rule cannot train (e.g. a module type it has no rule for)."""

    def convert_layer(self, layer: nn.Module, index: int) -> None:
        """Create the per-layer state (buffers/parameters) the rule needs."""

    def restore_layer(self, layer: nn.Module) -> None:
        """Remove what convert_layer added."""

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer._bpfree_original_class.forward(layer, x)

    def feedback(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.weight

    # --- model-level hooks -----------------------------------------------------------
    def attach(self, model: nn.Module, layers: list[nn.Module]) -> list:
        """Install model-level hooks; return their handles so they can be removed."""
        return []

    def local_loss(self, targets: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """Extra loss of the rule's own local objectives (LFNN's workers, DTP's layer targets),
        added before backward; `loss` is the global loss (target propagation's top target)."""
        return None

    def before_step(self, layers: list[nn.Module]) -> None:
        """Work on the .grad a rule produced, before optimizer.step() (e.g. LFP's clipping)."""

    def after_step(self, layers: list[nn.Module]) -> None:
        """Work done after optimizer.step() (e.g. the weight-mirror phase)."""

    def private_rng_states(self) -> dict:
        """States of generators the rule owns, so diagnostics can rewind them."""
        return {}

    def set_private_rng_states(self, states: dict) -> None:
        pass

    def resume_state(self) -> dict:
        """What a resumed run needs besides the layers' buffers and parameters (which the
        model's state_dict holds): the count of seeded draws and the private generators."""
        return {"draws": self._draws,
                "rng": {str(device): state for device, state in self.private_rng_states().items()}}

    def load_resume_state(self, state: dict) -> None:
        self._draws = int(state["draws"])
        self.set_private_rng_states({torch.device(d): s for d, s in state["rng"].items()})


def _base_type_name(layer: nn.Module) -> str:
    from bpfree.rules.attention import PackedInProjection
    if isinstance(layer, PackedInProjection):
        return "MultiheadAttention.in_proj"
    return next(t.__name__ for t in SUPPORTED_LAYERS if isinstance(layer, t))


def _remove_state(layer: nn.Module, names: tuple[str, ...]) -> None:
    for attr in names:
        layer._buffers.pop(attr, None)
        layer._parameters.pop(attr, None)


@dataclass(frozen=True)
class ParameterRow:
    """One trainable parameter of a converted model and what trains it."""

    name: str
    shape: tuple[int, ...]
    governed: bool
    trained_by: str


class ConversionReport:
    """Every trainable parameter of a model under a rule: governed by the rule (a converted
    layer's weight or bias, or the rule's own feedback / read-out parameters) or not, and
    what trains it otherwise. biotorch prints "originally N layers, M converted"; this says
    which parameters, so "FA on a transformer" cannot quietly mean FA on half of it."""

    def __init__(self, rule: Rule, rows: list[ParameterRow], counts: dict[str, int]):
        self.rule, self.rows, self.counts = rule, rows, counts

    @property
    def ungoverned(self) -> list[str]:
        return [r.name for r in self.rows if not r.governed]

    def __str__(self) -> str:
        from tabulate import tabulate
        governed = sum(r.governed for r in self.rows)
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        head = (f"rule {self.rule.name!r}: converted {counts}; {governed} of {len(self.rows)} trainable "
                f"parameter tensors governed by the rule")
        table = tabulate([[r.name, "x".join(map(str, r.shape)), "yes" if r.governed else "no", r.trained_by]
                          for r in self.rows], headers=["parameter", "shape", "governed", "trained by"])
        return head + "\n" + table

    def __repr__(self) -> str:
        return self.__str__().splitlines()[0]


def _report(model: nn.Module, rule: Rule, layers: list[nn.Module], counts: dict[str, int]) -> ConversionReport:
    layer_params = {id(p): layer for layer in layers for p in (layer.weight, layer.bias) if p is not None}
    # the rule's own state: KP's B, LFNN's read-outs, the heads module lfnn_heads hangs on the output layer
    rule_params = {id(p) for layer in layers for p in layer.parameters()} - set(layer_params)
    rows = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in layer_params:
            rows.append(ParameterRow(name, tuple(p.shape), True, f"the rule ({rule.name})"))
        elif id(p) in rule_params:
            rows.append(ParameterRow(name, tuple(p.shape), True, f"the rule's own state ({rule.name})"))
        else:
            rows.append(ParameterRow(name, tuple(p.shape), False, rule.unconverted_trained_by))
    return ConversionReport(rule, rows, counts)


class RuleHandle:
    """What apply_rule returns: counts, the converted layers, the conversion report, restore,
    and the post-step call."""

    def __init__(self, model: nn.Module, rule: Rule, layers: list[tuple[str, nn.Module]],
                 attention: list[nn.Module] | None = None):
        self.model = model
        self.rule = rule
        self.named_layers = layers
        self.counts = dict(Counter(_base_type_name(m) for _, m in layers))
        self._attention = attention or []
        self._hooks = rule.attach(model, [m for _, m in layers])
        self._removed = False
        self.report = _report(model, rule, [m for _, m in layers], self.counts)

    @property
    def name(self) -> str:
        return self.rule.name

    @property
    def layers(self) -> list[nn.Module]:
        return [m for _, m in self.named_layers]

    def local_loss(self, targets: torch.Tensor, loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """Call after the forward pass: the rule's local losses to add to the global loss (or None)."""
        return self.rule.local_loss(targets, loss)

    def add_local_loss(self, loss: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The loss to call backward() on: the global loss plus the rule's local losses, if any."""
        local = self.local_loss(targets, loss)
        return loss if local is None else loss + local

    def before_step(self) -> None:
        """Call after backward and before optimizer.step(); rules that post-process .grad do it here."""
        self.rule.before_step(self.layers)

    def after_step(self) -> None:
        """Call after every optimizer.step(); rules that learn their feedback do it here."""
        self.rule.after_step(self.layers)

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """Run the model with plain BP inside the block (used by diagnostics)."""
        previous = self.rule.active
        self.rule.active = False
        try:
            yield
        finally:
            self.rule.active = previous

    def remove(self) -> None:
        """Restore every converted layer's class and drop the rule's state and hooks."""
        if self._removed:
            return
        for hook in self._hooks:
            hook.remove()
        for _, layer in self.named_layers:
            self.rule.restore_layer(layer)
            layer.__class__ = layer._bpfree_original_class
            del layer._bpfree_rule
            del layer._bpfree_original_class
        from bpfree.rules.attention import close_attention
        close_attention(self._attention)
        self._removed = True

    def __enter__(self) -> "RuleHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"RuleHandle(rule={self.name!r}, converted={{{counts}}})"


def _functional_submodules(model: nn.Module) -> set[int]:
    """Linear layers whose weights a parent uses functionally, bypassing their forward
    (the out_proj of attention modules the rule could not open)."""
    from bpfree.rules.attention import RuleMultiheadAttention
    return {id(m.out_proj) for m in model.modules()
            if isinstance(m, nn.MultiheadAttention) and not isinstance(m, RuleMultiheadAttention)}


def _collect_layers(model: nn.Module, name: str) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    bypassed = _functional_submodules(model)
    layers: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for qualname, module in model.named_modules():
        if not isinstance(module, SUPPORTED_LAYERS):
            continue
        if hasattr(module, "_bpfree_rule"):
            raise ValueError(
                f"layer {qualname or type(module).__name__!r} already has rule "
                f"{module._bpfree_rule.name!r} applied; call remove() on its handle first"
            )
        if id(module) in bypassed:
            skipped.append(qualname)
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"layer {qualname!r} is lazy and uninitialised; run one forward pass first")
        layers.append((qualname, module))
    if not layers:
        raise ValueError(
            f"rule {name!r} found nothing to convert in {type(model).__name__}: it converts "
            "nn.Linear, nn.Conv1d and nn.Conv2d layers (and subclasses) and nn.MultiheadAttention's projections"
        )
    return layers, skipped


def apply_rule(model: nn.Module, name: str, strict: bool = False, **options) -> RuleHandle:
    """Convert every Linear/Conv1d/Conv2d of `model` (and the Q/K/V and output projections of each
    nn.MultiheadAttention) in place to learn with rule `name`.

    Build the optimizer after this call: Kolen-Pollack adds trainable feedback
    Parameters. Returns a handle; `handle.report` lists every trainable parameter and what
    trains it, `handle.remove()` (or leaving a `with` block) restores the model exactly.
    ``strict=True`` raises, leaving the model untouched, when any trainable parameter of the
    model is not governed by the rule (a LayerNorm's gain, an embedding, a GRU).
    """
    from bpfree.rules.attention import close_attention, open_attention

    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_rule needs an nn.Module, got {type(model).__name__}")
    rule = get_rule_class(name)(**options)
    opened, left = open_attention(model) if rule.granularity == "layer" else ([], {})
    try:
        layers, skipped = _collect_layers(model, name)
        rule.check_layers([m for _, m in layers])  # before any change: a bad option leaves no trace
        rule.check_model(model)
    except Exception:
        close_attention(opened)
        raise
    if skipped:
        warnings.warn(
            "nn.MultiheadAttention computes its projections functionally, so these layers "
            f"keep plain BP: {skipped} ({'; '.join(f'{k}: {v}' for k, v in left.items())}). "
            "Use explicit Linear projections to put them under the rule.",
            stacklevel=2,
        )
    for index, (_, layer) in enumerate(layers):
        original = type(layer)
        layer._bpfree_original_class = original
        layer._bpfree_rule = rule
        layer.__class__ = _converted_class(original)
        rule.convert_layer(layer, index)
    handle = RuleHandle(model, rule, layers, opened)
    if strict and handle.report.ungoverned:
        handle.remove()
        raise ValueError(f"rule {name!r} (strict): {len(handle.report.ungoverned)} trainable parameter(s) not "
                         f"governed by the rule: {', '.join(handle.report.ungoverned)}")
    return handle
