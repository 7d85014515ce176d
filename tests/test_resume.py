"""Resuming a run from its per-epoch state ends with the numbers of an uninterrupted run.

The first test kills a real training process (SIGKILL, mid-epoch) and restarts it; the
others check, rule family by rule family, that every piece of state a later epoch reads is
saved, and that a file that does not belong to the run is never continued.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from bpfree import training
from bpfree.training import ResumeState, train_run
from tests.conftest import tiny_options
from tests.test_training import bert_run, mlp_run

REPO = Path(__file__).resolve().parents[1]
# Differ between an interrupted and an uninterrupted run by nature, not by a bug.
VOLATILE = {"wall_time_s", "mean_step_ms", "resumed_after_epochs", "checkpoint"}


def _same_numbers(a: dict, b: dict) -> None:
    keys = (set(a) | set(b)) - VOLATILE
    for key in sorted(keys):
        assert a.get(key) == b.get(key), key


# ----------------------------------------------------------------------------- killed process
def _stage_dir(root: Path, mnist_dir: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = ["mnist"]
    exp = params["experiments"]["A2_mnist_mlp"]
    # brSF: a private generator redrawn every batch; momentum and a milestone schedule: the
    # optimiser's and the scheduler's state; conservation diagnostics: the tracker's start.
    exp["rules"] = {"brsf": {"lr": 0.05}}
    exp["model"]["options"].update(width=32, activation="relu", bias=False)
    exp["optimizer"] = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    exp["schedule"] = {"name": "multistep", "milestones": [2], "gamma": 0.5}
    exp["batch_size"] = 16
    exp["diagnostics"] = {"every": 1, "batch": 64, "conservation": True}
    params["experiments"] = {"A2_mnist_mlp": exp}
    params["profiles"] = {"smoke": {"A2_mnist_mlp": {
        "epochs": 4, "seeds": [3], "train_subset": 6000, "test_subset": 256, "threads": 1, "device": "cpu"}}}
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "mnist").symlink_to(mnist_dir)
    return root


def _stage(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_PROGRESS": "0"}
    return subprocess.Popen([sys.executable, "-m", "stages.train", "A2_mnist_mlp", "--resume-every", "0"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_killed_run_restarts_from_its_last_epoch_with_identical_metrics(mnist_dir, tmp_path):
    killed = _stage_dir(tmp_path / "killed", mnist_dir)
    resume_file = killed / "checkpoints" / "smoke" / "A2_mnist_mlp" / "brsf_seed3.resume.pt"
    metrics_file = killed / "results" / "smoke" / "runs" / "A2_mnist_mlp" / "brsf_seed3" / "metrics.json"

    proc = _stage(killed)
    deadline = time.monotonic() + 120
    while not resume_file.exists():  # epoch 1 finished: the process is now inside epoch 2
        assert proc.poll() is None, "the run ended before its first epoch state was written:\n" + proc.stdout.read()
        assert time.monotonic() < deadline, "no resume state after 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not metrics_file.exists()
    saved_epoch = torch.load(resume_file, weights_only=True)["epoch"]  # loads without running code
    assert 1 <= saved_epoch < 4

    proc = _stage(killed)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert f"resumed after epoch {saved_epoch}" in out
    assert not resume_file.exists()  # removed once the metrics were written
    resumed = json.loads(metrics_file.read_text())
    assert resumed["resumed_after_epochs"] == [saved_epoch]

    whole = _stage_dir(tmp_path / "whole", mnist_dir)
    proc = _stage(whole)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    uninterrupted = json.loads((whole / metrics_file.relative_to(killed)).read_text())
    assert uninterrupted["resumed_after_epochs"] == []
    assert [d["epoch"] for d in resumed["diagnostics"]] == [0, 1, 2, 3, 4]
    _same_numbers(resumed, uninterrupted)
    weights = [torch.load(root / "checkpoints" / "smoke" / "A2_mnist_mlp" / "brsf_seed3.pt",
                          weights_only=True)["state_dict"] for root in (killed, whole)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# ----------------------------------------------------------------------------- every rule family
def _resumed_after_first_epoch(run, data, tmp_path, monkeypatch):
    """Run to the end, keeping the state saved after epoch 1; then continue from that copy."""
    copies = {}
    original_save = ResumeState.save

    def save(self, state):
        original_save(self, state)
        if state["epoch"] == 1:
            copies[1] = tmp_path / "after_epoch1.pt"
            copies[1].write_bytes(self.path.read_bytes())
    monkeypatch.setattr(ResumeState, "save", save)
    train_run(run, data, "cpu", resume_path=tmp_path / "state.pt")
    monkeypatch.setattr(ResumeState, "save", original_save)
    return train_run(run, data, "cpu", resume_path=copies[1])


RESUME_CASES = {
    "fa": {},
    "wm": {"seed": 5},           # seeded mirror draws: the rule's draw counter
    "kp": {},                    # trainable feedback in the optimiser
    "brsf": {},                  # private redraw generator
    "lfnn": {"workers": 2},      # read-out parameters
    "dfa": {},
    "lfp_ab": {},
}


@pytest.mark.parametrize("rule", sorted(RESUME_CASES))
def test_resume_matches_uninterrupted_for_every_family(mnist, rule, tmp_path, monkeypatch):
    run = mlp_run(rule={"name": rule, "options": {**tiny_options(rule), **RESUME_CASES[rule]}},
                  epochs=3, schedule={"name": "step", "step_size": 1, "gamma": 0.5},
                  optimizer={"name": "adam", "lr": 1e-3})
    uninterrupted = train_run(run, mnist, "cpu")
    resumed = _resumed_after_first_epoch(run, mnist, tmp_path, monkeypatch)
    assert resumed["resumed_after_epochs"] == [1]
    _same_numbers(resumed, uninterrupted)


def test_resume_with_augmentation_stream(tmp_path, monkeypatch):
    """Random crops and flips draw from their own generator; it continues exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (96,), generator=g)
    data = SimpleNamespace(x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:], num_classes=10,
                           mean=[0.5] * 3, std=[0.25] * 3, manifest={"outputs": {"synthetic": "0"}})
    run = mlp_run(dataset="synthetic", model={"name": "lenet_cifar", "options": {}}, train_subset=None,
                  test_subset=None, val_size=16, batch_size=16, epochs=3,
                  preprocess={"normalize": True, "resize": None, "crop_padding": 2, "flip": True})
    uninterrupted = train_run(run, data, "cpu")
    _same_numbers(_resumed_after_first_epoch(run, data, tmp_path, monkeypatch), uninterrupted)


@pytest.mark.parametrize("rule", ["bp", "dtp"])
def test_resume_with_dropout_stream(sick, rule, tmp_path, monkeypatch):
    """The transformer's dropout draws from the global stream; DTP's inverses are in the model."""
    run = bert_run(rule={"name": rule, "options": {}}, epochs=3)
    uninterrupted = train_run(run, sick, "cpu")
    _same_numbers(_resumed_after_first_epoch(run, sick, tmp_path, monkeypatch), uninterrupted)


def test_resume_file_of_another_run_is_not_continued(mnist, tmp_path):
    run = mlp_run(epochs=2)
    state = tmp_path / "state.pt"
    train_run(mlp_run(epochs=2, seed=1), mnist, "cpu", resume_path=state)  # leaves epoch-1 state
    assert state.is_file()
    messages = []
    m = train_run(run, mnist, "cpu", resume_path=state, log=messages.append)
    assert m["resumed_after_epochs"] == []
    assert any("another config, data or code" in msg for msg in messages)
    _same_numbers(m, train_run(run, mnist, "cpu"))


def test_corrupt_resume_file_starts_afresh(mnist, tmp_path):
    state = tmp_path / "state.pt"
    state.write_bytes(b"\x80\x02truncated")
    messages = []
    m = train_run(mlp_run(epochs=1), mnist, "cpu", resume_path=state, log=messages.append)
    assert m["status"] == training.STATUS_OK and m["resumed_after_epochs"] == []
    assert any("unreadable" in msg for msg in messages)


def test_resume_state_is_throttled_by_wall_time(mnist, tmp_path):
    state = tmp_path / "state.pt"
    train_run(mlp_run(epochs=3), mnist, "cpu", resume_path=state, resume_every_s=3600)
    assert not state.exists()  # no epoch ended an hour after the start
    train_run(mlp_run(epochs=3), mnist, "cpu", resume_path=state, resume_every_s=0)
    assert torch.load(state, weights_only=True)["epoch"] == 2  # the last epoch is never saved


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.update(epoch=7), "cannot continue"),            # an epoch the run does not have
    (lambda s: s.pop("history"), "lacks history"),               # a part missing
    (lambda s: s["history"].append({"epoch": 9}), "history does not end"),
])
def test_a_matching_resume_file_with_bad_contents_is_dropped(mnist, tmp_path, damage, message):
    """Fingerprint right, contents wrong: not continued (no run marked OK after fewer epochs, no
    KeyError on every retry), deleted, and the run trains all its epochs from the start."""
    run = mlp_run(epochs=3)
    state = tmp_path / "state.pt"
    train_run(run, mnist, "cpu", resume_path=state, resume_every_s=0)  # leaves the epoch-2 state
    saved = torch.load(state, weights_only=True)
    damage(saved)
    torch.save(saved, state)
    messages = []
    m = train_run(run, mnist, "cpu", resume_path=state, log=messages.append)
    assert m["resumed_after_epochs"] == [] and m["epochs_completed"] == 3
    assert any(message in msg and "deleted" in msg for msg in messages), messages
    _same_numbers(m, train_run(run, mnist, "cpu"))
