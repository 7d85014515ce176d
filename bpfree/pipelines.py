"""pipelines/<profile>/dvc.yaml for every profile but smoke, generated from dvc.yaml's stages.

Why one file per profile: DVC takes a pipeline's parameters from tracked files, so a
profile chosen in params.yaml is switched by editing a tracked file (and left edited when a
run fails). With one pipeline file per profile, `dvc repro` runs smoke (dvc.yaml) and
`dvc repro pipelines/cpu/dvc.yaml` the cpu profile; `--dry` previews either. The train and
evaluate stages are dvc.yaml's, with the profile fixed and paths taken from the repository
root; generating them keeps the copies identical (tests/test_pipelines.py checks that the
committed files are what this writes).

Why evaluate's summary.json is not declared here: the tables stage of dvc.yaml reads every
profile's summary. Declared, it would make the cpu pipeline upstream of a plain `dvc repro`,
which would then re-run hours of cpu training after any code change.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

PROFILES = ("cpu", "gpu")
HEADER = ("# Generated from dvc.yaml by `python -m stages.pipelines`: do not edit. The {profile} profile's\n"
          "# pipeline: `dvc repro pipelines/{profile}/dvc.yaml` (add --dry to preview, or use\n"
          "# `bpfree repro --profile {profile}`, which then refreshes the tables of dvc.yaml).\n")


def render(profile: str, root: Path) -> str:
    """The profile's pipeline file as text, from the dvc.yaml under the repository `root`."""
    source = yaml.safe_load((root / "dvc.yaml").read_text())
    stages = {}
    for name in ("train", "evaluate"):
        stage = copy.deepcopy(source["stages"][name])
        body = stage["do"] if "foreach" in stage else stage
        body["wdir"] = "../.."
        if name == "evaluate":
            body["outs"] = [o for o in body["outs"] if "summary.json" not in next(iter(o))]
        stages[name] = stage
    doc = {"vars": ["../../params.yaml:experiments", {"profile": profile}], "stages": stages}
    return HEADER.format(profile=profile) + yaml.safe_dump(doc, sort_keys=False, width=100)


def stale_pipelines(root: Path, write: bool = True) -> list[Path]:
    """The profile pipeline files that differ from what render() writes (rewritten if `write`)."""
    stale = []
    for profile in PROFILES:
        path = root / "pipelines" / profile / "dvc.yaml"
        text = render(profile, root)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return stale
