"""One pipeline file per profile: `dvc repro` runs smoke, pipelines/<p>/dvc.yaml the others."""
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bpfree.pipelines import PROFILES, render  # noqa: E402


def test_committed_profile_pipelines_are_what_the_generator_writes():
    for profile in PROFILES:
        path = REPO / "pipelines" / profile / "dvc.yaml"
        assert path.read_text() == render(profile, REPO), f"{path} is stale: run `python -m stages.pipelines`"


def test_profile_pipelines_fix_their_profile_and_run_from_the_root():
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert root["vars"] == [{"profile": "smoke"}]
    for profile in PROFILES:
        doc = yaml.safe_load(render(profile, REPO))
        assert doc["vars"][-1] == {"profile": profile}
        assert set(doc["stages"]) == {"train", "evaluate"}
        assert doc["stages"]["train"]["do"]["wdir"] == "../.." and doc["stages"]["evaluate"]["wdir"] == "../.."
        assert "--profile ${profile}" in doc["stages"]["train"]["do"]["cmd"]
        # The tables stage of dvc.yaml reads this summary as a plain dependency: declaring it
        # here would put this profile's hours of training upstream of a plain `dvc repro`.
        outs = [next(iter(o)) for o in doc["stages"]["evaluate"]["outs"]]
        assert not any("summary.json" in o for o in outs)
    assert "results/cpu/summary.json" in root["stages"]["tables"]["deps"]


def test_params_dependencies_are_per_experiment_and_profile_entry():
    """Editing one experiment or its profile entry re-runs only its train stage; the profile's
    defaults (threads, device) reach every one of them."""
    train = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]
    assert train["params"] == ["experiments.${key}", "profiles.${profile}.defaults", "profiles.${profile}.${key}"]
    outs = [next(iter(o)) for o in train["outs"]]
    assert outs == ["results/${profile}/runs/${key}", "checkpoints/${profile}/${key}/trained.json"]


def test_no_default_remote_outside_the_repository():
    config = (REPO / ".dvc" / "config").read_text()
    assert "remote" not in config and "url" not in config


def test_trained_record_keeps_the_runs_of_processes_training_side_by_side(tmp_path):
    """Shards of one experiment (stages.launch) write one trained.json; none drops another's."""
    from bpfree.runner import Trained
    path = tmp_path / "trained.json"
    first, second = Trained(path), Trained(path)
    first.keep_only({"bp_seed0", "fa_seed0"})
    second.keep_only({"bp_seed0", "fa_seed0"})
    first.add("bp_seed0", "c1", "k")
    first.write()
    second.add("fa_seed0", "c2", "k")
    second.write()
    assert Trained(path).runs == {"bp_seed0": {"config_hash": "c1", "code_hash": "k"},
                                  "fa_seed0": {"config_hash": "c2", "code_hash": "k"}}
    third = Trained(path)
    third.keep_only({"bp_seed0"})  # a run the params no longer define is dropped
    third.write()
    assert set(Trained(path).runs) == {"bp_seed0"}


def test_the_train_stage_depends_on_every_file_a_run_executes():
    """The code identity is read off the import statements (bpfree.training.code_files); a
    file it finds that the train stage does not list would change runs without dvc noticing."""
    from bpfree.training import code_files
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]["do"]["deps"]
    covered = [REPO / d for d in deps if not d.startswith(("results/", "data/"))]
    missing = [f.relative_to(REPO).as_posix() for f in code_files()
               if not any(f == c or c in f.parents for c in covered)]
    assert not missing, f"dvc.yaml's train stage lacks {missing}"
    names = {f.relative_to(REPO / "bpfree").as_posix() for f in code_files()}
    assert {"distributed.py", "rules/lfp.py", "data/checksums.json", "training.py"} <= names
    assert not names & {"reporting.py", "claims.py", "plots.py", "cli.py", "catalogue.json"}


def test_code_hash_follows_a_lazily_imported_module(tmp_path, monkeypatch):
    """Editing a module reached only through an import inside a function changes the hash."""
    import shutil
    import bpfree.training as training
    copy = tmp_path / "bpfree"
    shutil.copytree(REPO / "bpfree", copy)
    monkeypatch.setattr(training, "__file__", str(copy / "training.py"))
    before = training.code_hash()
    assert "from bpfree.progress import epoch_bar" in (copy / "training.py").read_text()  # a lazy import
    (copy / "progress.py").write_text((copy / "progress.py").read_text() + "\n# edited\n")
    assert training.code_hash() != before
    (copy / "reporting.py").write_text("# not executed by a run\n")
    edited = training.code_hash()
    (copy / "claims.py").write_text("# not executed by a run either\n")
    assert training.code_hash() == edited
