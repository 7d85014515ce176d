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
import functools
import os
import subprocess
import sys
import time
from pathlib import Path

from stages import entry, log


def _child_env() -> dict[str, str]:
    """Children run in this working directory (its params.yaml and results/), importing the
    stages package from wherever this one came from."""
    code_root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p)}


def _run_pool(tasks: list[tuple[str, list[str]]], jobs: int, log_dir: Path) -> list[str]:
    """Run tasks with at most `jobs` at once; return the names of those that failed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _child_env()
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


def _run_submitit(tasks: list[tuple[str, list[str]]], jobs: int, log_dir: Path, cluster: str,
                  resources: dict) -> list[str]:
    """Run tasks as submitit jobs (a Slurm job array, or local processes) with at most `jobs`
    at once; return the names of those that failed. Each job runs the stage command in this
    working directory, as _run_pool does."""
    import submitit
    log_dir.mkdir(parents=True, exist_ok=True)
    env = _child_env()
    executor = submitit.AutoExecutor(folder=log_dir / "submitit", cluster=cluster)
    executor.update_parameters(name="bpfree", **{k: v for k, v in resources.items() if v is not None},
                               **({"slurm_array_parallelism": jobs} if cluster == "slurm" else {}))
    # Slurm throttles the array itself; the local executor starts every job it is given, so
    # it gets them in waves of `jobs`.
    wave = len(tasks) if cluster == "slurm" else jobs
    failed = []
    for start in range(0, len(tasks), max(wave, 1)):
        with executor.batch():
            submitted = [(name, executor.submit(submitit.helpers.CommandFunction(
                [sys.executable, "-m", *argv], verbose=False, cwd=os.getcwd(), env=env)))
                for name, argv in tasks[start:start + wave]]
        for name, job in submitted:
            try:
                output = job.result()
                error = None
            except Exception as exc:  # a non-zero exit or a job the cluster killed
                last_line = (str(exc).strip().splitlines() or [""])[-1]
                output, error = "", f"{type(exc).__name__}: {last_line}"
            (log_dir / f"{name}.log").write_text(output if error is None else f"{error}\n{job.stderr() or ''}")
            log(f"  {name}: job {job.job_id} {'ok' if error is None else 'failed: ' + error}")
            if error is not None:
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
    if args.jobs < 1:
        raise SystemExit(f"stages.launch: --jobs must be >= 1, got {args.jobs}")
    if args.engine == "processes" and (args.cluster != "local" or args.slurm_partition):
        raise SystemExit("stages.launch: --cluster and --slurm-partition need --engine submitit")
    if args.engine == "submitit":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise SystemExit("stages.launch: --engine submitit needs the submitit package "
                             "(pip install submitit, or the `cluster` extra)") from None
        resources = {"timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node,
                     "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb,
                     **({"slurm_partition": args.slurm_partition} if args.slurm_partition else {})}
        run = functools.partial(_run_submitit, cluster=args.cluster, resources=resources)
    else:
        run = _run_pool

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
        failed = run(tune_tasks, args.jobs, args.log_dir)
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
    failed = run(train_tasks, args.jobs, args.log_dir)
    if failed:
        log(f"failed: {failed}; see {args.log_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    entry(main)
