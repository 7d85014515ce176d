"""Progress bars for long work, shown only to a person at a terminal.

Why the checks: a bar redrawn into a log file or a CI transcript is thousands of lines of
carriage returns. Bars appear when stderr is a terminal and neither CI nor
BPFREE_PROGRESS=0 is set; the plain log lines stay the record either way.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_wanted(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    if os.environ.get("BPFREE_PROGRESS", "").strip() == "0" or os.environ.get("CI"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


def _bar(total: int, desc: str, enabled: bool | None, **kwargs) -> tqdm:
    stream = kwargs.setdefault("file", sys.stderr)
    show = progress_wanted(stream) if enabled is None else enabled and progress_wanted(stream)
    return tqdm(total=total, desc=desc, disable=not show, dynamic_ncols=True, **kwargs)


def epoch_bar(epochs: int, desc: str, enabled: bool | None = None, initial: int = 0, **kwargs) -> tqdm:
    """Epochs of one run (below a run bar, cleared when the run ends)."""
    return _bar(epochs, desc, enabled, initial=initial, leave=False, position=1, unit="epoch", **kwargs)


def run_bar(runs: int, desc: str, enabled: bool | None = None, **kwargs) -> tqdm:
    """Runs of one experiment."""
    return _bar(runs, desc, enabled, position=0, unit="run", **kwargs)
