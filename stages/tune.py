"""Learning-rate search on the validation split, for protocols that do not publish one.

Why a separate, recorded step: biotorch's MNIST table gives no initial lr, and most rules'
CIFAR lrs are unpublished. Each rule of an experiment is trained at every lr of the
experiment's `tuning.lrs` grid for `tuning.epochs` epochs (constant lr, the profile's data),
and the lr with the best validation accuracy is chosen; the test set is never consulted.
The grid, every curve and the choice go to results/tuning/<experiment>/<rule>.json, which
every profile reads where params.yaml says `lr: tuned`.

    python -m stages.tune A1_mnist_lenet --profile gpu [--rules fa dfa]
"""
from __future__ import annotations

import argparse
import copy

from stages import PREPARED, RESULTS, entry, log


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.tune")
    parser.add_argument("experiment")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    parser.add_argument("--rules", nargs="*", help="only these rules (to shard over processes)")
    args = parser.parse_args(argv)

    from bpfree.config import DEFAULT_PROFILE, ConfigError, _set_path, load_params, resolve_experiment
    from bpfree.data import load_prepared_data
    from bpfree.provenance import atomic_write_json, git_info
    from bpfree.record import data_hash
    from bpfree.training import select_device, train_run, code_hash

    git_info()  # pin the commit this process starts from; runs may outlive later commits
    params = load_params()
    profile = args.profile or DEFAULT_PROFILE
    exp = resolve_experiment(params, args.experiment, profile)
    grid = exp.get("tuning")
    if not grid:
        raise ConfigError(f"experiments.{args.experiment}.tuning", None, "no lr grid to search")
    if exp["val_size"] <= 0:
        raise ConfigError(f"experiments.{args.experiment}.val_size", exp["val_size"],
                          "tuning selects on a validation split; it needs val_size > 0")
    rules = args.rules or list(exp["rules"])
    unknown = sorted(set(rules) - set(exp["rules"]))
    if unknown:
        raise ConfigError("--rules", unknown, f"not rules of {args.experiment}", list(exp["rules"]))

    device = select_device(exp["device"])
    data = load_prepared_data(str(PREPARED / exp["dataset"]), device)
    out_dir = RESULTS / "tuning" / args.experiment
    for rule in rules:
        spec = exp["rules"][rule] or {}
        trials = []
        for lr in grid["lrs"]:
            run = copy.deepcopy({k: v for k, v in exp.items() if k not in ("rules", "seeds", "tuning", "sweep", "skip")})
            if exp.get("sweep") and "at" in grid:  # tune at one point of the sweep
                _set_path(run, exp["sweep"]["param"], grid["at"])
            run.update(rule={"name": rule, "options": dict(spec.get("options") or {})},
                       seed=int(grid.get("seed", 0)), epochs=int(grid["epochs"]),
                       schedule={"name": "none"}, selection="best_val", run_id=f"{rule}_lr{lr}")
            run["optimizer"]["lr"] = float(lr)
            run["diagnostics"] = {"every": 0, "batch": 256}
            metrics = train_run(run, data, device)
            vals = [h["val_acc"] for h in metrics["history"]]
            best_val = max(vals) if vals and metrics["status"] == "OK" else None
            trials.append({"lr": float(lr), "status": metrics["status"], "best_val_acc": best_val,
                           "val_acc_by_epoch": vals, "mean_step_ms": metrics["mean_step_ms"]})
            log(f"  {rule} lr {lr}: {metrics['status']}, best val {best_val}")
        finished = [t for t in trials if t["best_val_acc"] is not None]
        chosen = max(finished, key=lambda t: (t["best_val_acc"], -t["lr"]))["lr"] if finished else None
        atomic_write_json(out_dir / f"{rule}.json", {
            "experiment": args.experiment, "profile": profile, "rule": rule, "chosen_lr": chosen,
            "criterion": f"best validation accuracy within {grid['epochs']} epochs at constant lr",
            "grid": grid["lrs"], "trials": trials, "val_size": exp["val_size"],
            "at": {exp["sweep"]["param"]: grid["at"]} if exp.get("sweep") and "at" in grid else None,
            "train_subset": exp.get("train_subset"), "seed": int(grid.get("seed", 0)),
            "data_hash": data_hash(data.manifest), "code_hash": code_hash(),
            "environment": metrics["environment"], "git": metrics["git"],
        })
        log(f"{args.experiment} {rule}: chosen lr {chosen}")
    return 0


if __name__ == "__main__":
    entry(main)
