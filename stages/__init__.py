"""Pipeline stages, each run as `python -m stages.<name>` from the repository root by DVC.

Why a shared entry wrapper: a bad parameter or missing data is a user error, not a bug, so
it must end the stage with one readable line and a non-zero status, not a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

RESULTS = Path("results")
CHECKPOINTS = Path("checkpoints")
PREPARED = Path("data/prepared")


def runs_dir(profile: str, experiment: str, root: Path = RESULTS) -> Path:
    return Path(root) / profile / "runs" / experiment


def checkpoints_dir(profile: str, experiment: str, root: Path = CHECKPOINTS) -> Path:
    return Path(root) / profile / experiment


# In a checkpoints dir: the runs this machine trained or re-trained and verified, with their
# hashes. Git-ignored and never committed, so a fresh clone lacks it and DVC re-runs the
# stage there; its content depends only on the results, so dvc.lock is the same everywhere.
TRAINED_FILE = "trained.json"


def summary_path(profile: str) -> Path:
    return RESULTS / profile / "summary.json"


def learning_curves_dir(profile: str) -> Path:
    """results/<profile>/learning_curves/<experiment>/<rule>[_<sweep point>].csv (DVC plots)."""
    return RESULTS / profile / "learning_curves"


NOT_RUN_FILE = "NOT_RUN.json"  # in a runs dir: this profile did not (could not) run it
MISSING_FILE = "MISSING.json"  # in a prepared-data dir: the raw files were not available


def log(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg)  # a plain print when no progress bar is showing, above the bars otherwise
    sys.stdout.flush()


def entry(main: Callable[[list[str]], int | None]) -> None:
    """Run a stage's main; user errors exit 2 with their one-line message."""
    from bpfree.config import ConfigError
    from bpfree.data import DataError
    try:
        code = main(sys.argv[1:])
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    sys.exit(code or 0)
