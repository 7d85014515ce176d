"""Pipeline stages, each run as `python -m stages.<name>` from the repository root by DVC.

Why a shared entry wrapper: a bad parameter or missing data is a user error, not a bug, so
it must end the stage with one readable line and a non-zero status, not a traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from bpfree.layout import LAYOUT, MISSING_FILE, Layout, NOT_RUN_FILE, TRAINED_FILE  # noqa: F401  (re-exported)

RESULTS = LAYOUT.results
CHECKPOINTS = LAYOUT.checkpoints_root
PREPARED = LAYOUT.prepared_root


def runs_dir(profile: str, experiment: str, root: Path = RESULTS) -> Path:
    return Layout(results=Path(root)).runs(profile, experiment)


def checkpoints_dir(profile: str, experiment: str, root: Path = CHECKPOINTS) -> Path:
    return Layout(checkpoints_root=Path(root)).checkpoints(profile, experiment)


summary_path = LAYOUT.summary
learning_curves_dir = LAYOUT.learning_curves


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
