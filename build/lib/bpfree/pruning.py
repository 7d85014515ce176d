"""Pruning curves, weight sparsity (Gini) and sign changes: the LFP paper's E3/E5 measures.

Why functions over a trained model rather than a training mode: the paper prunes models
AFTER training, without fine-tuning, and compares how accuracy falls; the same code must
serve every rule's checkpoints, so it only needs the model, a scoring rule and an
evaluation function. Pruning is applied to the Linear/Conv2d weights (not biases), or to
the Conv2d weights only as the LFP authors' pruning notebook does (layers "conv"), and
always undone, so the model is left exactly as it was.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

PRUNABLE = (nn.Linear, nn.Conv2d)
# Which layers a pruning curve prunes. "conv": the authors' E3 curves, layers = [m for m in
# model.modules() if isinstance(m, Conv2d)] (cifar10-cifar100-eval-clusterresults-pruning.ipynb).
LAYER_SETS = {"all": PRUNABLE, "conv": (nn.Conv2d,)}
METHODS = ("global_magnitude", "layer_magnitude", "relevance")


def prunable_layers(model: nn.Module, layers: str = "all") -> list[tuple[str, nn.Module]]:
    if layers not in LAYER_SETS:
        raise ValueError(f"unknown layer set {layers!r}; choices: {', '.join(LAYER_SETS)}")
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LAYER_SETS[layers])]


def gini(values: torch.Tensor) -> float:
    """Gini coefficient of non-negative values: 0 = all equal, -> 1 = all mass in one entry."""
    x = values.detach().reshape(-1).double().abs().sort().values
    n = x.numel()
    if n == 0 or x.sum() == 0:
        return 0.0
    ranks = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
    return float((2 * (ranks * x).sum() / (n * x.sum()) - (n + 1) / n).item())


def layer_gini(model: nn.Module) -> dict[str, float]:
    """Per-layer Gini of |w|: how concentrated each layer's weights are."""
    return {name: gini(m.weight) for name, m in prunable_layers(model)}


def relevance_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> dict[str, torch.Tensor]:
    """|LFP-eps feedback| of every weight on (x, y): the "smallest relevance" pruning score."""
    from bpfree.rules import apply_rule  # pruning is a measurement; rules are only borrowed here
    saved = {id(p): None if p.grad is None else p.grad.clone() for p in model.parameters()}
    was_training = model.training
    model.eval()
    with apply_rule(model, "lfp_eps", eps=eps) as handle:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        scores = {name: layer.weight.grad.detach().abs().clone() for name, layer in handle.named_layers}
    for p in model.parameters():
        p.grad = saved[id(p)]
    model.train(was_training)
    return scores


def pruning_masks(model: nn.Module, fraction: float, method: str,
                  scores: dict[str, torch.Tensor] | None = None,
                  layers: str = "all") -> dict[str, torch.Tensor]:
    """Boolean keep-masks that remove `fraction` of the weights with the smallest score.

    global_magnitude: one threshold on |w| over the pruned layers; layer_magnitude: the same
    fraction in every layer; relevance: one threshold over the pruned layers on `scores`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choices: {', '.join(METHODS)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    pruned = prunable_layers(model, layers)
    if method == "relevance":
        if scores is None:
            raise ValueError("relevance pruning needs scores (see relevance_scores)")
        score = {name: scores[name] for name, _ in pruned}
    else:
        score = {name: m.weight.detach().abs() for name, m in pruned}
    if method == "layer_magnitude":
        return {name: _keep_largest(s, fraction) for name, s in score.items()}
    flat = torch.cat([s.reshape(-1) for s in score.values()])
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return {name: torch.ones_like(s, dtype=torch.bool) for name, s in score.items()}
    # rank-based so ties never remove more than k weights
    order = flat.argsort(stable=True)
    keep_flat = torch.ones_like(flat, dtype=torch.bool)
    keep_flat[order[:k]] = False
    masks, start = {}, 0
    for name, s in score.items():
        masks[name] = keep_flat[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return masks


def _keep_largest(score: torch.Tensor, fraction: float) -> torch.Tensor:
    k = int(round(fraction * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    keep[score.reshape(-1).argsort(stable=True)[:k]] = False
    return keep.reshape(score.shape)


def pruning_curve(model: nn.Module, evaluate: Callable[[nn.Module], float], method: str,
                  fractions: Iterable[float] = tuple(i / 20 for i in range(20)),
                  scores: dict[str, torch.Tensor] | None = None, layers: str = "all") -> list[dict]:
    """Accuracy (whatever `evaluate` returns) after pruning each fraction, without fine-tuning."""
    pruned = dict(prunable_layers(model, layers))
    original = {name: m.weight.detach().clone() for name, m in pruned.items()}
    curve = []
    try:
        for fraction in fractions:
            masks = pruning_masks(model, fraction, method, scores, layers)
            with torch.no_grad():
                for name, m in pruned.items():
                    m.weight.copy_(original[name] * masks[name])
            curve.append({"fraction": float(fraction), "value": float(evaluate(model))})
    finally:
        with torch.no_grad():
            for name, m in pruned.items():
                m.weight.copy_(original[name])
    return curve


def sign_flip_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Fraction of weight entries whose sign changed between two state dicts (zeros count
    as a change only when the other side is non-zero)."""
    changed = total = 0
    for name, w0 in before.items():
        if not name.endswith("weight") or name not in after or w0.dim() < 2:
            continue
        s0, s1 = torch.sign(w0), torch.sign(after[name])
        changed += int((s0 != s1).sum())
        total += w0.numel()
    return changed / total if total else 0.0
