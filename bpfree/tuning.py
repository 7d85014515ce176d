"""Learning-rate search on the validation split, for protocols that do not publish one.

Why a separate, recorded step: biotorch's MNIST table gives no initial lr, and most rules'
CIFAR lrs are unpublished. Each rule of an experiment is trained at every lr of the
experiment's `tuning.lrs` grid for `tuning.epochs` epochs (constant lr, the profile's data),
and the lr with the best validation accuracy is chosen; the test set is never consulted.
The grid, every curve and the choice go to results/tuning/<experiment>/<rule>.json, which
every profile reads where params.yaml says `lr: tuned` (bpfree.config.tuned_lr).
"""
from __future__ import annotations

import copy
from typing import Callable

from bpfree.config import ConfigError, _set_path
from bpfree.layout import LAYOUT, Layout


def trial_run(exp: dict, rule: str, lr: float) -> dict:
    """The run that tries one lr: the grid's seed and epochs, constant lr, best-validation
    selection, no diagnostics; at the grid's sweep point `at` when the experiment sweeps."""
    grid, spec = exp["tuning"], exp["rules"][rule] or {}
    run = copy.deepcopy({k: v for k, v in exp.items() if k not in ("rules", "seeds", "tuning", "sweep", "skip")})
    if exp.get("sweep") and "at" in grid:
        _set_path(run, exp["sweep"]["param"], grid["at"])
    run.update(rule={"name": rule, "options": dict(spec.get("options") or {})},
               seed=int(grid.get("seed", 0)), epochs=int(grid["epochs"]),
               schedule={"name": "none"}, selection="best_val", run_id=f"{rule}_lr{lr}")
    run["optimizer"]["lr"] = float(lr)
    run["diagnostics"] = {"every": 0, "batch": 256}
    return run


def chosen_lr(trials: list[dict]) -> float | None:
    """The best validation accuracy among the trials that did not diverge; ties go to the smaller lr."""
    finished = [t for t in trials if t["best_val_acc"] is not None]
    return max(finished, key=lambda t: (t["best_val_acc"], -t["lr"]))["lr"] if finished else None


def checked_experiment(params: dict, experiment: str, profile: str, rules: list[str] | None) -> tuple[dict, list[str]]:
    """(the resolved experiment, the rules to tune), or a one-line ConfigError before any work."""
    from bpfree.config import resolve_experiment
    exp = resolve_experiment(params, experiment, profile)
    if not exp.get("tuning"):
        raise ConfigError(f"experiments.{experiment}.tuning", None, "no lr grid to search")
    if exp["val_size"] <= 0:
        raise ConfigError(f"experiments.{experiment}.val_size", exp["val_size"],
                          "tuning selects on a validation split; it needs val_size > 0")
    rules = rules or list(exp["rules"])
    unknown = sorted(set(rules) - set(exp["rules"]))
    if unknown:
        raise ConfigError("--rules", unknown, f"not rules of {experiment}", list(exp["rules"]))
    return exp, rules


def tune_experiment(experiment: str, profile: str, rules: list[str] | None, log: Callable[[str], None],
                    layout: Layout = LAYOUT) -> dict[str, float | None]:
    """Search every requested rule's lr; returns rule -> chosen lr (None: every trial diverged)."""
    from bpfree.config import load_params
    from bpfree.data import load_prepared_data
    from bpfree.provenance import atomic_write_json, git_info
    from bpfree.record import data_hash
    from bpfree.training import code_hash, select_device, train_run

    git_info()  # pin the commit this process starts from; runs may outlive later commits
    exp, rules = checked_experiment(load_params(), experiment, profile, rules)
    grid = exp["tuning"]
    device = select_device(exp["device"])
    data = load_prepared_data(str(layout.prepared(exp["dataset"])), device)
    out_dir = layout.results / "tuning" / experiment
    choices = {}
    for rule in rules:
        trials = []
        for lr in grid["lrs"]:
            metrics = train_run(trial_run(exp, rule, lr), data, device)
            vals = [h["val_acc"] for h in metrics["history"]]
            best_val = max(vals) if vals and metrics["status"] == "OK" else None
            trials.append({"lr": float(lr), "status": metrics["status"], "best_val_acc": best_val,
                           "val_acc_by_epoch": vals, "mean_step_ms": metrics["mean_step_ms"]})
            log(f"  {rule} lr {lr}: {metrics['status']}, best val {best_val}")
        choices[rule] = chosen_lr(trials)
        atomic_write_json(out_dir / f"{rule}.json", {
            "experiment": experiment, "profile": profile, "rule": rule, "chosen_lr": choices[rule],
            "criterion": f"best validation accuracy within {grid['epochs']} epochs at constant lr",
            "grid": grid["lrs"], "trials": trials, "val_size": exp["val_size"],
            "at": {exp["sweep"]["param"]: grid["at"]} if exp.get("sweep") and "at" in grid else None,
            "train_subset": exp.get("train_subset"), "seed": int(grid.get("seed", 0)),
            "data_hash": data_hash(data.manifest), "code_hash": code_hash(),
            "environment": metrics["environment"], "git": metrics["git"],
        })
        log(f"{experiment} {rule}: chosen lr {choices[rule]}")
    return choices
