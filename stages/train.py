"""Stage: run every (rule, seed) of one experiment for the current profile.

Why per-run files and skipping: a CPU profile runs for hours; an interruption must cost
only the run in progress. A run whose metrics.json carries the same config hash (resolved
config + data hash) and the same code hash (the trainer's sources) is not run again once
this machine has trained it (checkpoints/.../trained.json says so).

Why committed metrics are re-trained: metrics committed from another machine say what that
machine computed. On a fresh clone the stage re-trains each run and compares it with the
committed one by bpfree.verify's per-quantity rule: a run that reproduces keeps the committed
file untouched (so `git status` stays clean), one that does not gets the new metrics written
(a real difference, shown by `git diff`). `--reuse` (or BPFREE_REUSE=1) trusts them instead;
`--force` re-trains and overwrites.
"""
from __future__ import annotations

import argparse
import json
import os

from bpfree.distributed import leader_process
from bpfree.progress import run_bar
from stages import (CHECKPOINTS, MISSING_FILE, NOT_RUN_FILE, PREPARED, RESULTS, TRAINED_FILE, checkpoints_dir, entry,
                    log as _log, runs_dir)

# Under torchrun every rank trains; only rank 0 speaks and writes results.
LEADER = leader_process()


def log(msg: str) -> None:
    if LEADER:
        _log(msg)


def resume_path(ckpt_dir, run: dict):
    """Where a run's per-epoch state lives until its metrics.json is written."""
    return ckpt_dir / f"{run['run_id']}.resume.pt"


def read_metrics(path) -> dict | None:
    try:
        with open(path) as fh:
            metrics = json.load(fh)
        return metrics if isinstance(metrics, dict) else None
    except (OSError, ValueError):
        return None  # absent or unreadable: run it again


def existing_hashes(path) -> tuple[str | None, str | None]:
    metrics = read_metrics(path) or {}
    return metrics.get("config_hash"), metrics.get("code_hash")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.train")
    parser.add_argument("experiment")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    parser.add_argument("--rules", nargs="*", help="only these rules (to shard runs over processes)")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--resume-every", type=float, default=30.0, metavar="SECONDS",
                        help="save a run's state after an epoch once this long has passed since the "
                             "last save (0: after every epoch); a killed run continues from it")
    parser.add_argument("--force", action="store_true",
                        help="re-train every run and write its metrics, even where committed metrics "
                             "with the same config and code hash exist")
    parser.add_argument("--reuse", "--keep-finished", action="store_true",
                        default=os.environ.get("BPFREE_REUSE") == "1",
                        help="trust committed metrics whose config hash matches, without re-training "
                             "them on this machine, even if the code changed since (they keep their own "
                             "commit and code hash); for reusing published results or continuing a long "
                             "sweep across commits (also: BPFREE_REUSE=1)")
    parser.add_argument("--results", default=str(RESULTS), help="results root (default: results)")
    parser.add_argument("--checkpoints", default=str(CHECKPOINTS), help="checkpoints root (default: checkpoints)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    from bpfree.config import DEFAULT_PROFILE, ConfigError, config_hash, load_params, resolve_experiment, run_configs
    from bpfree.data import load_prepared_data
    from bpfree.provenance import atomic_write_json, git_info
    from bpfree.record import data_hash
    from bpfree.training import code_hash, preflight, select_device

    git_info()  # pin the commit this process starts from; runs may outlive later commits
    params = load_params()
    profile = args.profile or DEFAULT_PROFILE
    if profile not in params["profiles"]:
        raise ConfigError("profile", profile, "unknown profile", list(params["profiles"]))
    if args.experiment not in params["experiments"]:
        raise ConfigError("experiment", args.experiment, "unknown experiment", list(params["experiments"]))
    out_dir = runs_dir(profile, args.experiment, args.results)
    ckpt_dir = checkpoints_dir(profile, args.experiment, args.checkpoints)
    trained = Trained(ckpt_dir / TRAINED_FILE)
    not_run = out_dir / NOT_RUN_FILE
    exp = resolve_experiment(params, args.experiment, profile)
    reason = not_run_reason(exp, profile, args.experiment)
    if reason:
        if LEADER:
            atomic_write_json(not_run, {"reason": reason, "profile": profile})
            trained.write({})
        return 0
    runs = run_configs(params, args.experiment, profile)
    trained.keep_only({r["run_id"] for r in runs})  # runs the params no longer define
    if args.rules:
        unknown = sorted(set(args.rules) - {r["rule"]["name"] for r in runs})
        if unknown:
            raise ConfigError("--rules", unknown, f"not rules of {args.experiment}",
                              sorted({r["rule"]["name"] for r in runs}))
        runs = [r for r in runs if r["rule"]["name"] in args.rules]
    if args.seeds:
        runs = [r for r in runs if r["seed"] in args.seeds]
    if not runs:
        raise ConfigError("--seeds", args.seeds, f"no run of {args.experiment} matches")
    if runs[0]["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"profiles.{profile}.{args.experiment}.device", "cuda",
                              "no CUDA device on this machine; use profile smoke or cpu here")
    for folder in (out_dir, ckpt_dir):  # before minutes of training, not after them
        ensure_writable(folder)
    device = select_device(runs[0]["device"])
    data = load_prepared_data(str(PREPARED / runs[0]["dataset"]), device)
    preflight(runs, data, device)  # every run's sizes, model and rule, before any of them trains
    for folder in (out_dir, ckpt_dir):
        folder.mkdir(parents=True, exist_ok=True)
    not_run.unlink(missing_ok=True)
    dhash, chash_code = data_hash(data.manifest), code_hash()
    log(f"[{profile}] {args.experiment}: {len(runs)} runs on {device}")
    bar = run_bar(len(runs), args.experiment, enabled=LEADER)
    differ = 0
    for run in runs:
        bar.update(1)
        chash = config_hash(run, dhash)
        metrics_path = out_dir / run["run_id"] / "metrics.json"
        committed = read_metrics(metrics_path)
        old_config, old_code = (committed or {}).get("config_hash"), (committed or {}).get("code_hash")
        same = (old_config, old_code) == (chash, chash_code)
        if same and not args.force and trained.has(run["run_id"], chash, chash_code):
            log(f"  {run['run_id']}: up to date (config {chash}, code {chash_code}), skipped")
            continue
        if old_config == chash and args.reuse and not args.force:
            log(f"  {run['run_id']}: committed metrics reused (config {chash}, ran with code {old_code})")
            trained.add(run["run_id"], chash, old_code)
            continue
        verifying = same and not args.force
        if old_config == chash and not same:
            log(f"  {run['run_id']}: code changed since it ran ({old_code} -> {chash_code})")
        log(f"  {run['run_id']}: {'re-training to verify the committed metrics' if verifying else 'training'}"
            f" (config {chash})")
        ckpt = ckpt_dir / f"{run['run_id']}.pt"
        scratch = ckpt_dir / f".{run['run_id']}.verify.pt" if verifying else ckpt
        metrics = train_one(run, data, device, scratch, resume_path(ckpt_dir, run), args.resume_every)
        metrics.update(config_hash=chash, code_hash=chash_code, profile=profile, experiment=args.experiment,
                       run_id=run["run_id"])
        if not LEADER:
            continue
        if verifying:
            from bpfree.verify import compare_runs
            differences = compare_runs(committed, json.loads(json.dumps(metrics, default=str)))
            if scratch.exists():
                scratch.replace(ckpt)
            if not differences:
                resume_path(ckpt_dir, run).unlink(missing_ok=True)
                trained.add(run["run_id"], chash, chash_code)
                trained.write()
                log(f"  {run['run_id']}: reproduced the committed metrics ({metrics['wall_time_s']:.1f}s)")
                continue
            differ += 1
            log(f"  {run['run_id']}: DIFFERS from the committed metrics ({len(differences)} values), "
                f"writing the new ones: " + "; ".join(map(str, differences[:3])))
        if metrics.get("checkpoint"):
            metrics["checkpoint"] = str(ckpt)
        atomic_write_json(metrics_path, metrics, compact=metrics.get("curves") is not None)
        resume_path(ckpt_dir, run).unlink(missing_ok=True)  # only once the metrics are safe
        trained.add(run["run_id"], chash, chash_code)
        trained.write()
        log(f"  {run['run_id']}: {metrics['status']}, selected test acc {metrics['selected_test_acc']}, "
            f"{metrics['wall_time_s']:.1f}s")
    bar.close()
    if LEADER:
        trained.write()
    if differ:
        log(f"[{profile}] {args.experiment}: {differ} run(s) differ from their committed metrics "
            f"(see above; `git diff results/` shows them)")
    return 0


def ensure_writable(folder) -> None:
    """Prove results can be written into the folder, or stop with one line; creates nothing
    (a run stopped later by a bad setting must leave no empty folders behind)."""
    import tempfile
    from bpfree.config import ConfigError
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        if existing == folder:
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        elif not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as error:
        raise ConfigError(str(folder), None, f"cannot write results here ({error.strerror}); give "
                          f"--results/--checkpoints a writable folder or fix its permissions") from None


def not_run_reason(exp: dict, profile: str, experiment: str) -> str | None:
    """Why this profile does not run the experiment (its choice, or data/weights missing)."""
    if exp.get("skip"):
        log(f"[{profile}] {experiment}: NOT RUN in this profile: {exp['skip']}")
        return exp["skip"]
    missing = PREPARED / exp["dataset"] / MISSING_FILE
    if missing.is_file():
        # The pipeline goes on to the tables, which show NOT RUN with this message.
        message = json.loads(missing.read_text())["message"]
        log(f"[{profile}] {experiment}: NOT RUN, {exp['dataset']} is missing:\n{message}")
        return f"data missing: {message}"
    pretrained = (exp.get("transfer") or {}).get("pretrained")
    if pretrained:
        from bpfree.data import MissingDataError
        from bpfree.data.weights import locate_weights
        try:
            locate_weights(pretrained)
        except MissingDataError as error:
            log(f"[{profile}] {experiment}: NOT RUN, weights {pretrained} are missing:\n{error}")
            return f"weights missing: {error}"
    return None


def train_one(run: dict, data, device, checkpoint, resume, resume_every: float) -> dict:
    from bpfree.continual import train_continual
    from bpfree.transfer import train_transfer
    from bpfree.training import train_run
    if run.get("continual"):
        return train_continual(run, data, device, log=log)
    if run.get("transfer"):
        return train_transfer(run, data, device, log=log)
    return train_run(run, data, device, checkpoint_path=checkpoint, resume_path=resume,
                     resume_every_s=resume_every, log=log, progress=LEADER)


class Trained:
    """checkpoints/<profile>/<experiment>/trained.json: which runs this machine trained,
    re-trained and verified, or was told to reuse, by config and code hash.

    Several processes may train one experiment side by side (`stages.launch` shards rules
    over processes), so a write re-reads the file and changes only this process's runs."""

    def __init__(self, path):
        self.path = path
        self.runs = self._read()
        self.touched: dict[str, dict] = {}
        self.valid: set[str] | None = None

    def _read(self) -> dict:
        return (read_metrics(self.path) or {}).get("runs", {})

    def has(self, run_id: str, config: str, code: str) -> bool:
        return self.runs.get(run_id) == {"config_hash": config, "code_hash": code}

    def add(self, run_id: str, config: str, code: str | None) -> None:
        self.runs[run_id] = self.touched[run_id] = {"config_hash": config, "code_hash": code}

    def keep_only(self, run_ids: set[str]) -> None:
        self.valid = set(run_ids)

    def write(self, runs: dict | None = None) -> None:
        from bpfree.provenance import atomic_write_json
        if runs is None:
            runs = {**self._read(), **self.touched}
            if self.valid is not None:
                runs = {k: v for k, v in runs.items() if k in self.valid}
        atomic_write_json(self.path, {"runs": dict(sorted(runs.items()))})


if __name__ == "__main__":
    entry(main)
