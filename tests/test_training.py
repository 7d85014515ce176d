"""The generic trainer on a few hundred real MNIST images: learning, divergence, resume, atomicity."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from bpfree import provenance
from bpfree.provenance import atomic_torch_save, atomic_write_json, atomic_write_text
from bpfree.training import (STATUS_DIVERGED, accuracy, device_splits, load_checkpoint_model,
                             train_run)

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BPFREE_DATA_DIR", REPO.parent / "shared" / "data"))


def mlp_run(**changes):
    run = {
        "dataset": "mnist", "data_seed": 0, "seed": 0, "threads": 1, "device": "cpu",
        "model": {"name": "mlp", "options": {"in_features": 784, "depth": 1, "width": 64}},
        "rule": {"name": "bp", "options": {}},
        "optimizer": {"name": "sgd", "lr": 0.03, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
        "schedule": {"name": "none"}, "batch_size": 32, "epochs": 3,
        "train_subset": 320, "test_subset": 200, "val_size": 64, "selection": "best_val",
        "preprocess": {"normalize": True, "resize": None}, "diagnostics": {"every": 0, "batch": 64},
    }
    for key, value in changes.items():
        run[key] = value
    return run


@pytest.mark.parametrize("rule", ["bp", "fa"])
def test_loss_decreases_on_real_mnist(mnist, rule):
    m = train_run(mlp_run(rule={"name": rule, "options": {}}), mnist, "cpu")
    losses = [h["train_loss"] for h in m["history"]]
    assert m["status"] == "OK" and len(losses) == 3
    assert losses[-1] < 0.8 * losses[0], losses
    assert m["final_test_acc"] > 40.0  # chance is 10 %
    assert m["sizes"] == {"train": 256, "val": 64, "test": 200}


def test_same_seed_same_numbers_other_seed_differs(mnist):
    a = train_run(mlp_run(epochs=1), mnist, "cpu")
    b = train_run(mlp_run(epochs=1), mnist, "cpu")
    c = train_run(mlp_run(epochs=1, seed=1), mnist, "cpu")
    assert a["history"] == b["history"]
    assert a["history"][0]["train_loss"] != c["history"][0]["train_loss"]


def test_validation_split_comes_from_training_images(mnist):
    run = mlp_run()
    images = device_splits(mnist, run, torch.device("cpu"))
    train_rows = {bytes(x.flatten().tolist()) for x in mnist.x_train[:]}  # 60k rows: fine on CPU
    assert all(bytes(x.flatten().tolist()) in train_rows for x in images.x_val)
    # train and val are disjoint
    tr = {bytes(x.flatten().tolist()) for x in images.x_train}
    assert not any(bytes(x.flatten().tolist()) in tr for x in images.x_val)


def test_lenet_resize_and_schedule_per_epoch(mnist):
    run = mlp_run(model={"name": "lenet_mnist", "options": {}}, epochs=3,
                  preprocess={"normalize": True, "resize": 32},
                  schedule={"name": "multistep", "milestones": [1, 2], "gamma": 0.1},
                  train_subset=128, val_size=32)
    images = device_splits(mnist, run, torch.device("cpu"))
    assert images.x_train.shape[1:] == (1, 32, 32)
    m = train_run(run, mnist, "cpu")
    assert [h["lr"] for h in m["history"]] == pytest.approx([0.03, 0.003, 0.0003])


def test_selection_records_all_three_numbers(mnist):
    m = train_run(mlp_run(epochs=3), mnist, "cpu")
    hist = m["history"]
    best_val = max(hist, key=lambda h: (h["val_acc"], -h["epoch"]))
    assert m["selected_epoch"] == best_val["epoch"]
    assert m["selected_test_acc"] == best_val["test_acc"]
    assert m["final_test_acc"] == hist[-1]["test_acc"]
    assert m["best_test_acc_test_selected"] == max(h["test_acc"] for h in hist)


def test_nan_run_is_recorded_as_diverged(mnist, tmp_path):
    run = mlp_run(optimizer={"name": "sgd", "lr": 1e38, "momentum": 0.9, "weight_decay": 0.0,
                             "nesterov": False}, epochs=3)
    m = train_run(run, mnist, "cpu", checkpoint_path=tmp_path / "ck.pt")
    assert m["status"] == STATUS_DIVERGED
    assert m["diverged_epoch"] is not None and m["epochs_completed"] == m["diverged_epoch"] - 1
    assert not (tmp_path / "ck.pt").exists()
    json.dumps(m, allow_nan=False)  # strict JSON, so DVC and other readers accept it


def test_checkpoint_reproduces_final_accuracy(mnist, tmp_path):
    run = mlp_run(rule={"name": "kp", "options": {}}, epochs=1)
    m = train_run(run, mnist, "cpu", checkpoint_path=tmp_path / "kp.pt")
    images = device_splits(mnist, run, torch.device("cpu"))
    model = load_checkpoint_model(tmp_path / "kp.pt", run, images, "cpu")
    assert accuracy(model, images, images.x_test, images.y_test) == m["final_test_acc"]


def test_provenance_recorded(mnist):
    m = train_run(mlp_run(epochs=1), mnist, "cpu")
    assert m["data"]["variant"] == "official" and len(m["data"]["hash"]) == 16
    assert {"python", "torch", "torchvision", "device", "device_name", "packages"} <= set(m["environment"])
    assert m["environment"]["packages"]["numpy"] and m["environment"]["packages"]["tokenizers"]
    assert set(m["git"]) == {"commit", "dirty"}
    assert m["config"]["seed"] == 0 and m["mean_step_ms"] > 0


def test_diagnostics_logged_when_enabled(mnist):
    m = train_run(mlp_run(rule={"name": "fa", "options": {}}, epochs=2,
                          diagnostics={"every": 1, "batch": 64}), mnist, "cpu")
    assert [d["epoch"] for d in m["diagnostics"]] == [0, 1, 2]
    assert set(m["diagnostics"][0]["weight_feedback_angle_deg"]) == {"fc1", "classifier"}


# ----------------------------------------------------------------------------- stage: resume
def _tiny_params():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["mnist"]
    exp = params["experiments"]["A2_mnist_mlp"]
    exp["rules"] = {"bp": {"lr": 0.2}, "fa": {"lr": 0.2}}
    exp["model"]["options"]["width"] = 32
    params["experiments"] = {"A2_mnist_mlp": exp}
    params["profiles"] = {"smoke": {"A2_mnist_mlp": {"epochs": 1, "seeds": [1111], "train_subset": 128, "test_subset": 64,
                                                     "threads": 1, "device": "cpu"}}}
    return params


def test_train_stage_skips_finished_runs(mnist_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(REPO))  # stages/ is not an installed package
    import stages.train as stage
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "mnist").symlink_to(mnist_dir)
    params = _tiny_params()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    runs = tmp_path / "results" / "smoke" / "runs" / "A2_mnist_mlp"

    assert stage.main(["A2_mnist_mlp"]) == 0
    first = {p.parent.name: p.read_text() for p in runs.glob("*/metrics.json")}
    assert set(first) == {"bp_seed1111", "fa_seed1111"}
    assert (tmp_path / "checkpoints" / "smoke" / "A2_mnist_mlp" / "bp_seed1111.pt").is_file()
    capsys.readouterr()

    assert stage.main(["A2_mnist_mlp"]) == 0  # nothing changed: both skipped, files untouched
    out = capsys.readouterr().out
    assert out.count("skipped") == 2
    assert {p.parent.name: p.read_text() for p in runs.glob("*/metrics.json")} == first

    import bpfree.training
    monkeypatch.setattr(bpfree.training, "code_hash", lambda: "edited-rule")  # code changed: redo
    assert stage.main(["A2_mnist_mlp"]) == 0
    assert capsys.readouterr().out.count("code changed since it ran") == 2
    assert json.loads((runs / "bp_seed1111" / "metrics.json").read_text())["code_hash"] == "edited-rule"

    params["experiments"]["A2_mnist_mlp"]["rules"]["fa"]["lr"] = 0.1  # only fa's config changes
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (runs / "bp_seed1111" / "metrics.json").write_text('{"config_hash": "trunc')  # corrupt: redo
    assert stage.main(["A2_mnist_mlp"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 0 and out.count("training") == 2
    fa = json.loads((runs / "fa_seed1111" / "metrics.json").read_text())
    assert fa["config"]["optimizer"]["lr"] == 0.1


# ----------------------------------------------------------------------------- atomic writes
class Boom(RuntimeError):
    pass


def _only(path: Path):
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_write_interrupted_leaves_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"v": 1})

    real_open = open

    def exploding_open(file, mode="r", *a, **k):
        fh = real_open(file, mode, *a, **k)
        if "w" in mode and str(file).endswith(".tmp"):
            orig = fh.write

            def write(text):
                orig(text[: len(text) // 2])  # half the file reaches the disk, then we die
                fh.flush()
                raise Boom("killed mid-write")
            fh.write = write
        return fh

    monkeypatch.setattr("builtins.open", exploding_open)
    with pytest.raises(Boom):
        atomic_write_json(target, {"v": 2, "long": "x" * 1000})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"v": 1}
    assert _only(target) == ["metrics.json"]  # no temp file left behind


def test_atomic_write_new_file_interrupted_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "metrics.json"
    monkeypatch.setattr(provenance.os, "replace", lambda *a: (_ for _ in ()).throw(Boom("power cut")))
    with pytest.raises(Boom):
        atomic_write_text(target, "complete text")
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_atomic_json_unserialisable_touches_nothing(tmp_path):
    target = tmp_path / "m.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True} and _only(target) == ["m.json"]


def test_atomic_torch_save_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "ck.pt"
    atomic_torch_save(target, {"w": torch.ones(2)})

    def partial_save(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 truncated")
        raise Boom("killed mid-save")

    monkeypatch.setattr(torch, "save", partial_save)
    with pytest.raises(Boom):
        atomic_torch_save(target, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))
    assert _only(target) == ["ck.pt"]


def bert_run(**changes):
    run = mlp_run(dataset="sick", model={"name": "bert_classifier", "options": {
        "dim": 16, "depth": 2, "heads": 2, "ffn_dim": 32, "max_len": 32, "dropout": 0.0}},
        optimizer={"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, train_subset=96, test_subset=64,
        val_size=32, epochs=2, preprocess={"normalize": False, "resize": None})
    run.update(changes)
    return run


@pytest.mark.parametrize("rule", ["bp", "dtp", "lra"])
def test_sentence_pairs_train_through_the_same_loop(sick, rule, tmp_path):
    run = bert_run(rule={"name": rule, "options": {}})
    m = train_run(run, sick, "cpu", checkpoint_path=tmp_path / "bert.pt")
    assert m["status"] == "OK" and m["epochs_completed"] == 2
    assert m["sizes"] == {"train": 64, "val": 32, "test": 64}
    assert m["train_data_draw"] == {"kind": "text", "test_split": "test", "max_len": 32}
    splits = device_splits(sick, run, torch.device("cpu"))
    assert splits.x_train.shape[1] == 3 and splits.x_train.shape[2] <= 32
    assert splits.vocab_size == sick.tokenizer.get_vocab_size()
    model = load_checkpoint_model(tmp_path / "bert.pt", run, splits, "cpu")  # feedback maps dropped
    assert accuracy(model, splits, splits.x_test, splits.y_test) == m["final_test_acc"]


def test_text_run_rejects_a_vocabulary_that_is_not_the_tokenizers(sick):
    run = bert_run()
    run["model"]["options"]["vocab_size"] = 100
    with pytest.raises(ValueError, match="vocab_size 100"):
        train_run(run, sick, "cpu")


def test_fixed_normalisation_constants(mnist):
    """preprocess mean / std replace the training set's statistics (the LFP notebook's
    Normalize(0.5, 0.5)); a count that does not match the channels is refused before training."""
    splits = device_splits(mnist, mlp_run(preprocess={"normalize": True, "resize": None, "mean": [0.5], "std": [0.5]}), "cpu")
    x = splits.x_train[:5]
    torch.testing.assert_close(splits.prepare(x), x.float() / 255 * 2 - 1)
    with pytest.raises(ValueError, match="preprocess.mean: 3 values for 1-channel"):
        device_splits(mnist, mlp_run(preprocess={"normalize": True, "resize": None, "mean": [0.5, 0.5, 0.5], "std": [1.0]}), "cpu")


@pytest.mark.parametrize("losses, diverged, unstable", [
    ([2.3, 0.5, 0.1], None, None),            # a healthy run
    ([1.0, 50.0, 0.5], None, 2),              # spiked 50x and came back: unstable, counted
    ([1.0, 200.0, 0.5], 2, None),             # 200x: diverged, recovery does not undo it
    ([150.0, 3e4, 2e4], 1, None),             # above 100 nats from the first epoch (A1 DFA 2022)
    ([2.3, float("nan")], 2, None),
])
def test_divergence_rule(losses, diverged, unstable):
    from bpfree.training import loss_instability
    found = loss_instability(list(range(1, len(losses) + 1)), losses)
    assert (found["diverged_epoch"], found["unstable_epoch"]) == (diverged, unstable)


def test_a_recorded_explosion_is_diverged_at_evaluation():
    """Committed runs are judged by the rule from their recorded losses, whatever their status
    says; task-sequence runs task by task."""
    from bpfree.summary import recorded_stability
    curves = {"epoch": [1, 10, 20], "train_loss": [0.3, 4e4, 0.1]}
    assert recorded_stability({"curves": curves, "history": []})["diverged_epoch"] == 10
    tasks = [{"task": 1, "epoch": 1, "train_loss": 0.5}, {"task": 2, "epoch": 1, "train_loss": 2.0},
             {"task": 2, "epoch": 2, "train_loss": 0.4}]
    assert recorded_stability({"history": tasks})["diverged_epoch"] is None  # 2.0 is task 2's start


def test_training_stops_when_the_loss_explodes(mnist):
    run = mlp_run(optimizer={"name": "sgd", "lr": 40.0, "momentum": 0.9, "weight_decay": 0.0,
                             "nesterov": False}, epochs=4)
    m = train_run(run, mnist, "cpu")
    assert m["status"] == STATUS_DIVERGED and m["epochs_completed"] < 4
