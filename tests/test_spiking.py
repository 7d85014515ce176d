"""Step and spiking nets: LIF dynamics, surrogate vs plain gradient, reward through spikes."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bpfree.models import LIF, SpikeFunction, build_model
from bpfree.rules import apply_rule

REFERENCE = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(REFERENCE))
from snn_case import CLASSES, STEPS, batch, draw_weights, sample  # noqa: E402


def test_lif_integrates_leaks_and_resets_by_subtraction():
    lif = LIF(beta=0.9, threshold=1.0)
    lif.reset()
    out = [lif(torch.tensor([0.6])).item() for _ in range(3)]
    # mem: 0.6 -> 0.9*0.6+0.6 = 1.14 (spike, -> 0.14) -> 0.9*0.14+0.6 = 0.726
    assert out == [0.0, 1.0, 0.0]
    assert lif.mem.item() == pytest.approx(0.726)


def test_surrogate_gradient_is_atan_and_plain_gradient_is_zero():
    v = torch.tensor([-0.5, 0.0, 0.3], requires_grad=True)
    SpikeFunction.apply(v, "atan", 2.0).sum().backward()
    expected = 1.0 / (1 + (math.pi * v.detach()) ** 2)
    torch.testing.assert_close(v.grad, expected)
    v.grad = None
    SpikeFunction.apply(v, "none", 2.0).sum().backward()
    assert torch.count_nonzero(v.grad) == 0


@pytest.mark.parametrize("name, shape", [("spiking_mlp", (6, 1, 28, 28)), ("spiking_convnet", (6, 1, 28, 28))])
def test_spiking_nets_count_spikes_and_train_by_each_route(name, shape):
    torch.manual_seed(0)
    x, y = torch.rand(*shape) * 3, torch.randint(0, 10, (6,))
    grads = {}
    for route, rule, surrogate in (("surrogate", "bp", "atan"), ("plain", "bp", "none"), ("lfp", "lfp_eps", "none")):
        torch.manual_seed(1)
        model = build_model(name, 10, steps=5, surrogate=surrogate)
        counts = model(x)
        assert counts.shape == (6, 10) and (counts >= 0).all() and (counts <= 5).all()
        assert torch.equal(counts, counts.round())
        with apply_rule(model, rule):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        first = next(p for n, p in model.named_parameters() if n.endswith("weight"))
        grads[route] = first.grad.clone()
    assert torch.count_nonzero(grads["plain"]) == 0  # the step blocks the plain gradient
    assert torch.count_nonzero(grads["surrogate"]) > 0
    assert torch.count_nonzero(grads["lfp"]) > 0 and torch.isfinite(grads["lfp"]).all()



def test_unknown_surrogate_is_rejected():
    with pytest.raises(ValueError, match="surrogate"):
        build_model("spiking_mlp", 10, surrogate="sigmoid")


def _deepersnn_spike_train(reset: str):
    """Our deepersnn on the parity case: its per-step output spikes and ce_rate_loss."""
    # snnTorch keeps beta in a float32 buffer: 0.9 is 0.89999997615814 there (as in our float32 runs)
    beta = float(torch.tensor(0.9, dtype=torch.float32))
    model = build_model("deepersnn", CLASSES, steps=STEPS, beta=beta, surrogate="atan", reset=reset).double()
    draw_weights([p for _, p in model.named_parameters()])
    x, y = batch()
    for m in model.modules():
        if isinstance(m, LIF):
            m.reset()
    spikes = torch.stack([model.body(x) for _ in range(STEPS)])
    # snnTorch's ce_rate_loss: softmax cross-entropy of each step's output spikes, summed into a
    # float32 zero and divided by the steps there (functional/loss.py:123-128): its gradient
    # carries float32(1 / steps), so ours does too
    loss = torch.stack([F.cross_entropy(s, y) for s in spikes]).sum() * float(torch.tensor(1.0) / STEPS)
    return model, spikes, loss


def test_deepersnn_runs_as_the_authors_snntorch_net():
    """The LFP authors' DeeperSNN under snnTorch 1.0 (tests/reference/deepersnn_reference.py,
    float64, run in lfprop's venv): our deepersnn with reset "snntorch" gives the same output
    spike train and the same surrogate-gradient BPTT weight gradients; our older "decayed"
    reset does not, so the comparison can fail."""
    ref = torch.load(REFERENCE / "deepersnn_snntorch.pt", weights_only=True)
    model, spikes, loss = _deepersnn_spike_train("snntorch")
    assert [n for n, _ in model.named_parameters()] == [
        f"body.{n}.weight" for n in ("conv1", "conv2", "conv3", "conv4", "conv5", "classifier")]
    assert torch.equal(spikes, ref["spikes"]) and ref["spikes"].sum() > 0
    torch.testing.assert_close(loss.float(), ref["loss"].reshape(()), rtol=0, atol=1e-6)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for g, norm, part in zip(grads, ref["grad_norms"], ref["grad_samples"]):
        torch.testing.assert_close(g.norm(), norm, rtol=1e-9, atol=0)
        torch.testing.assert_close(sample(g), part, rtol=1e-9, atol=1e-12)
    _, other, _ = _deepersnn_spike_train("decayed")
    assert not torch.equal(other, ref["spikes"])


def test_deepersnn_shape_and_reset_are_checked():
    model = build_model("deepersnn", 10, steps=2)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"expects \(B, C, 32, 32\)"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match="LIF reset"):
        build_model("deepersnn", 10, reset="zero")


def test_lfp_through_spiking_nets_equals_the_authors_snn_rule():
    """The LFP authors' spiking-net step (tests/reference/lfprop_snn_reference.py: lfprop 1.0.0's
    LFPSNNEpsilonComposite and rate-coded reward on DeeperSNN, float64): our lfp_eps with
    reward snn_rate_coded, reward_scale sum and snn membrane on deepersnn (readout steps,
    loss ce_rate) gives every weight the same feedback, to 1e-9. Passing the reward straight
    through each LIF (snn pass, our default) does not, so the comparison can fail."""
    from bpfree.losses import ce_rate
    from bpfree.rules.lfp import snn_rate_coded_reward
    ref = torch.load(REFERENCE / "lfprop_snn_1.0.0.pt", weights_only=True)
    beta = float(torch.tensor(0.9, dtype=torch.float32))  # snnTorch's float32 buffer

    def feedback(snn_mode):
        model = build_model("deepersnn", CLASSES, steps=STEPS, beta=beta, readout="steps").double()
        draw_weights([p for _, p in model.named_parameters()])
        x, y = batch()
        options = {"reward": "snn_rate_coded", "reward_scale": "sum", "snn": snn_mode}
        with apply_rule(model, "lfp_eps", **options):
            model.zero_grad()
            out = model(x)
            ce_rate(out, y).backward()
        with torch.enable_grad():
            z = out.detach().requires_grad_(True)
            reward = snn_rate_coded_reward(z, torch.autograd.grad(ce_rate(z, y), z)[0]) * len(y)
        return out.detach(), reward, [-p.grad for p in model.parameters()]

    out, reward, ours = feedback("membrane")
    assert torch.equal(out.permute(2, 0, 1), ref["spikes"])
    torch.testing.assert_close(reward.permute(2, 0, 1), ref["reward"], rtol=0, atol=1e-12)
    for f, norm, part in zip(ours, ref["feedback_norms"], ref["feedback_samples"]):
        torch.testing.assert_close(f.norm(), norm, rtol=1e-9, atol=0)
        torch.testing.assert_close(sample(f), part, rtol=1e-9, atol=1e-12)
    _, _, passed = feedback("pass")
    assert not torch.allclose(passed[0].norm(), ref["feedback_norms"][0], rtol=1e-3)


def test_the_snn_membrane_rule_and_per_step_losses_reject_what_they_cannot_handle():
    from bpfree.losses import ce_rate
    with pytest.raises(ValueError, match="follow a Linear or Conv2d"):
        with apply_rule(build_model("spiking_convnet", 10, steps=2), "lfp_eps", snn="membrane"):
            pass
    with pytest.raises(ValueError, match="reset snntorch"):
        with apply_rule(build_model("spiking_mlp", 10, steps=2), "lfp_eps", snn="membrane"):
            pass
    with pytest.raises(ValueError, match="snn must be one of"):
        with apply_rule(build_model("spiking_mlp", 10, steps=2), "lfp_eps", snn="maybe"):
            pass
    with pytest.raises(ValueError, match="readout: steps"):
        ce_rate(torch.rand(4, 10), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="spiking readout"):
        build_model("spiking_mlp", 10, readout="rates")


def test_a_spike_train_output_is_scored_by_spike_counts_wherever_accuracy_is_read(params, mnist):
    """A net with readout steps returns (batch, classes, steps): accuracy (the evaluate stage's
    checkpoint re-check, pruning curves) counts spikes and never applies a loss that only fits
    logits; evaluate_split with the run's own loss (ce_rate) gives both numbers."""
    from bpfree.config import run_configs
    from bpfree.losses import ce_rate
    from bpfree.training import accuracy, device_splits, evaluate_split
    run = run_configs(params, "E4_mnist_spiking", "smoke")[0]
    images = device_splits(mnist, run, torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model("spiking_mlp", 10, steps=3, width=32, reset="snntorch", readout="steps")
    x, y = images.x_test[:64], images.y_test[:64]
    acc = accuracy(model, images, x, y)
    both = evaluate_split(model, images, x, y, ce_rate)
    assert acc == both[0] and 0 <= acc <= 100 and both[1] > 0
    with torch.no_grad():
        counts = model(images.prepare(x)).sum(2)
    assert acc == pytest.approx(100.0 * (counts.argmax(1) == y).float().mean().item())
