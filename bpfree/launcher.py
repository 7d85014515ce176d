"""Shards of a profile's work (lr searches, then (experiment, rule, seed) runs) run in parallel:
as processes on this machine, or as jobs of a cluster through submitit (Slurm, or its local
mode). Every shard is an ordinary `python -m stages.tune` / `python -m stages.train` call in
this checkout, so results, skipping and provenance are exactly those of `dvc repro`.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bpfree.config import TUNED

Task = tuple[str, list[str]]  # (name for its log file, `python -m` arguments)


def tune_tasks(exps: dict[str, dict], profile: str) -> list[Task]:
    """One lr search per (experiment, rule) whose lr is `tuned`."""
    return [(f"tune_{e}_{rule}", ["stages.tune", e, "--profile", profile, "--rules", rule])
            for e, exp in exps.items() for rule, spec in exp["rules"].items() if (spec or {}).get("lr") == TUNED]


def train_tasks(exps: dict[str, dict], profile: str, keep_finished: bool = False) -> list[Task]:
    """One shard per (experiment, rule, seed)."""
    return [(f"train_{e}_{rule}_{seed}",
             ["stages.train", e, "--profile", profile, "--rules", rule, "--seeds", str(seed)]
             + (["--keep-finished"] if keep_finished else []))
            for e, exp in exps.items() for rule in exp["rules"] for seed in exp["seeds"]]


def child_env() -> dict[str, str]:
    """Children run in this working directory (its params.yaml and results/), importing the
    stages package from wherever this one came from."""
    code_root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p)}


def run_pool(tasks: list[tuple[str, list[str]]], jobs: int, log_dir: Path) -> list[str]:
    """Run tasks with at most `jobs` at once; return the names of those that failed."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = child_env()
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
                print(f"  {name}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(name)
    return failed


def run_submitit(tasks: list[tuple[str, list[str]]], jobs: int, log_dir: Path, cluster: str,
                  resources: dict) -> list[str]:
    """Run tasks as submitit jobs (a Slurm job array, or local processes) with at most `jobs`
    at once; return the names of those that failed. Each job runs the stage command in this
    working directory, as run_pool does."""
    import submitit
    log_dir.mkdir(parents=True, exist_ok=True)
    env = child_env()
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
            print(f"  {name}: job {job.job_id} {'ok' if error is None else 'failed: ' + error}", flush=True)
            if error is not None:
                failed.append(name)
    return failed


def launch(experiments: list[str], profile: str, jobs: int, log_dir: Path, *, tune: bool = False,
           train: bool = True, keep_finished: bool = False, engine: str = "processes", cluster: str = "local",
           resources: dict | None = None, log=print) -> int:
    """The launch stage's work: check the request before any work, then the lr searches (with
    `tune`) and the runs, each as one shard; 1 if a shard failed (its log is in log_dir)."""
    import functools

    from bpfree.config import ConfigError, load_params, resolve_experiment

    if jobs < 1:
        raise ConfigError("--jobs", jobs, "must be >= 1")
    if engine == "processes" and (cluster != "local" or (resources or {}).get("slurm_partition")):
        raise ConfigError("--engine", engine, "--cluster and --slurm-partition need --engine submitit")
    if engine == "submitit":
        import importlib.util
        if importlib.util.find_spec("submitit") is None:
            raise ConfigError("--engine", engine, "needs the submitit package (pip install submitit, "
                              "or the `cluster` extra)")
        run = functools.partial(run_submitit, cluster=cluster, resources=resources or {})
    else:
        run = run_pool
    params = load_params()
    if profile not in params["profiles"]:
        raise ConfigError("--profile", profile, "unknown profile", list(params["profiles"]))
    exps = {e: resolve_experiment(params, e, profile) for e in experiments}
    stages = ([("lr search", "tasks", tune_tasks(exps, profile))] if tune else []) \
        + ([("training", "runs", train_tasks(exps, profile, keep_finished))] if train else [])
    for what, unit, tasks in stages:
        log(f"{what}: {len(tasks)} {unit} on {jobs} processes")
        failed = run(tasks, jobs, log_dir)
        if failed:
            log(f"{what} failed for {failed}; see {log_dir}")
            return 1
    return 0
