"""Run a profile's lr searches and runs as parallel processes on one machine.

Why: a LeNet step leaves a GPU idle most of the time, so one process at a time wastes it;
sharding (experiment, rule, seed) runs over N processes fills it. Every shard is an ordinary
`python -m stages.tune` / `python -m stages.train` call, so results, skipping and
provenance are exactly those of `dvc repro`; afterwards `dvc repro` only re-evaluates.

    python -m stages.launch A1_cifar10_lenet A1_mnist_lenet --profile gpu --jobs 12 [--tune]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from stages import entry, log


def _run_pool(tasks: list[tuple[str, list[str]]], jobs: int, log_dir: Path) -> list[str]:
    """Run tasks with at most `jobs` at once; return the names of those that failed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    # Children run in this working directory (its params.yaml and results/), importing the
    # stages package from wherever this one came from.
    code_root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (code_root, os.environ.get("PYTHONPATH")) if p)}
    pending, running, failed = list(tasks), [], []
    while pending or running:
        while pending and len(running) < jobs:
            name, argv = pending.pop(0)
            fh = open(log_dir / f"{name}.log", "w")
            running.append((name, subprocess.Popen([sys.executable, "-m", *argv], stdout=fh,
                                                   stderr=subprocess.STDOUT, env=env), fh))
        time.sleep(1)
        for item in list(running):
            name, proc, fh = item
            if proc.poll() is not None:
                fh.close()
                running.remove(item)
                log(f"  {name}: exit {proc.returncode}")
                if proc.returncode:
                    failed.append(name)
    return failed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.launch")
    parser.add_argument("experiments", nargs="+")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--tune", action="store_true", help="first search lrs for rules with `lr: tuned`")
    parser.add_argument("--no-train", action="store_true", help="only the lr search")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--keep-finished", action="store_true",
                        help="passed to stages.train: keep finished runs made by older code")
    args = parser.parse_args(argv)

    from bpfree.config import TUNED, ConfigError, load_params, resolve_experiment

    params = load_params()
    if args.profile not in params["profiles"]:
        raise ConfigError("--profile", args.profile, "unknown profile", list(params["profiles"]))
    exps = {e: resolve_experiment(params, e, args.profile) for e in args.experiments}
    if args.tune:
        tune_tasks = [
            (f"tune_{e}_{rule}", ["stages.tune", e, "--profile", args.profile, "--rules", rule])
            for e, exp in exps.items() for rule, spec in exp["rules"].items()
            if (spec or {}).get("lr") == TUNED
        ]
        log(f"lr search: {len(tune_tasks)} tasks on {args.jobs} processes")
        failed = _run_pool(tune_tasks, args.jobs, args.log_dir)
        if failed:
            log(f"lr search failed for {failed}; see {args.log_dir}")
            return 1
    if args.no_train:
        return 0
    train_tasks = [
        (f"train_{e}_{rule}_{seed}",
         ["stages.train", e, "--profile", args.profile, "--rules", rule, "--seeds", str(seed)]
         + (["--keep-finished"] if args.keep_finished else []))
        for e, exp in exps.items() for rule in exp["rules"] for seed in exp["seeds"]
    ]
    log(f"training: {len(train_tasks)} runs on {args.jobs} processes")
    failed = _run_pool(train_tasks, args.jobs, args.log_dir)
    if failed:
        log(f"failed: {failed}; see {args.log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    entry(main)
