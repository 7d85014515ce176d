"""Where the pipeline's files live, in one place.

Every path of the results tree is spelled here; stages, the report, the gpu queue and the
CLI ask a Layout instead of joining "runs" or "summary.json" themselves, so a scratch
checkout (verify, the gpu queue's work dir) is just `Layout.under(its root)`.

    results/<profile>/runs/<experiment>/<run_id>/metrics.json
    results/<profile>/summary.json, learning_curves/, plots/, pruning/
    checkpoints/<profile>/<experiment>/<run_id>.pt (+ trained.json)
    data/prepared/<dataset>/
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# In a checkpoints dir: the runs this machine trained or re-trained and verified, with their
# hashes. Git-ignored and never committed, so a fresh clone lacks it and DVC re-runs the
# stage there; its content depends only on the results, so dvc.lock is the same everywhere.
TRAINED_FILE = "trained.json"
NOT_RUN_FILE = "NOT_RUN.json"  # in a runs dir: this profile did not (could not) run it
MISSING_FILE = "MISSING.json"  # in a prepared-data dir: the raw files were not available
METRICS_FILE = "metrics.json"


@dataclass(frozen=True)
class Layout:
    """The results, checkpoints and prepared-data trees (relative to the working directory
    unless given); `Layout.under(root)` is the layout of another checkout."""

    results: Path = Path("results")
    checkpoints_root: Path = Path("checkpoints")
    prepared_root: Path = Path("data") / "prepared"

    @classmethod
    def under(cls, root: str | Path) -> "Layout":
        root = Path(root)
        return cls(root / "results", root / "checkpoints", root / "data" / "prepared")

    def runs(self, profile: str, experiment: str | None = None) -> Path:
        base = Path(self.results) / profile / "runs"
        return base if experiment is None else base / experiment

    def metrics(self, profile: str, experiment: str, run_id: str) -> Path:
        return self.runs(profile, experiment) / run_id / METRICS_FILE

    def checkpoints(self, profile: str, experiment: str) -> Path:
        return Path(self.checkpoints_root) / profile / experiment

    def summary(self, profile: str) -> Path:
        return Path(self.results) / profile / "summary.json"

    def learning_curves(self, profile: str, experiment: str | None = None) -> Path:
        """<profile>/learning_curves/<experiment>/<rule>[_<sweep point>].csv (DVC plots)."""
        base = Path(self.results) / profile / "learning_curves"
        return base if experiment is None else base / experiment

    def plots(self, profile: str) -> Path:
        return Path(self.results) / profile / "plots"

    def pruning(self, profile: str) -> Path:
        return Path(self.results) / profile / "pruning"

    def prepared(self, dataset: str) -> Path:
        return Path(self.prepared_root) / dataset


LAYOUT = Layout()  # the checkout the process runs in


def natural_key(text) -> list:
    """Seeds and sweep points as numbers: 2 before 10, width 15 before 100 (JSON keys are strings)."""
    import re
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(text)) if t]
