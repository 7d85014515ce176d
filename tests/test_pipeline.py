"""Regression check: a fresh clone's `dvc repro` re-trains the smoke profile and reproduces the
committed smoke metrics, on other CPU kernels too, and a one-line rule change is caught.

Why a full copy and a real `dvc repro`: this is what a user runs; it catches a changed rule,
model, data preparation, trainer, dvc.yaml or params.yaml, any of which would silently move
every published number. Re-trained runs are compared by bpfree.verify's per-quantity rule
(images for accuracies, degrees for angles, relative for losses), not bit for bit: the
committed metrics come from an AVX-512 machine, and CI may run on an AVX2-only one. The
copies run with torch's, oneDNN's and MKL's kernels forced to narrower vector widths, so
this machine shows what another CPU would compute.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BPFREE_DATA_DIR", REPO.parent / "shared" / "data"))
# Never copied from the working tree: what a fresh clone lacks (and results the run rewrites).
EXCLUDED = ("data/", "checkpoints/", ".venv/")
# Kernel switches: torch's own (ATEN_CPU_CAPABILITY), oneDNN's (convolutions), MKL's (matmuls).
PLAIN_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
AVX2_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def working_tree_files() -> list[str]:
    """Tracked files plus untracked files that git does not ignore (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and not f.startswith(EXCLUDED) and (REPO / f).is_file()})


def fresh_clone(dest: Path) -> Path:
    """A git repository holding the working tree as one commit, as a user's clone would."""
    for rel in working_tree_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "clone"], cwd=dest, check=True)
    return dest


def env_for(work: Path, kernels: dict | None = None) -> dict:
    return {**os.environ, **(kernels or {}), "BPFREE_DATA_DIR": str(DATA_DIR), "PYTHONPATH": str(work),
            "BPFREE_OFFLINE": "1", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def committed_smoke_runs(root: Path) -> list[str]:
    base = root / "results" / "smoke" / "runs"
    return sorted(p.relative_to(base).parent.as_posix() for p in base.glob("*/*/metrics.json"))


def need_data():
    needed = [DATA_DIR / "MNIST" / "raw", DATA_DIR / "cifar-10-batches-py"]
    if not all(p.exists() for p in needed):
        pytest.skip(f"raw data absent under {DATA_DIR} (set BPFREE_DATA_DIR); needs {needed}")


def test_fresh_clone_dvc_repro_retrains_and_reproduces_on_plain_kernels(tmp_path):
    need_data()
    expected = committed_smoke_runs(REPO)
    assert expected, "no committed results/smoke/runs/*/*/metrics.json: run `dvc repro` and commit them"
    work = fresh_clone(tmp_path / "repo")
    env = env_for(work, PLAIN_KERNELS)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=1500)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc repro failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    # Every committed run was re-trained here (a fresh clone has not trained it) and reproduced.
    assert "DIFFERS" not in log, "\n".join(line for line in log.splitlines() if "DIFFERS" in line)
    verified = re.findall(r"^  (\S+): reproduced the committed metrics", log, flags=re.M)
    assert len(verified) == len(expected), f"{len(verified)} of {len(expected)} runs re-trained and reproduced"
    # Nothing but real differences: the committed files, dvc.lock included, are untouched.
    status = subprocess.run(["git", "status", "--porcelain"], cwd=work, capture_output=True, text=True).stdout
    assert status == "", f"dvc repro changed committed files:\n{status}"
    # Re-running is a no-op: one line per stage, nothing trained, `dvc status` clean.
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Running stage" not in proc.stdout, proc.stdout[-3000:]
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "dvc.yaml"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stdout[-3000:]

    from bpfree.claims import load_registry
    papers, _ = load_registry(work / "bpfree" / "claims.yaml")
    for paper in papers:
        assert (work / "results" / "tables" / f"{paper}.md").is_file()
    assert "## Verdicts per paper" in (work / "results" / "README.md").read_text()
    summary = json.loads((work / "results" / "smoke" / "summary.json").read_text())
    assert summary["experiments"]["B5_cifar100_lenet_k"]["not_run"].startswith("gpu profile only")

    # DVC-native outputs: metrics per profile, and the learning curves as plots.
    proc = subprocess.run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "A1-mnist-lenet-error" in proc.stdout and "results/metrics/cpu.json" in proc.stdout
    overlays = sorted((work / "results" / "smoke" / "plots").glob("*.csv"))
    assert work / "results" / "smoke" / "plots" / "A2_mnist_mlp.csv" in overlays
    proc = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=work,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    shown = json.loads(proc.stdout)
    assert not shown.get("errors"), shown.get("errors")
    assert {f"results/smoke/plots/{p.name}" for p in overlays} <= set(shown["data"])


def test_verify_reproduces_every_smoke_run_on_avx2_kernels(tmp_path):
    need_data()
    work = fresh_clone(tmp_path / "repo")
    proc = subprocess.run([sys.executable, "-m", "bpfree.cli", "verify", "--profile", "smoke"], cwd=work,
                          env=env_for(work, AVX2_KERNELS), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    n = len(committed_smoke_runs(REPO))
    assert sum(line.endswith(": reproduced") for line in lines) == n, proc.stdout[-4000:]
    assert lines[-1].startswith(f"{n} reproduced, 0 differ")


def test_verify_catches_a_one_line_rule_change(tmp_path):
    """FA's backward sending the error through W instead of B (BP in disguise) must fail."""
    need_data()
    work = fresh_clone(tmp_path / "repo")
    source = work / "bpfree" / "rules" / "functional.py"
    text = source.read_text()
    line = "grad_x = (grad_out @ feedback.to(grad_out.dtype)).to(x.dtype)"
    assert text.count(line) == 1
    source.write_text(text.replace(line, line.replace("feedback.to", "weight.to")))
    proc = subprocess.run([sys.executable, "-m", "bpfree.cli", "verify", "--profile", "smoke", "--experiment",
                           "A2_mnist_mlp", "--rules", "fa"], cwd=work, env=env_for(work),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "A2_mnist_mlp/fa_seed1111: differs: " in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("0 reproduced, 1 differ")


def test_missing_optional_data_is_recorded_and_its_experiment_not_run(tmp_path):
    """An optional dataset without files: prepare records why, train writes NOT RUN, exit 0."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_DATA_DIR": str(tmp_path / "nothing-here"),
           "BPFREE_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "cifar100", "--optional"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    missing = json.loads((tmp_path / "data" / "prepared" / "cifar100" / "MISSING.json").read_text())
    # The recorded message names the variable, not this machine's path (dvc.lock hashes it).
    assert "$BPFREE_DATA_DIR" in missing["message"] and str(tmp_path) not in missing["message"]
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
    from bpfree.summary import mean_learning_curve, write_learning_curves
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


def test_dvc_plots_overlay_the_rules_of_each_experiment(tmp_path, monkeypatch):
    import yaml
    monkeypatch.syspath_prepend(str(REPO))
    from bpfree.summary import write_curve_overlays
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    (plot,) = stage["plots"]
    assert plot == {"results/${profile}/plots": {
        "cache": False, "template": "rules", "x": "epoch", "y": "test_acc", "x_label": "epoch",
        "y_label": "test accuracy % (mean over seeds)"}}
    assert '"field": "curve"' in (REPO / ".dvc" / "plots" / "rules.json").read_text()
    curves = tmp_path / "learning_curves"
    (curves / "B2").mkdir(parents=True)
    (curves / "B2" / "fa_width100.csv").write_text("epoch,test_acc,n_seeds\n1,50.0,2\n")
    (curves / "B2" / "fa_width15.csv").write_text("epoch,test_acc,n_seeds\n1,40.0,2\n")
    (curves / "B2" / "bp_width15.csv").write_text("epoch,train_loss,test_acc,n_seeds\n1,2.0,45.0,2\n")
    assert write_curve_overlays(curves, tmp_path / "plots") == 1
    assert (tmp_path / "plots" / "B2.csv").read_text().splitlines() == [
        "curve,epoch,train_loss,test_acc,n_seeds", "bp_width15,1,2.0,45.0,2", "fa_width15,1,,40.0,2",
        "fa_width100,1,,50.0,2"]


def test_prepare_stops_on_raw_data_of_another_release_and_writes_nothing(tmp_path):
    """data_variants is prepare's parameter: raw files of another pinned release are a user error."""
    need_data()
    import yaml
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data_variants"]["cifar10"] = "official"  # the shared disk holds the reconstruction
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO), "BPFREE_DATA_DIR": str(DATA_DIR), "BPFREE_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "cifar10"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "data_variants.cifar10 is 'official'" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "data" / "prepared" / "cifar10").exists()
