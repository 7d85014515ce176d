"""Writes pipelines/<profile>/dvc.yaml for every profile but smoke, from dvc.yaml's stages.

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

import argparse
import copy
from pathlib import Path

import yaml

from stages import entry, log

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("cpu", "gpu")
HEADER = ("# Generated from dvc.yaml by `python -m stages.pipelines`: do not edit. The {profile} profile's\n"
          "# pipeline: `dvc repro pipelines/{profile}/dvc.yaml` (add --dry to preview, or use\n"
          "# `bpfree repro --profile {profile}`, which then refreshes the tables of dvc.yaml).\n")


def render(profile: str, root: Path = ROOT) -> str:
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.pipelines")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = []
    for profile in PROFILES:
        path = ROOT / "pipelines" / profile / "dvc.yaml"
        text = render(profile)
        if path.is_file() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            log(f"wrote {path.relative_to(ROOT)}")
    if args.check and stale:
        log("stale (run `python -m stages.pipelines`): " + ", ".join(str(p.relative_to(ROOT)) for p in stale))
        return 1
    return 0


if __name__ == "__main__":
    entry(main)
