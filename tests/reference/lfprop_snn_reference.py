"""Writes tests/reference/lfprop_snn_1.0.0.pt: the LFP authors' spiking-net LFP step.

Runs in lfprop's own environment (see lfprop_reference.py for its venv; snnTorch 1.0 too):

    /tmp/lfpvenv/bin/pip install snntorch==1.0.0
    /tmp/lfpvenv/bin/python tests/reference/lfprop_snn_reference.py

On the DeeperSNN parity case of snn_case.py (float64, the weights and batch that
deepersnn_reference.py uses), one feedback computation of the authors' Trainer.lfp_step for
spiking nets (run_experiment.py:145-168 at c90f1cc): forward_fn_spiking over STEPS steps
(model/models.py:199-232) under LFPSNNEpsilonComposite (propagation/propagator_snn.py,
epsilon 1e-6), the reward SnnCorrectClassRewardSpikesRateCoded (rewards/reward_functions.py:
278-318) on the spike train, pushed back with autograd.grad. It records every weight's
feedback (norm and every k-th entry, snn_case.sample) and the reward.
"""
import sys
from importlib import metadata
from pathlib import Path

import torch
from lfprop.propagation.propagator_snn import LFPSNNEpsilonComposite
from lfprop.rewards.reward_functions import SnnCorrectClassRewardSpikesRateCoded

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deepersnn_reference import authors_case  # noqa: E402  (also keeps ATan in float64)
from snn_case import STEPS, sample  # noqa: E402

OUT = Path(__file__).resolve().parent / "lfprop_snn_1.0.0.pt"


def main():
    model, names, x, y = authors_case()
    model.train()
    with LFPSNNEpsilonComposite().context(model) as modified:
        inputs = x.detach().requires_grad_(True)
        spikes = torch.stack([modified(inputs)[0] for _ in range(STEPS)])
        reward = SnnCorrectClassRewardSpikesRateCoded(torch.device("cpu"))(spikes, y).detach()
        torch.autograd.grad((spikes,), (inputs,), grad_outputs=(reward,))
    feedback = [p.feedback.detach() for _, p in model.named_parameters()]
    record = {
        "versions": {k: metadata.version(k) for k in ("lfprop", "snntorch", "zennit", "lxt", "torch")},
        "names": names, "spikes": spikes.detach(), "reward": reward,
        "feedback_norms": [f.norm() for f in feedback],
        "feedback_samples": [sample(f) for f in feedback],
    }
    torch.save(record, OUT)
    print(f"wrote {OUT}: {int(spikes.sum())} output spikes, reward sum {reward.sum().item():.6f}, "
          f"feedback norms {[f'{f.norm().item():.6g}' for f in feedback]}")


if __name__ == "__main__":
    main()
