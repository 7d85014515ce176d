"""Run a profile's lr searches and runs in parallel: as processes on this machine, or as jobs
of a cluster through submitit (Slurm, or its local mode).

Why: a LeNet step leaves a GPU idle most of the time, so one process at a time wastes it;
sharding (experiment, rule, seed) runs over N processes fills it, and a cluster spreads the
shards over machines. Every shard is an ordinary `python -m stages.tune` /
`python -m stages.train` call in this checkout, so results, skipping and provenance are
exactly those of `dvc repro`; afterwards `dvc repro` only re-evaluates.

    python -m stages.launch A1_cifar10_lenet A1_mnist_lenet --profile gpu --jobs 12 [--tune]
    python -m stages.launch C1_split_mnist --profile gpu --engine submitit --cluster slurm \
        --slurm-partition gpu --gpus-per-node 1 --timeout-min 120 --jobs 50

On Slurm the checkout (and its venv) must sit on a filesystem the nodes share; submitit's own
logs land in <log-dir>/submitit.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from bpfree.launcher import launch
from stages import entry, log


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
    parser.add_argument("--engine", choices=["processes", "submitit"], default="processes",
                        help="processes on this machine, or jobs through submitit (--cluster)")
    parser.add_argument("--cluster", choices=["local", "slurm"], default="local",
                        help="submitit's backend: Slurm, or local processes (a dry run of the same path)")
    parser.add_argument("--timeout-min", type=int, default=240, help="submitit: wall-clock limit per job")
    parser.add_argument("--slurm-partition", default=None)
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--cpus-per-task", type=int, default=None)
    parser.add_argument("--mem-gb", type=int, default=None)
    args = parser.parse_args(argv)
    resources = {"timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node,
                 "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb,
                 **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {})}
    return launch(args.experiments, args.profile, args.jobs, args.log_dir, tune=args.tune, train=not args.no_train,
                  keep_finished=args.keep_finished, engine=args.engine, cluster=args.cluster,
                  resources=resources, log=log)


if __name__ == "__main__":
    entry(main)
