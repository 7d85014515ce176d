"""Writes tests/reference/lfprop_1.0.0.pt: the authors' LFP feedback and training step.

Runs in lfprop's own environment, whose pins (zennit < 0.6, lxt < 0.7, transformers < 5)
conflict with our lock; regenerate with:

    python3 -m venv /tmp/lfpvenv && /tmp/lfpvenv/bin/pip install lfprop==1.0.0 'transformers>=4.52.4,<5'
    /tmp/lfpvenv/bin/python tests/reference/lfprop_reference.py

For each net of lfp_models.py and eps in (1e-6, 0) it records lfprop's per-parameter
feedback for the reward the authors' Trainer uses (SoftmaxLossReward, one reward per sample,
not reduced over the batch), and for eps 1e-6 the parameters after one whole step of the
authors' Trainer.lfp_step (run_experiment.py at c90f1cc): grad = -feedback, one global
clip_grad_norm_ at 3.0, SGD lr 0.1 momentum 0.9.
"""
import sys
from importlib import metadata
from pathlib import Path

import torch
from lfprop.model.activations import Step
from lfprop.propagation import propagator_lxt
from lfprop.rewards import reward_functions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lfp_models import MODELS, build  # noqa: E402

OUT = Path(__file__).resolve().parent / "lfprop_1.0.0.pt"
CLIP, LR, MOMENTUM = 3.0, 0.1, 0.9


def feedback(model, x, y, eps):
    composite = propagator_lxt.LFPEpsilonComposite(epsilon=eps)
    reward_fn = reward_functions.SoftmaxLossReward(torch.device("cpu"))
    model.train()
    with composite.context(model) as modified:
        inputs = x.detach().requires_grad_(True)
        outputs = modified(inputs)
        reward = reward_fn(outputs, y).detach()
        torch.autograd.grad((outputs,), (inputs,), grad_outputs=(reward,))
    return {n: p.feedback.detach().clone() for n, p in model.named_parameters()}


def main():
    record = {"versions": {k: metadata.version(k) for k in ("lfprop", "zennit", "lxt", "torch")}}
    for name in MODELS:
        for eps in (1e-6, 0.0):
            if eps == 0.0 and name == "conv":
                continue  # lfprop gives NaN where an average pool's output is exactly 0 (ours: 0)
            model, x, y = build(name, **({"step": Step} if name == "step" else {}))
            fb = feedback(model, x, y, eps)
            record[f"{name}/eps{eps:g}/feedback"] = fb
            if eps == 0.0:
                continue
            optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
            optimizer.zero_grad()
            for n, p in model.named_parameters():
                p.grad = -fb[n]
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, 2.0)
            optimizer.step()
            record[f"{name}/eps{eps:g}/after_step"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.save(record, OUT)
    print(f"wrote {OUT}: {sorted(k for k in record if k != 'versions')} with {record['versions']}")


if __name__ == "__main__":
    main()
