"""The Dockerfile's structure (no Docker engine runs here) and `bpfree repro`, its default
command, in a copy of the repository with and without .git."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bpfree import cli

REPO = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_base_image_is_a_pinned_cuda_image():
    (base,) = [args for keyword, args in instructions() if keyword == "FROM"]
    image = base.split()[0]
    assert image.startswith("nvidia/cuda:") or image.startswith("pytorch/pytorch:"), image
    name, _, tag = image.partition("@")[0].partition(":")
    pinned_digest = re.search(r"@sha256:[0-9a-f]{64}$", image)
    exact_tag = re.fullmatch(r"\d+\.\d+\.\d+-[a-z0-9.-]+", tag)  # e.g. 13.0.0-base-ubuntu24.04
    assert pinned_digest or exact_tag, f"base {image!r} is neither an exact version tag nor a digest"
    assert "latest" not in tag


def test_image_installs_the_lock_file_then_the_package_without_deps():
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    copies = [args for keyword, args in instructions() if keyword == "COPY"]
    lock_install = [i for i, r in enumerate(runs) if re.search(r"pip install (-\S+ )*-r requirements\.lock", r)]
    assert lock_install, runs
    assert any("requirements.lock" in c for c in copies)
    package = [i for i, r in enumerate(runs) if re.search(r"pip install .*--no-deps -e \.", r)]
    assert package and package[0] > lock_install[0]  # nothing but the lock decides the versions


def test_default_command_runs_the_pipeline_and_data_is_mounted():
    steps = dict(instructions())
    assert json.loads(steps["CMD"]) == ["bpfree", "repro"]
    assert "BPFREE_DATA_DIR=/data" in steps["ENV"] or any(
        k == "ENV" and "BPFREE_DATA_DIR=/data" in a for k, a in instructions())
    assert json.loads(steps["VOLUME"]) == ["/data"]


def test_readme_shows_the_build_and_run_commands():
    text = (REPO / "README.md").read_text()
    assert re.search(r"^docker build .*-t bpfree \.$", text, re.M)
    assert re.search(r"^docker run .*--gpus all .*-v \S+:/data .*bpfree", text, re.M)


def test_dockerignore_keeps_local_builds_out_of_the_image():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", "data/", "checkpoints/"} <= set(ignored)


def _copy_without_git(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def _repro(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "-m", "bpfree.cli", "repro", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_repro_without_git_uses_dvc_no_scm_mode(tmp_path):
    root = _copy_without_git(tmp_path / "export")
    assert not (root / ".git").exists()
    proc = _repro(root, "--dry", "prepare@mnist")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no-SCM mode" in proc.stderr and "prepare@mnist:" in proc.stdout
    assert "no_scm = true" in (root / ".dvc" / "config.local").read_text()

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)  # with git: DVC's git mode
    (root / ".dvc" / "config.local").unlink()
    proc = _repro(root, "--dry", "prepare@mnist")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no-SCM" not in proc.stderr and not (root / ".dvc" / "config.local").exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the tracked files")
def test_repro_profile_runs_its_pipeline_file_and_edits_nothing(tmp_path):
    root = _copy_without_git(tmp_path / "export")
    before = {p: p.read_bytes() for p in (root / "params.yaml", root / "dvc.yaml")}
    proc = _repro(root, "--profile", "cpu", "--dry")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pipelines/cpu/dvc.yaml:train@A2_mnist_mlp" in proc.stdout and "train@A2_mnist_mlp:" in proc.stdout
    assert {p: p.read_bytes() for p in before} == before  # no tracked file edited, even for a moment


def test_repro_rejects_an_unknown_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / ".dvc").mkdir()
    assert cli.main(["repro", "--profile", "tpu"]) == 2
    assert "unknown profile" in capsys.readouterr().err


def test_repro_outside_the_repository_root_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["repro"]) == 2
    assert "repository root" in capsys.readouterr().err


def test_the_image_runs_the_python_the_lock_was_resolved_on():
    header = (REPO / "requirements.lock").read_text().splitlines()[0]
    locked = re.search(r"Python (\d+\.\d+)", header).group(1)
    runs = [args for keyword, args in instructions() if keyword == "RUN"]
    venv = next(r for r in runs if "-m venv" in r)
    assert venv.startswith(f"python{locked} -m venv"), (locked, venv)
    assert any(f"python{locked}-venv" in r for r in runs)
