"""The lr search picks on validation accuracy and feeds `lr: tuned`; the launcher shards runs."""
import json
import os
from pathlib import Path

import pytest
import yaml

from bpfree.config import ConfigError, load_params, run_configs, validate_params

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BPFREE_DATA_DIR", REPO.parent / "shared" / "data"))


def tiny_params():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["mnist"]
    exp = params["experiments"]["A2_mnist_mlp"]
    exp["rules"] = {"bp": {"lr": "tuned"}, "fa": {"lr": 0.1}}
    exp["tuning"] = {"lrs": [1e-6, 0.5], "epochs": 2, "seed": 0}
    exp["model"]["options"]["width"] = 16
    exp["val_size"] = 64
    exp["selection"] = "best_val"
    params["experiments"] = {"A2_mnist_mlp": exp}
    params["profiles"] = {"smoke": {"A2_mnist_mlp": {"epochs": 1, "seeds": [1, 2], "train_subset": 256,
                                                     "test_subset": 64, "threads": 1, "device": "cpu"}}}
    return params


@pytest.fixture
def workdir(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # stages/ is not an installed package
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "mnist").symlink_to(mnist_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    return tmp_path


def test_tuned_lr_without_a_search_is_a_clear_config_error(workdir):
    params = validate_params(load_params(workdir / "params.yaml"))
    with pytest.raises(ConfigError) as err:
        run_configs(params, "A2_mnist_mlp")
    msg = str(err.value)
    assert "experiments.A2_mnist_mlp.rules.bp.lr" in msg and "results/tuning/A2_mnist_mlp/bp.json" in msg
    assert "python -m stages.tune A2_mnist_mlp" in msg


def test_search_picks_best_validation_lr_and_runs_use_it(workdir):
    import stages.tune as tune
    assert tune.main(["A2_mnist_mlp", "--rules", "bp"]) == 0
    record = json.loads((workdir / "results" / "tuning" / "A2_mnist_mlp" / "bp.json").read_text())
    trials = {t["lr"]: t["best_val_acc"] for t in record["trials"]}
    assert set(trials) == {1e-6, 0.5}
    assert trials[0.5] > trials[1e-6]  # an lr of 1e-6 cannot learn in 2 epochs
    assert record["chosen_lr"] == 0.5 and "validation" in record["criterion"]
    assert all("test" not in key for t in record["trials"] for key in t)  # never consulted

    runs = run_configs(validate_params(load_params(workdir / "params.yaml")), "A2_mnist_mlp")
    bp = [r for r in runs if r["rule"]["name"] == "bp"]
    assert bp and all(r["optimizer"]["lr"] == 0.5 for r in bp)
    assert bp[0]["lr_source"] == "results/tuning/A2_mnist_mlp/bp.json"


def test_search_refuses_rules_outside_the_experiment(workdir):
    import stages.tune as tune
    with pytest.raises(ConfigError, match="not rules of A2_mnist_mlp"):
        tune.main(["A2_mnist_mlp", "--rules", "dfa"])


def test_launcher_runs_every_rule_and_seed_as_its_own_process(workdir):
    import stages.launch as launch
    assert launch.main(["A2_mnist_mlp", "--profile", "smoke", "--jobs", "2", "--tune",
                        "--log-dir", str(workdir / "logs")]) == 0
    runs = workdir / "results" / "smoke" / "runs" / "A2_mnist_mlp"
    assert sorted(p.parent.name for p in runs.glob("*/metrics.json")) == [
        "bp_seed1", "bp_seed2", "fa_seed1", "fa_seed2"]
    assert (workdir / "logs" / "tune_A2_mnist_mlp_bp.log").is_file()
    assert not (workdir / "logs" / "tune_A2_mnist_mlp_fa.log").exists()  # fa has a published lr
    bp = json.loads((runs / "bp_seed1" / "metrics.json").read_text())
    assert bp["config"]["optimizer"]["lr"] == 0.5 and bp["status"] == "OK"


def test_train_stage_shards_by_rule_and_seed(workdir):
    import stages.train as train
    (workdir / "results" / "tuning" / "A2_mnist_mlp").mkdir(parents=True)
    (workdir / "results" / "tuning" / "A2_mnist_mlp" / "bp.json").write_text('{"chosen_lr": 0.1}')
    assert train.main(["A2_mnist_mlp", "--rules", "fa", "--seeds", "2"]) == 0
    runs = workdir / "results" / "smoke" / "runs" / "A2_mnist_mlp"
    assert [p.parent.name for p in runs.glob("*/metrics.json")] == ["fa_seed2"]
    with pytest.raises(ConfigError, match="no run of A2_mnist_mlp matches"):
        train.main(["A2_mnist_mlp", "--seeds", "99"])


def test_launcher_runs_the_same_shards_as_submitit_jobs_in_its_local_mode(workdir):
    """The cluster path (submitit; on Slurm a job array) tested with submitit's local
    executor: the same runs land, with the same provenance, and a failing job is named."""
    pytest.importorskip("submitit", reason="submitit is in requirements.lock; this skips only outside the lock")
    import stages.launch as launch
    logs = workdir / "logs"
    assert launch.main(["A2_mnist_mlp", "--profile", "smoke", "--jobs", "2", "--tune", "--engine", "submitit",
                        "--cluster", "local", "--timeout-min", "10", "--log-dir", str(logs)]) == 0
    runs = workdir / "results" / "smoke" / "runs" / "A2_mnist_mlp"
    assert sorted(p.parent.name for p in runs.glob("*/metrics.json")) == [
        "bp_seed1", "bp_seed2", "fa_seed1", "fa_seed2"]
    bp = json.loads((runs / "bp_seed1" / "metrics.json").read_text())
    assert bp["config"]["optimizer"]["lr"] == 0.5 and bp["status"] == "OK" and bp["config_hash"]
    assert (logs / "train_A2_mnist_mlp_fa_2.log").is_file() and any((logs / "submitit").iterdir())
    from bpfree.launcher import run_submitit
    failed = run_submitit([("broken", ["stages.no_such_stage"])], 1, logs, "local", {"timeout_min": 5})
    assert failed == ["broken"] and "FailedJobError" in (logs / "broken.log").read_text()


def test_launcher_rejects_cluster_flags_without_submitit(workdir):
    import stages.launch as launch
    from bpfree.config import ConfigError
    with pytest.raises(ConfigError, match="need --engine submitit"):
        launch.main(["A2_mnist_mlp", "--profile", "smoke", "--cluster", "slurm"])
    with pytest.raises(ConfigError, match="--jobs.*must be >= 1"):
        launch.main(["A2_mnist_mlp", "--profile", "smoke", "--jobs", "0"])
