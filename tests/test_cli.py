"""The `bpfree` command: list, claims (exit status), and the stage-backed train/report."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bpfree import cli

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("what", ["rules", "models", "datasets", "claims"])
def test_list_sections(what, capsys):
    assert cli.main(["list", what]) == 0
    out = capsys.readouterr().out
    expected = {"rules": ["| dtp", "| lfnn_l", "block"], "models": ["bert_classifier", "resnet18"],
                "datasets": ["sick", "mnist"], "claims": ["F1-kp-tracks-bp-sick", "qualitative"]}[what]
    assert all(text in out for text in expected)


def test_claims_exit_status_follows_new_failures(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli.main(["claims", "--profile", "cpu"]) == 0  # the committed results: known failures only
    assert "known failure" in capsys.readouterr().out
    import bpfree.claims
    monkeypatch.setattr(bpfree.claims, "row_status", lambda claim, row: "new failure")
    assert cli.main(["claims", "--profile", "cpu"]) == 1


def test_stage_commands_need_the_repository_root(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report"]) == 2
    assert "repository root" in capsys.readouterr().err


def test_train_rejects_an_unknown_experiment_with_one_line(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert cli.main(["train", "Z9_nothing", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Z9_nothing" in err


def test_console_script_help_is_installed():
    done = subprocess.run([sys.executable, "-m", "bpfree.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "claims" in done.stdout and "dvc repro" in done.stdout


def test_help_and_the_library_import_load_no_torch():
    """`bpfree --help` answers at once (no torch, ~0.1 s instead of ~2-5 s) and `import bpfree`
    loads torch only when a rule is first touched; counted by modules, not by the clock."""
    probe = ("import sys\nfrom bpfree.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
             "import bpfree\nheavy = [m for m in ('torch', 'dvc', 'datasets', 'matplotlib') if m in sys.modules]\n"
             "assert not heavy, heavy\nassert callable(bpfree.apply_rule) and 'torch' in sys.modules\n"
             "assert not [m for m in ('dvc', 'datasets', 'matplotlib') if m in sys.modules]\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_rule_says_what_it_is_in_the_listing():
    from bpfree.rules import get_rule_class, list_rules
    assert [r for r in list_rules() if not (get_rule_class(r).__doc__ or "").strip()] == []


def test_stage_commands_take_every_option_of_their_stage(monkeypatch, capsys):
    """One definition of each command's options: `bpfree <stage>` forwards to the stage's own
    parser (its --help lists --checkpoints, --jobs, ... that no wrapper re-declares)."""
    monkeypatch.chdir(REPO)
    for command, flag in [("train", "--checkpoints"), ("tune", "--rules"), ("launch", "--jobs"),
                          ("bench", "--profile"), ("evaluate", "--profile"), ("report", "--results")]:
        with pytest.raises(SystemExit) as done:
            cli.main([command, "--help"])
        assert done.value.code == 0 and flag in capsys.readouterr().out, command


def test_list_experiments_reads_params_without_torch(monkeypatch):
    monkeypatch.chdir(REPO)
    probe = ("import sys\nfrom bpfree import cli\ncli.main(['list', 'experiments'])\n"
             "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "| F1_sst2_transformer_depth" in done.stdout and "smoke, cpu, gpu" in done.stdout


def test_claims_table_fits_the_terminal_and_colours_only_verdicts():
    rows = [["PASS", "A-very-long-claim-identifier-here", "bp vs fa", "97.99 ± 0.038 vs 97.4 ± 0.24", "ok"],
            ["FAIL", "B", "x", "1", "known failure"]]
    headers = ["verdict", "claim", "check", "reproduced", "status"]
    wide = cli.fitted_table(rows, headers, width=None)
    narrow = cli.fitted_table(rows, headers, width=64)
    assert max(map(len, narrow.splitlines())) <= 64 < max(map(len, wide.splitlines()))
    assert "…" in narrow and "| PASS" in narrow
    coloured = cli.fitted_table(rows, headers, width=None, colour=True)
    assert "\033[32mPASS\033[0m" in coloured and "\033[31mFAIL\033[0m" in coloured
    assert "\033" not in wide


def test_input_errors_are_recognised_by_their_defining_classes():
    from bpfree.claims import ClaimsError
    from bpfree.config import ConfigError
    from bpfree.data import DataError
    assert all(cli.is_input_error(e) for e in (ClaimsError("x"), ConfigError("a", 1, "b"), DataError("x")))
    assert not cli.is_input_error(ValueError("x"))


def test_a_built_wheel_installs_and_works_outside_the_checkout(tmp_path):
    """The wheel carries the package data (claims, notes, protocols, checksums) and the
    attention module; installed elsewhere it lists rules and claims from any directory."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # built from a copy: setuptools writes build/ next to pyproject.toml, never into the checkout
    shutil.copytree(REPO / "bpfree", source / "bpfree", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source),  # isolated, as `pip install -e .`
                    "-w", str(wheels)], check=True, capture_output=True)
    (wheel,) = wheels.glob("bpfree-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import bpfree, sys\nassert bpfree.__file__.startswith(sys.argv[1]), bpfree.__file__\n"
             "from bpfree.cli import main\nassert main(['list', 'claims']) == 0\nassert main(['list', 'rules']) == 0\n"
             "from torch import nn\nh = bpfree.apply_rule(nn.MultiheadAttention(4, 2), 'fa')\nprint(h.report)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(target)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "F1-kp-tracks-bp-sst2" in done.stdout and "| lfp_eps" in done.stdout and "in_proj_weight" in done.stdout
    assert main_needs_checkout(tmp_path, target)


def main_needs_checkout(cwd, target) -> bool:
    done = subprocess.run([sys.executable, "-c", "from bpfree.cli import main; raise SystemExit(main(['train', 'X']))"],
                          capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(target)})
    return done.returncode == 2 and "repository root" in done.stderr and "Traceback" not in done.stderr


def test_the_catalogue_bpfree_list_reads_is_what_the_registries_say():
    """bpfree/catalogue.json lets `bpfree list` answer without torch; regenerate it with
    `python -m bpfree.catalogue` when a rule, model or dataset changes."""
    from bpfree import catalogue
    assert catalogue.render(catalogue.build()) == catalogue.CATALOGUE_FILE.read_text(), \
        "bpfree/catalogue.json is stale: run `python -m bpfree.catalogue`"


def test_bpfree_list_loads_no_torch():
    probe = "import sys\nfrom bpfree.cli import main\nassert main(['list']) == 0\nassert 'torch' not in sys.modules\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "| lfp_eps" in done.stdout and "| bert_classifier" in done.stdout and "| F1-kp-tracks-bp-sst2" in done.stdout
