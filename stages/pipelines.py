"""Stage: write pipelines/<profile>/dvc.yaml for every profile but smoke from dvc.yaml's
stages (why one file per profile: bpfree/pipelines.py); --check only compares."""
from __future__ import annotations

import argparse
from pathlib import Path

from bpfree.pipelines import stale_pipelines
from stages import entry, log

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.pipelines")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    stale = [str(p.relative_to(ROOT)) for p in stale_pipelines(ROOT, write=not args.check)]
    if args.check and stale:
        log("stale (run `python -m stages.pipelines`): " + ", ".join(stale))
        return 1
    for path in stale:
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    entry(main)
