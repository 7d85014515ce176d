"""Every bad parameter must be caught before training, naming field path, value and choices."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bpfree.config import (ConfigError, config_hash, load_params, load_yaml, resolve_experiment, run_configs,
                           validate_params)

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture
def params():
    return copy.deepcopy(BASE)


def expect(params, *fragments):
    with pytest.raises(ConfigError) as info:
        validate_params(params)
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    assert "\n" not in msg
    return info.value


def test_repo_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert "profile" not in params, "the pipeline file chooses the profile, not params.yaml"
    assert yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"] == [{"profile": "smoke"}], \
        "plain `dvc repro` must stay the fast smoke profile"
    for exp in params["experiments"]:
        resolved = resolve_experiment(params, exp)
        if resolved.get("skip"):
            # Not resolved into runs: the train stage records NOT RUN first, and a skipped
            # experiment's lr search may not exist (C4: its data is absent, so it cannot).
            continue
        runs = run_configs(params, exp)
        sweep = resolved.get("sweep")
        points = [""] if not sweep else [f"_{sweep['param'].rsplit('.', 1)[-1]}{v}" for v in sweep["values"]]
        assert {r["run_id"] for r in runs} == {f"{rule}{p}_seed{s}" for rule in resolved["rules"]
                                                for s in resolved["seeds"] for p in points}
        assert len({r["run_id"] for r in runs}) == len(runs)


def test_unknown_rule(params):
    params["experiments"]["A2_mnist_mlp"]["rules"]["backprop"] = {"lr": 0.1}
    err = expect(params, "experiments.A2_mnist_mlp.rules.backprop", "'backprop'", "bp", "kp", "wm")
    assert err.path == "experiments.A2_mnist_mlp.rules.backprop"


def test_unknown_model(params):
    params["experiments"]["A1_mnist_lenet"]["model"]["name"] = "lenet5"
    expect(params, "experiments.A1_mnist_lenet.model.name", "'lenet5'", "lenet_mnist", "resnet20")


def test_unknown_model_option(params):
    params["experiments"]["A2_mnist_mlp"]["model"]["options"]["widht"] = 10
    expect(params, "experiments.A2_mnist_mlp.model.options.widht", "width")


def test_unknown_init(params):
    params["experiments"]["A2_mnist_mlp"]["model"]["options"]["init"] = "kaiming"
    expect(params, "experiments.A2_mnist_mlp.model.options.init", "'kaiming'", "xavier_uniform")


def test_unknown_dataset(params):
    params["experiments"]["A1_mnist_lenet"]["dataset"] = "mnist2"
    expect(params, "experiments.A1_mnist_lenet.dataset", "'mnist2'", "mnist", "cifar10")


def test_dataset_not_prepared_by_pipeline(params):
    params["datasets"] = ["mnist"]
    expect(params, "experiments.A1_cifar10_lenet.dataset", "'cifar10'", "valid: mnist")


def test_unknown_dataset_in_datasets_list(params):
    params["datasets"].append("imagenet")
    expect(params, f"datasets[{len(params['datasets']) - 1}]", "'imagenet'", "cifar10")


def test_profile_in_params_is_refused_with_the_way_to_switch(params):
    params["profile"] = "cpu"
    expect(params, "profile", "'cpu'", "dvc repro pipelines/<profile>/dvc.yaml", "bpfree repro --profile")


def test_experiment_notes_cover_every_experiment_and_stay_out_of_params():
    from bpfree.config import experiment_notes
    params = load_params(REPO / "params.yaml")
    notes = experiment_notes()
    assert sorted(notes) == sorted(params["experiments"])
    assert all(text.strip() for text in notes.values())
    assert not any("notes" in exp for exp in params["experiments"].values())


def test_unknown_optimizer(params):
    params["experiments"]["A1_mnist_lenet"]["optimizer"]["name"] = "rmsprop"
    expect(params, "experiments.A1_mnist_lenet.optimizer.name", "'rmsprop'", "sgd", "adam")


@pytest.mark.parametrize("lr", [0, -0.1, 0.0])
def test_rule_lr_not_positive(params, lr):
    params["experiments"]["A2_mnist_mlp"]["rules"]["fa"]["lr"] = lr
    expect(params, "experiments.A2_mnist_mlp.rules.fa.lr", repr(lr), "> 0")


def test_optimizer_lr_negative(params):
    params["experiments"]["A1_cifar10_lenet"]["optimizer"]["lr"] = -1
    expect(params, "experiments.A1_cifar10_lenet.optimizer.lr", "-1")


def test_epochs_zero(params):
    params["experiments"]["A1_mnist_lenet"]["epochs"] = 0
    expect(params, "experiments.A1_mnist_lenet.epochs", "0", ">= 1")


def test_profile_epochs_zero(params):
    params["profiles"]["cpu"]["A2_mnist_mlp"]["epochs"] = 0
    expect(params, "profiles.cpu.A2_mnist_mlp.epochs", "0")


@pytest.mark.parametrize("key", ["batch_size", "seeds", "selection", "optimizer", "rules"])
def test_missing_key(params, key):
    del params["experiments"]["A2_mnist_mlp"][key]
    expect(params, f"experiments.A2_mnist_mlp.{key}", "missing")


def test_missing_top_level_key(params):
    del params["profiles"]
    expect(params, "params.profiles", "missing")


@pytest.mark.parametrize("key,value", [("batch_size", "64"), ("epochs", 2.5), ("epochs", True),
                                       ("seeds", 3), ("val_size", None)])
def test_wrong_types(params, key, value):
    params["experiments"]["A2_mnist_mlp"][key] = value
    expect(params, f"experiments.A2_mnist_mlp.{key}", repr(value))


def test_seed_list_entries_checked(params):
    params["experiments"]["A2_mnist_mlp"]["seeds"] = [1, "two"]
    expect(params, "experiments.A2_mnist_mlp.seeds[1]", "'two'")


def test_unknown_experiment_key(params):
    params["experiments"]["A2_mnist_mlp"]["epoch"] = 3
    expect(params, "experiments.A2_mnist_mlp.epoch", "unknown key", "epochs")


def test_unknown_profile_key(params):
    params["profiles"]["smoke"]["A2_mnist_mlp"]["lr"] = 0.1
    expect(params, "profiles.smoke.A2_mnist_mlp.lr", "unknown profile key", "epochs", "threads")


def test_profile_must_cover_every_experiment(params):
    del params["profiles"]["gpu"]["A2_mnist_mlp"]
    expect(params, "profiles.gpu.A2_mnist_mlp", "every experiment")


def test_profile_unknown_experiment(params):
    params["profiles"]["gpu"]["A9_nothing"] = {}
    expect(params, "profiles.gpu.A9_nothing", "A1_mnist_lenet")


def test_profile_unknown_device(params):
    params["profiles"]["gpu"]["A2_mnist_mlp"]["device"] = "tpu"
    expect(params, "profiles.gpu.A2_mnist_mlp.device", "'tpu'", "cuda")


def test_unknown_rule_option(params):
    params["experiments"]["A2_mnist_mlp"]["rules"]["kp"]["options"]["lambda"] = 0.9
    expect(params, "experiments.A2_mnist_mlp.rules.kp.options.lambda", "decay")


def test_rule_rejects_option_value(params):
    # A negative KP decay is meaningless: the rule's own check must fire at config time.
    params["experiments"]["A2_mnist_mlp"]["rules"]["kp"]["options"]["decay"] = -0.1
    expect(params, "experiments.A2_mnist_mlp.rules.kp.options", "decay")


def test_unknown_schedule(params):
    params["experiments"]["A1_mnist_lenet"]["schedule"]["name"] = "cosine"
    expect(params, "experiments.A1_mnist_lenet.schedule.name", "'cosine'", "multistep", "none")


def test_milestones_not_increasing(params):
    params["experiments"]["A1_mnist_lenet"]["schedule"]["milestones"] = [75, 50]
    expect(params, "experiments.A1_mnist_lenet.schedule.milestones", "[75, 50]", "increasing")


def test_profile_milestones_beyond_epochs(params):
    params["profiles"]["cpu"]["A1_cifar10_lenet"]["milestones"] = [4, 50]
    expect(params, "profiles.cpu.A1_cifar10_lenet.milestones", "[4, 50]", "beyond")


def test_best_val_needs_validation_split(params):
    params["experiments"]["A2_mnist_mlp"]["selection"] = "best_val"
    expect(params, "profiles.smoke.A2_mnist_mlp.val_size", "best_val")


def test_unknown_selection(params):
    params["experiments"]["A2_mnist_mlp"]["selection"] = "best_test"
    expect(params, "experiments.A2_mnist_mlp.selection", "'best_test'", "best_val", "final")


def test_nesterov_needs_momentum(params):
    params["experiments"]["A2_mnist_mlp"]["optimizer"]["nesterov"] = True
    expect(params, "experiments.A2_mnist_mlp.optimizer.nesterov", "momentum")


def test_adam_rejects_momentum(params):
    params["experiments"]["A2_mnist_mlp"]["optimizer"].update(name="adam", momentum=0.9)
    expect(params, "experiments.A2_mnist_mlp.optimizer.momentum", "betas")


def test_val_size_must_fit_subset(params):
    params["profiles"]["smoke"]["A1_mnist_lenet"]["val_size"] = 600
    expect(params, "profiles.smoke.A1_mnist_lenet.val_size", "600", "train_subset")


def test_rule_lr_override_and_hash():
    params = load_params(REPO / "params.yaml")
    runs = {r["run_id"]: r for r in run_configs(params, "A2_mnist_mlp", "cpu")}
    assert runs["wm_seed1111"]["optimizer"]["lr"] == 0.05
    assert runs["kp_seed1111"]["rule"]["options"] == {"init": "normal_fan_sum", "decay": 0.0}  # the reference code's reported run
    a, b = runs["bp_seed1111"], copy.deepcopy(runs["bp_seed1111"])
    assert config_hash(a, "d") == config_hash(b, "d")
    b["notes"] = "edited prose"  # prose does not change what a run computes
    assert config_hash(a, "d") == config_hash(b, "d")
    b["optimizer"]["lr"] = 0.3
    assert config_hash(a, "d") != config_hash(b, "d")
    assert config_hash(a, "d") != config_hash(a, "other-data")


def test_profile_marks_shortened_protocol():
    params = load_params(REPO / "params.yaml")
    assert resolve_experiment(params, "A1_mnist_lenet", "gpu")["shortened"] is False
    assert resolve_experiment(params, "A1_mnist_lenet", "cpu")["shortened"] is False  # the full protocol
    cpu = resolve_experiment(params, "A1_cifar10_lenet", "cpu")
    assert cpu["shortened"] and any("epochs" in d for d in cpu["deviations"])


def test_stage_reports_config_error_in_one_line(tmp_path, params):
    """A stage given a bad params.yaml exits non-zero with one line, no traceback."""
    params["experiments"]["A2_mnist_mlp"]["rules"]["fa"]["lr"] = -0.2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.train", "A2_mnist_mlp"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "experiments.A2_mnist_mlp.rules.fa.lr" in lines[0] and "-0.2" in lines[0]
    assert not (tmp_path / "results").exists()


def test_stage_unknown_experiment(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.train", "A3_nope"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "A3_nope" in proc.stderr and "A2_mnist_mlp" in proc.stderr


def test_data_variants_name_a_pinned_release_for_every_prepared_dataset(params):
    bad = copy.deepcopy(params)
    del bad["data_variants"]["cifar10"]
    expect(bad, "data_variants.cifar10", "official", "reconstructed-shared")
    bad = copy.deepcopy(params)
    bad["data_variants"]["cifar10"] = "mine"
    expect(bad, "data_variants.cifar10", "'mine'", "reconstructed-shared")


@pytest.mark.parametrize("key, value, message", [
    ("mean", "0.5", "one per channel"), ("mean", [], "one per channel"),
    ("std", [0.0], "> 0"), ("std", [float("nan")], "one per channel"),
])
def test_fixed_normalisation_constants_are_checked(params, key, value, message):
    params["experiments"]["E4_mnist_step_lenet"]["preprocess"][key] = value
    expect(params, f"experiments.E4_mnist_step_lenet.preprocess.{key}", message)


@pytest.mark.parametrize("text, fragments", [
    ("datasets: [mnist]\ndatasets: [cifar10]\n", ["duplicate key 'datasets'", "params.yaml", "line 2"]),
    ("experiments: {A: [1, 2}\n", ["not valid YAML", "params.yaml", "line 1"]),
])
def test_yaml_problems_name_the_file_and_line(tmp_path, text, fragments):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert "\n" not in msg and "<unicode string>" not in msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_merge_keys_share_a_block_and_the_own_keys_win(tmp_path):
    """params.yaml writes a sibling experiment as `<<: *base` plus what differs."""
    path = tmp_path / "p.yaml"
    path.write_text("a: &base {x: 1, y: {z: 2}}\nb:\n  <<: *base\n  x: 3\n")
    tree = load_yaml(path)
    assert tree == {"a": {"x": 1, "y": {"z": 2}}, "b": {"x": 3, "y": {"z": 2}}}
    tree["b"]["y"]["z"] = 9  # an edit to one block must not reach the other
    assert tree["a"]["y"]["z"] == 2
    path.write_text("a: &base {x: 1}\nb:\n  <<: *base\n  x: 3\n  x: 4\n")
    with pytest.raises(ConfigError, match="duplicate key 'x'"):
        load_yaml(path)
    # a block that itself merges and overrides, merged before it is read: still valid YAML
    path.write_text("x: {deep: {a: &a {<<: &b {k: 1}, k: 2}}}\ny: {<<: *a}\n")
    assert load_yaml(path) == {"x": {"deep": {"a": {"k": 2}}}, "y": {"k": 2}}
    path.write_text("a: [{k: 1, k: 2}]\n")  # inside a list too
    with pytest.raises(ConfigError, match="duplicate key 'k'"):
        load_yaml(path)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_learning_rate_must_be_finite(params, value):
    """YAML's .inf passed as a positive number and was stored as null."""
    params["experiments"]["A2_mnist_mlp"]["rules"]["fa"]["lr"] = value
    expect(params, "experiments.A2_mnist_mlp.rules.fa.lr")


def test_a_rule_may_bring_its_own_batch_and_an_lr_per_sweep_value():
    """The BackMAN authors train BackMAN at batch 64 where BP uses 512 (C1), and give one lr
    per depth (C2); a profile's own batch (a small smoke set) still wins."""
    from bpfree.config import load_params, run_configs
    params = load_params()
    runs = {r["run_id"]: r for r in run_configs(params, "C1_split_mnist", "gpu")}
    assert runs["bp_seed1"]["batch_size"] == 512 and runs["backman_seed1"]["batch_size"] == 64
    params["profiles"]["smoke"]["C1_split_mnist"]["batch_size"] = 128
    assert {r["batch_size"] for r in run_configs(params, "C1_split_mnist", "smoke")} == {128}
    lrs = {r["run_id"]: r["optimizer"]["lr"] for r in run_configs(load_params(), "C2_mnist_depth", "gpu")}
    assert lrs["backman_depth2_seed1"] == 0.05 and lrs["backman_depth6_seed1"] == 0.01
    assert lrs["backman_depth12_seed1"] == 0.002 and lrs["bp_depth12_seed1"] == 0.25


@pytest.mark.parametrize("profile", ["smoke", "cpu", "gpu"])
def test_committed_runs_keep_their_config_hash(profile, monkeypatch):
    """A params.yaml refactor (profile defaults, anchors) must not change what a run is: every
    run the committed summary counts recomputes, from today's params, the config hash its
    metrics.json was written with."""
    import json
    from bpfree.config import sweep_label
    from bpfree.layout import LAYOUT
    monkeypatch.chdir(REPO)  # tuned lrs are read from results/tuning
    summary = json.loads(LAYOUT.summary(profile).read_text())
    params = load_params()
    checked = 0
    for exp_id, entry in summary["experiments"].items():
        if entry.get("not_run"):  # this profile does not run it
            continue
        for run in run_configs(params, exp_id, profile):
            key = run["rule"]["name"]
            if run.get("sweep"):
                key = f"{key}@{sweep_label(run['sweep']['param'])}={run['sweep']['value']}"
            if entry["rules"].get(key, {}).get("status", {}).get(str(run["seed"])) in (None, "MISSING", "STALE"):
                continue
            metrics = json.loads(LAYOUT.metrics(profile, exp_id, run["run_id"]).read_text())
            assert config_hash(run, metrics["data"]["hash"]) == metrics["config_hash"], (exp_id, run["run_id"])
            checked += 1
    assert checked > 0
