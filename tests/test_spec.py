"""RunSpec (bpfree/spec.py) holds every run of every profile, and hashes as the dict did."""
import pytest

from bpfree.config import ConfigError, config_hash, load_params, run_configs, run_specs
from bpfree.spec import ABSENT, RunSpec
from conftest import REPO

PARAMS = load_params(REPO / "params.yaml")


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_every_resolved_run_round_trips_and_hashes_as_before(profile, monkeypatch):
    monkeypatch.chdir(REPO)  # tuned lrs live in results/tuning
    checked = 0
    for exp_id in PARAMS["experiments"]:
        try:
            runs = run_configs(PARAMS, exp_id, profile)
        except ConfigError:  # an lr still to be tuned on this profile: nothing to build
            continue
        for run, spec in zip(runs, run_specs(PARAMS, exp_id, profile)):
            assert spec.to_dict() == run, (exp_id, run["run_id"])
            assert config_hash(spec.hash_payload(), "d") == config_hash(run, "d")
            checked += 1
    assert checked > 100


def test_unknown_and_missing_keys_are_refused_and_absent_keys_stay_absent(monkeypatch):
    monkeypatch.chdir(REPO)
    run = run_configs(PARAMS, "A2_mnist_mlp", "smoke")[0]
    with pytest.raises(KeyError, match="does not know"):
        RunSpec.from_dict({**run, "epoch": 3})
    with pytest.raises(KeyError, match="optimizer.*does not know"):
        RunSpec.from_dict({**run, "optimizer": {**run["optimizer"], "betas": [0.9, 0.99]}})
    with pytest.raises(KeyError, match="missing"):
        RunSpec.from_dict({k: v for k, v in run.items() if k != "seed"})
    spec = RunSpec.from_dict(run)
    assert spec.continual is ABSENT and "continual" not in spec.to_dict() and spec.protocol == "single"
    assert spec.optimizer.lr == run["optimizer"]["lr"] and spec.loader.drop_last is True
    with pytest.raises(AttributeError):
        spec.seed = 1  # frozen


def test_the_trainer_reads_the_spec_and_its_defaults_are_said_once(mnist):
    """train_run checks a hand-built dict into a RunSpec before any work, and what an absent
    key means (no clipping, evaluation every epoch, a reshuffled walk keeping the last batch)
    is read off the spec's properties."""
    from bpfree.training import train_run
    from tests.test_training import mlp_run
    spec = RunSpec.from_dict(mlp_run())
    assert spec.run_id is ABSENT and spec.name == "bp"
    assert spec.optimizer.clip is None and spec.optimizer.bias_scale == 1.0
    assert spec.log_interval == 1 and spec.batch_order == (True, False) and spec.deterministic_kernels
    assert spec.preprocess.crop == 0 and not spec.preprocess.augments
    assert RunSpec.from_dict(mlp_run(loader={"drop_last": True})).batch_order == (True, True)
    with pytest.raises(KeyError, match="does not know.*epoch"):
        train_run({**mlp_run(), "epoch": 3}, mnist, "cpu")
    metrics = train_run(spec, mnist, "cpu")
    assert metrics["config"] == mlp_run() and metrics["status"] == "OK"
