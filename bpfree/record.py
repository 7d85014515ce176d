"""RunRecord: the schema of a run's metrics.json, filled in one place for every protocol.

Why one type: the summary, the claims, verify and the gpu queue all read metrics.json, and
three hand-written dict literals (single task, task sequence, transfer) had drifted apart
in which keys they set. The provenance every number must carry (seed, config, data hash,
code commit, device) is added here, so no protocol can forget it.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from bpfree.provenance import environment_info, git_info

STATUS_OK = "OK"
STATUS_DIVERGED = "DIVERGED"

# The selection fields of a protocol that reports one final number, not an epoch pick.
FINAL_ONLY = ("selected_epoch", "best_test_epoch", "best_test_acc_test_selected")


def data_hash(manifest: dict) -> str | None:
    """One hash for the prepared data: of the sha256 pins of its output files (which the
    loader verifies), so a re-preparation from different raw bytes re-runs every run."""
    if not manifest:
        return None
    pins = manifest.get("outputs") or manifest
    blob = json.dumps(pins, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def json_safe(obj):
    """Strict JSON: NaN/inf become None (a diverged run's loss must not break JSON readers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def final_selection(final: float | None) -> dict:
    """The selection block of a protocol whose number is its end state (task sequence, transfer)."""
    return {"selection": "final", "selected_test_acc": final, "final_test_acc": final,
            **{key: None for key in FINAL_ONLY}}


@dataclass
class RunRecord:
    """One run's results and provenance. `selection` holds the reported number and how it was
    picked (bpfree.training's _select or final_selection); `protocol` the fields only one
    protocol has (the task matrix, the transfer classes, resume and data-parallel notes)."""

    run: dict
    status: str
    history: list
    selection: dict
    sizes: dict
    wall_time_s: float
    determinism: dict
    diverged_epoch: int | dict | None = None
    curves: dict | None = None
    train_data_draw: dict | None = None
    mean_step_ms: float | None = None
    converted_layers: dict = field(default_factory=dict)
    diagnostics: list = field(default_factory=list)
    checkpoint: str | None = None
    epochs_completed: int | None = None  # default: len(history)
    protocol: dict = field(default_factory=dict)

    def to_json(self, manifest: dict, device) -> dict:
        """The metrics.json dict: these fields, plus seed, data, environment and git."""
        return json_safe({
            "status": self.status, "diverged_epoch": self.diverged_epoch, "history": self.history,
            "curves": self.curves, "train_data_draw": self.train_data_draw, **self.selection,
            "epochs_completed": len(self.history) if self.epochs_completed is None else self.epochs_completed,
            "sizes": self.sizes, "mean_step_ms": self.mean_step_ms, "wall_time_s": self.wall_time_s,
            "determinism": self.determinism, "converted_layers": self.converted_layers,
            "diagnostics": self.diagnostics, "checkpoint": self.checkpoint, "seed": int(self.run["seed"]),
            "data": {"dataset": self.run["dataset"], "variant": manifest.get("variant"),
                     "hash": data_hash(manifest)},
            "environment": environment_info(device), "git": git_info(), "config": self.run,
            **self.protocol,
        })
