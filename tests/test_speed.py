"""Speed settings: every rule under bf16 autocast and under torch.compile (CPU backends),
and the trainer's `speed` profile key (precision, compile, channels_last)."""
import copy
import warnings

import pytest
import torch

import bpfree
from bpfree.config import ConfigError, resolve_experiment, validate_params
from bpfree.models import build_model
from bpfree.rules import get_rule_class
from bpfree.loop import optimisation_step
from conftest import tiny_options

CASES = [(rule, "lenet_mnist") for rule in bpfree.list_layer_rules()] + \
        [(rule, "bert_classifier") for rule in bpfree.list_rules()]


def build(rule, model_name):
    torch.manual_seed(0)
    if model_name == "bert_classifier":
        model = build_model(model_name, 3, vocab_size=50, dim=16, depth=2, heads=2, ffn_dim=32, max_len=12,
                            dropout=0.0)
        ids = torch.randint(5, 50, (4, 10), generator=torch.Generator().manual_seed(1))
        x = torch.stack([ids, torch.zeros_like(ids), torch.ones_like(ids)], 1)
    else:
        model = build_model(model_name, 3)
        x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    handle = bpfree.apply_rule(model, rule, **tiny_options(rule))
    return model, handle, x, torch.tensor([0, 1, 2, 1])


@pytest.mark.parametrize("rule,model_name", CASES)
def test_every_rule_steps_under_bf16_autocast(rule, model_name):
    model, handle, x, y = build(rule, model_name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    loss, _ = optimisation_step(model, handle, optimizer, x, y, autocast=autocast)
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32, name  # master weights stay fp32
        if p.grad is not None:
            assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), name


def step_grads(rule, model_name, variant):
    """The .grad of one step (lr 0) of `rule`, with the model's call and input given by
    variant(model, x) -> (net, x); noise-drawing rules (DTP, WM) draw the same."""
    model, handle, x, y = build(rule, model_name)
    net, x = variant(model, x)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimisation_step(net, handle, optimizer, x, y)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want):
    assert got.keys() == want.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def as_is(model, x):
    return model, x


@pytest.mark.parametrize("rule,model_name", CASES)
def test_every_rule_under_torch_compile_matches_eager(rule, model_name):
    torch._dynamo.reset()  # a fresh compile per case: no graph cached from another rule
    compiled = step_grads(rule, model_name, lambda model, x: (torch.compile(model, backend="aot_eager"), x))
    assert_same_grads(compiled, step_grads(rule, model_name, as_is))


@pytest.mark.parametrize("rule", bpfree.list_layer_rules())
def test_every_layer_rule_in_channels_last_matches_contiguous(rule):
    """speed.channels_last (the model and images in NHWC, as the bench's peer rows time it)
    changes the convolutions' summation order only: the same .grad to rounding."""
    def nhwc(model, x):
        return model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    assert_same_grads(step_grads(rule, "lenet_mnist", nhwc), step_grads(rule, "lenet_mnist", as_is))


def test_speed_profile_key_is_validated_and_only_set_when_used(params):
    exp_id = "F1_sick_transformer_depth"
    plain = resolve_experiment(params, exp_id, "cpu")
    assert "speed" not in plain  # configs (and hashes) of runs without it are unchanged
    changed = copy.deepcopy(params)
    changed["profiles"]["gpu"][exp_id] = {"device": "cuda", "speed": {"precision": "bf16", "compile": True}}
    validate_params(changed)
    assert resolve_experiment(changed, exp_id, "gpu")["speed"] == {
        "precision": "bf16", "compile": True, "channels_last": False}
    for bad in ({"precision": "fp8"}, {"compile": "yes"}, {"fuse": True}):
        broken = copy.deepcopy(params)
        broken["profiles"]["gpu"][exp_id] = {"speed": bad}
        with pytest.raises(ConfigError, match="speed"):
            validate_params(broken)


def test_trainer_runs_with_bf16_compile_and_channels_last(mnist, tmp_path, monkeypatch):
    import bpfree.training as training
    from test_training import mlp_run
    monkeypatch.setattr(training, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    run = mlp_run(model={"name": "lenet_mnist", "options": {}}, rule={"name": "fa", "options": {}}, epochs=1,
                  preprocess={"normalize": True, "resize": 32},
                  speed={"precision": "bf16", "compile": True, "channels_last": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = training.train_run(run, mnist, "cpu", checkpoint_path=tmp_path / "ck.pt")
    assert m["status"] == "OK" and m["epochs_completed"] == 1 and m["history"][0]["train_loss"] > 0
    splits = training.device_splits(mnist, run, torch.device("cpu"))
    model = training.load_checkpoint_model(tmp_path / "ck.pt", run, splits, "cpu")  # plain keys, no _orig_mod
    one_image = 100.0 / len(splits.y_test)  # NHWC and NCHW convolutions may round differently
    assert abs(training.accuracy(model, splits, splits.x_test, splits.y_test) - m["final_test_acc"]) <= one_image


def test_block_rules_are_exercised_here():
    assert any(get_rule_class(rule).granularity == "block" for rule, _ in CASES)
