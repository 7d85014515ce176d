"""Regression check: a fresh `dvc repro` of the smoke profile reproduces the committed smoke metrics.

Why a full copy and a real `dvc repro`: this is what a user runs; it catches a changed rule,
model, data preparation, trainer, dvc.yaml or params.yaml, any of which would silently move
every published number. Timings are not compared; losses and accuracies are, to 1e-5.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BPFREE_DATA_DIR", REPO.parent / "shared" / "data"))
REL_TOL = 1e-5
# Recomputed by the run under test, so never copied from the working tree.
EXCLUDED = ("data/", "checkpoints/", ".venv/", "results/smoke/", "results/tables/", "results/README.md",
            "results/figures/")
COMPARED = ("status", "diverged_epoch", "epochs_completed", "sizes", "selection", "selected_epoch",
            "selected_test_acc", "final_test_acc", "best_test_epoch", "best_test_acc_test_selected",
            "config_hash", "history", "curves", "train_data_draw", "diagnostics")


def working_tree_files() -> list[str]:
    """Tracked files plus untracked files that git does not ignore (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and not f.startswith(EXCLUDED)
                   and (REPO / f).is_file()})


def committed_smoke_metrics(root: Path) -> dict[str, dict]:
    base = root / "results" / "smoke" / "runs"
    return {p.relative_to(base).parent.as_posix(): json.loads(p.read_text())
            for p in sorted(base.glob("*/*/metrics.json"))}


def assert_close(expected, actual, where: str):
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(expected) == set(actual), f"{where}: keys differ"
        for k in expected:
            assert_close(expected[k], actual[k], f"{where}.{k}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(expected) == len(actual), f"{where}: lengths differ"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_close(e, a, f"{where}[{i}]")
    elif isinstance(expected, float) or isinstance(actual, float):
        assert actual is not None and math.isclose(expected, actual, rel_tol=REL_TOL, abs_tol=1e-12), \
            f"{where}: committed {expected!r}, reproduced {actual!r}"
    else:
        assert expected == actual, f"{where}: committed {expected!r}, reproduced {actual!r}"


def test_smoke_pipeline_reproduces_committed_metrics(tmp_path):
    needed = [DATA_DIR / "MNIST" / "raw", DATA_DIR / "cifar-10-batches-py"]
    if not all(p.exists() for p in needed):
        pytest.skip(f"raw data absent under {DATA_DIR} (set BPFREE_DATA_DIR); needs {needed}")
    expected = committed_smoke_metrics(REPO)
    assert expected, "no committed results/smoke/runs/*/*/metrics.json: run `dvc repro` and commit them"

    work = tmp_path / "repo"
    for rel in working_tree_files():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, work / rel)
    assert (work / "dvc.yaml").is_file() and (work / ".dvc" / "config").is_file()
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)

    env = {**os.environ, "BPFREE_DATA_DIR": str(DATA_DIR), "PYTHONPATH": str(work), "BPFREE_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    reproduced = committed_smoke_metrics(work)
    assert sorted(reproduced) == sorted(expected), "the smoke profile's set of runs changed"
    for run_id, exp in expected.items():
        got = reproduced[run_id]
        for key in COMPARED:
            assert_close(exp.get(key), got.get(key), f"{run_id}:{key}")

    assert (work / "results" / "smoke" / "summary.json").is_file()
    from bpfree.claims import load_registry
    papers, _ = load_registry(work / "bpfree" / "claims.yaml")
    for paper in papers:
        assert (work / "results" / "tables" / f"{paper}.md").is_file()
    assert "## Verdicts per paper" in (work / "results" / "README.md").read_text()
    # Datasets absent offline are recorded, and the experiments needing them show NOT RUN.
    for dataset in ("cifar100", "tiny_imagenet"):
        if not (DATA_DIR / {"cifar100": "cifar-100-python", "tiny_imagenet": "tiny-imagenet-200"}[dataset]).exists():
            assert (work / "data" / "prepared" / dataset / "MISSING.json").is_file()
    summary = json.loads((work / "results" / "smoke" / "summary.json").read_text())
    assert summary["experiments"]["B5_cifar100_lenet_k"]["not_run"].startswith("gpu profile only")

    # The learning curves are DVC plots: `dvc plots show` renders every one without an error.
    curves = sorted((work / "results" / "smoke" / "learning_curves").glob("*/*.csv"))
    assert work / "results" / "smoke" / "learning_curves" / "A2_mnist_mlp" / "bp.csv" in curves
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shown = json.loads(proc.stdout)
    assert not shown.get("errors") and len(shown["data"]) == len(curves)


def test_missing_optional_data_is_recorded_and_its_experiment_not_run(tmp_path):
    """An optional dataset without files: prepare records why, train writes NOT RUN, exit 0."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_DATA_DIR": str(tmp_path / "nothing-here"),
           "BPFREE_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "cifar100", "--optional"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    missing = json.loads((tmp_path / "data" / "prepared" / "cifar100" / "MISSING.json").read_text())
    assert str(tmp_path / "nothing-here") in missing["message"]
    proc = subprocess.run([sys.executable, "-m", "stages.train", "B5_cifar100_lenet_k", "--profile", "gpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "NOT RUN" in proc.stdout and "cifar-100-python" in proc.stdout
    not_run = json.loads((tmp_path / "results" / "gpu" / "runs" / "B5_cifar100_lenet_k" / "NOT_RUN.json").read_text())
    assert not_run["reason"].startswith("data missing:")
    # Without --optional the same absence is an error (exit 2, one clear message).
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "cifar100"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_stage_reports_missing_data_without_traceback(tmp_path):
    """Missing raw data is a user error: the stage says where it looked and exits 2."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_DATA_DIR": str(tmp_path / "nothing-here")}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "mnist"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert str(tmp_path / "nothing-here") in proc.stderr
    assert not (tmp_path / "data" / "prepared" / "mnist" / "manifest.json").exists()


def test_learning_curves_average_seeds_and_read_compact_curves(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    from stages.evaluate import mean_learning_curve, write_learning_curves
    full = {"history": [{"epoch": 1, "train_loss": 2.0, "test_acc": 50.0},
                        {"epoch": 2, "train_loss": 1.0, "test_acc": 70.0}]}
    compact = {"history": [{"epoch": 2}], "curves": {"epoch": [1, 2], "train_loss": [4.0, 3.0],
                                                      "test_acc": [60.0, 80.0]}}
    rows = mean_learning_curve([full, compact])
    assert rows == [{"epoch": 1, "train_loss": 3.0, "test_acc": 55.0, "n_seeds": 2},
                    {"epoch": 2, "train_loss": 2.0, "test_acc": 75.0, "n_seeds": 2}]
    out = tmp_path / "learning_curves"
    (out / "stale").mkdir(parents=True)
    (out / "stale" / "gone.csv").write_text("epoch,test_acc\n")
    assert write_learning_curves({"A2": {"bp": rows}}, out) == 1
    assert (out / "A2" / "bp.csv").read_text().splitlines() == [
        "epoch,train_loss,test_acc,n_seeds", "1,3.0,55.0,2", "2,2.0,75.0,2"]
    assert not (out / "stale").exists()  # curves of runs that no longer exist do not linger


def test_dvc_plots_definition_points_at_the_learning_curves():
    import yaml
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    (plot,) = stage["plots"]
    assert plot == {"results/${profile}/learning_curves": {
        "cache": False, "x": "epoch", "y": "test_acc", "x_label": "epoch",
        "y_label": "test accuracy % (mean over seeds)"}}
