"""Parity with the authors' package: our LFP feedback and training step equal lfprop 1.0.0's.

lfprop's pins conflict with our lock, so its numbers come from tests/reference/
lfprop_reference.py, run in its own environment (the regeneration command is in that
script's docstring), and are committed as tests/reference/lfprop_1.0.0.pt. The nets and the
batch are rebuilt here from the same seeds (tests/reference/lfp_models.py). With the reward
as the authors define it (reward_scale "sum": one reward per sample, not divided by the batch
size), our per-parameter feedback must equal theirs to 1e-10 for LFP-eps (an MLP with biases
and a conv net with max and average pooling) and LFP-0 (the MLP; lfprop gives NaN where an
average pool's output is exactly 0, ours 0, so that case is left out), and one whole
training step of ours (reward, feedback, the rule's global clip at 3.0, SGD lr 0.1 momentum
0.9, through bpfree.loop.optimisation_step) must leave the weights the authors'
Trainer.lfp_step leaves. A mutated rule (the reward read off the mean loss, our old
default) must fail, so the comparison can.
"""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import bpfree
from bpfree.models import Heaviside
from bpfree.loop import optimisation_step

REFERENCE = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(REFERENCE))
from lfp_models import BATCH, MODELS, build  # noqa: E402

TOL = 1e-10
RECORD = torch.load(REFERENCE / "lfprop_1.0.0.pt", weights_only=True)
CASES = [(name, eps) for name in MODELS for eps in (1e-6, 0.0) if f"{name}/eps{eps:g}/feedback" in RECORD]


def build_ours(name: str):
    """The shared net, with our Heaviside where the reference run put lfprop's Step."""
    return build(name, **({"step": Heaviside} if name == "step" else {}))


def our_feedback(name: str, eps: float, reward_scale: str = "sum") -> dict[str, torch.Tensor]:
    model, x, y = build_ours(name)
    rule, options = ("lfp0", {}) if eps == 0 else ("lfp_eps", {"eps": eps})
    bpfree.apply_rule(model, rule, reward_scale=reward_scale, **options)
    model.train()
    nn.functional.cross_entropy(model(x), y).backward()  # the trainer's loss; grad = -feedback
    return {n: -p.grad for n, p in model.named_parameters()}


def max_difference(expected: dict, got: dict) -> float:
    assert sorted(expected) == sorted(got)
    return max((expected[k] - got[k]).abs().max().item() for k in expected)


def test_the_reference_comes_from_the_authors_package():
    assert RECORD["versions"]["lfprop"] == "1.0.0"
    assert len(CASES) == 5


@pytest.mark.parametrize("name,eps", CASES)
def test_feedback_equals_lfprops(name, eps):
    expected = RECORD[f"{name}/eps{eps:g}/feedback"]
    assert all(torch.isfinite(v).all() and v.abs().max() > 0 for v in expected.values())
    assert max_difference(expected, our_feedback(name, eps)) <= TOL


@pytest.mark.parametrize("name", [n for n in MODELS if f"{n}/eps1e-06/after_step" in RECORD])
def test_one_training_step_equals_the_authors_lfp_step(name):
    model, x, y = build_ours(name)
    handle = bpfree.apply_rule(model, "lfp_eps", eps=1e-6, reward_scale="sum", clip_update_norm=3.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    optimisation_step(model, handle, optimizer, x, y)
    got = {n: p.detach() for n, p in model.named_parameters()}
    assert max_difference(RECORD[f"{name}/eps1e-06/after_step"], got) <= TOL


def test_the_mean_reward_is_the_authors_divided_by_the_batch_and_fails_parity():
    """Our old default reads the reward off the mean loss: B times smaller feedback."""
    expected = RECORD["mlp/eps1e-06/feedback"]
    got = our_feedback("mlp", 1e-6, reward_scale="mean")
    assert max_difference(expected, got) > 1e-3
    assert max_difference(expected, {k: v * BATCH for k, v in got.items()}) <= TOL
