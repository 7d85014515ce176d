"""Bad input ends in one line naming the problem and the fix, exit code 2, before any work,
with nothing written. One row per case: a reviewer extends this by adding a row.

Each row: (case, command line after `python`, text the error line must contain). `{tmp}`
stands for a fresh temporary folder; commands run from the repository root.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["-m", "stages.train", "A2_mnist_mlp", "--profile", "smoke", "--results", "{tmp}/results",
         "--checkpoints", "{tmp}/checkpoints"]

ROWS = [
    ("train: unknown experiment", ["-m", "bpfree.cli", "train", "Z9_nothing", "--profile", "smoke"], "Z9_nothing"),
    ("train: unknown rule", TRAIN + ["--rules", "zz"], "zz"),
    ("train: no run has that seed", TRAIN + ["--seeds", "99"], "99"),
    ("train: unknown profile", TRAIN[:3] + ["--profile", "laptop"] + TRAIN[5:], "laptop"),
    ("train: the results folder cannot be written", TRAIN[:5] + ["--results", "{tmp}/a-file"] + TRAIN[7:],
     "cannot write results"),
    ("claims: unknown profile", ["-m", "bpfree.cli", "claims", "--profile", "nosuch"], "unknown profile 'nosuch'"),
    ("claims: results folder absent", ["-m", "bpfree.cli", "claims", "--results", "{tmp}/nonexistent"], "not found"),
    ("claims: a truncated summary.json", ["-m", "bpfree.cli", "claims", "--results", "{tmp}/truncated"],
     "not valid JSON"),
    ("claims: no summary for the profile", ["-m", "bpfree.cli", "claims", "--profile", "gpu", "--results",
                                            "{tmp}/empty"], "nothing would be checked"),
    ("verify: unknown experiment", ["-m", "bpfree.cli", "verify", "--experiment", "Z9_nothing"], "Z9_nothing"),
    ("verify: unknown profile", ["-m", "bpfree.cli", "verify", "--profile", "laptop"], "laptop"),
    ("prepare: unknown dataset", ["-m", "stages.prepare", "imagenet22k"], "imagenet22k"),
    ("repro: unknown profile", ["-m", "bpfree.cli", "repro", "--profile", "tpu"], "unknown profile"),
]


def setup_folder(tmp: Path) -> None:
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "truncated" / "cpu").mkdir(parents=True)
    (tmp / "truncated" / "cpu" / "summary.json").write_text('{"experiments": {"A1_mnist_lenet": ')
    (tmp / "empty" / "cpu").mkdir(parents=True)
    (tmp / "empty" / "cpu" / "summary.json").write_text(json.dumps({"experiments": {}}))


@pytest.mark.parametrize("case,argv,fragment", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, argv, fragment, tmp_path):
    setup_folder(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_OFFLINE": "1", "BPFREE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, *[a.replace("{tmp}", str(tmp_path)) for a in argv]], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {proc.stderr[-2000:]}"
    assert fragment in lines[0], f"{case}: {lines[0]!r} lacks {fragment!r}"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, f"{case}: files were written"


# Cases that need an edited params.yaml and the prepared MNIST: (case, experiment, edit of the
# smoke profile's entry, text the error line must contain). The stage runs in a folder holding
# the edited params.yaml and a link to the prepared data.
PARAMS_ROWS = [
    ("a batch larger than the training set", "A2_mnist_mlp", {"batch_size": 4096}, "exceeds the 512 training images"),
    ("a negative width at a later sweep point", "B2_noisy_mnist_width", {"sweep_values": [15, -30]}, "width-30"),
    ("an LFNN leader fraction above 1 at a later sweep point", "D3_mnist_delta", {"sweep_values": [0.3, 1.5]},
     "delta"),
    ("a BackMAN alpha list that fits only the first depth", "C2_mnist_depth",
     {"experiments.C2_mnist_depth.rules.backman": {"lr": 0.005, "options": {"alpha": [1.0, 1.0, 1.0]}}},
     "depth4"),
    ("an lr per depth that misses a depth", "C2_mnist_depth",
     {"experiments.C2_mnist_depth.rules.backman": {"lr": {2: 0.05, 4: 0.01}}},
     "no lr for sweep value"),
]


@pytest.mark.parametrize("case,experiment,edit,fragment", PARAMS_ROWS, ids=[r[0] for r in PARAMS_ROWS])
def test_bad_run_settings_stop_before_the_first_run(case, experiment, edit, fragment, tmp_path, mnist_dir):
    import yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in edit.items():  # "a.b.c": a path from the top of params.yaml; else a smoke key
        *parents, last = key.split(".") if "." in key else ["profiles", "smoke", experiment, key]
        target = params
        for parent in parents:
            target = target[parent]
        target[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "mnist").symlink_to(mnist_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_OFFLINE": "1", "BPFREE_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "stages.train", experiment, "--profile", "smoke"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, f"{case}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {proc.stderr[-2000:]}"
    assert fragment in lines[0], f"{case}: {lines[0]!r} lacks {fragment!r}"
    assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists(), f"{case}: wrote files"
