"""Train one experiment's runs for a profile: skip, reuse, verify or train each, write its metrics.

Why per-run files and skipping: a CPU profile runs for hours; an interruption must cost
only the run in progress. A run whose metrics.json carries the same config hash (resolved
config + data hash) and the same code hash (the trainer's sources) is not run again once
this machine has trained it (checkpoints/.../trained.json says so).

Why committed metrics are re-trained: metrics committed from another machine say what that
machine computed. On a fresh clone each run is re-trained and compared with the committed
one by bpfree.verify's per-quantity rule: a run that reproduces keeps the committed file
untouched (so `git status` stays clean), one that does not gets the new metrics written (a
real difference, shown by `git diff`). `reuse` trusts them instead; `force` re-trains and
overwrites.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bpfree.config import ConfigError
from bpfree.layout import LAYOUT, MISSING_FILE, NOT_RUN_FILE, TRAINED_FILE, Layout
from bpfree.spec import RunSpec

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainRequest:
    """What `python -m stages.train` (or the launcher's shard) asks for."""

    experiment: str
    profile: str
    rules: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    resume_every_s: float = 30.0
    force: bool = False
    reuse: bool = False
    layout: Layout = LAYOUT

    @staticmethod
    def add_arguments(parser) -> None:
        """The request's command-line options (stages.train, the launcher's shards)."""
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
        parser.add_argument("--results", default=str(LAYOUT.results), help="results root (default: results)")
        parser.add_argument("--checkpoints", default=str(LAYOUT.checkpoints_root),
                            help="checkpoints root (default: checkpoints)")

    @classmethod
    def from_arguments(cls, args) -> "TrainRequest":
        from bpfree.config import DEFAULT_PROFILE
        layout = Layout(Path(args.results), Path(args.checkpoints), LAYOUT.prepared_root)
        return cls(args.experiment, args.profile or DEFAULT_PROFILE, tuple(args.rules or ()),
                   tuple(args.seeds or ()), args.resume_every, args.force, args.reuse, layout)


def read_metrics(path) -> dict | None:
    try:
        with open(path) as fh:
            metrics = json.load(fh)
        return metrics if isinstance(metrics, dict) else None
    except (OSError, ValueError):
        return None  # absent or unreadable: run it again


def resume_path(ckpt_dir: Path, run: RunSpec) -> Path:
    """Where a run's per-epoch state lives until its metrics.json is written."""
    return ckpt_dir / f"{run.run_id}.resume.pt"


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


def ensure_writable(folder: Path) -> None:
    """Prove results can be written into the folder, or stop with one line; creates nothing
    (a run stopped later by a bad setting must leave no empty folders behind)."""
    import tempfile
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


def not_run_reason(exp: dict, request: TrainRequest, log: Log) -> str | None:
    """Why this profile does not run the experiment (its choice, or data/weights missing)."""
    profile, experiment = request.profile, request.experiment
    if exp.get("skip"):
        log(f"[{profile}] {experiment}: NOT RUN in this profile: {exp['skip']}")
        return exp["skip"]
    missing = request.layout.prepared(exp["dataset"]) / MISSING_FILE
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


def selected_runs(runs: list[RunSpec], request: TrainRequest) -> list[RunSpec]:
    """The request's runs (its rules and seeds of the experiment), or a one-line ConfigError."""
    if request.rules:
        names = sorted({r.rule.name for r in runs})
        unknown = sorted(set(request.rules) - set(names))
        if unknown:
            raise ConfigError("--rules", unknown, f"not rules of {request.experiment}", names)
        runs = [r for r in runs if r.rule.name in request.rules]
    if request.seeds:
        runs = [r for r in runs if r.seed in request.seeds]
    if not runs:
        raise ConfigError("--seeds", list(request.seeds), f"no run of {request.experiment} matches")
    if runs[0].device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ConfigError(f"profiles.{request.profile}.{request.experiment}.device", "cuda",
                              "no CUDA device on this machine; use profile smoke or cpu here")
    return runs


def train_one(run: RunSpec, data, device, checkpoint, resume, resume_every: float, log: Log, progress: bool) -> dict:
    """One run through its protocol: a task sequence, transfer, or a single task."""
    from bpfree.continual import train_continual
    from bpfree.training import train_run
    from bpfree.transfer import train_transfer
    if run.protocol == "continual":
        return train_continual(run, data, device, log=log)
    if run.protocol == "transfer":
        return train_transfer(run, data, device, log=log)
    return train_run(run, data, device, checkpoint_path=checkpoint, resume_path=resume,
                     resume_every_s=resume_every, log=log, progress=progress)


def train_experiment(request: TrainRequest, log: Log, leader: bool = True) -> int:
    """Skip, reuse, verify or train every requested run; returns how many differ from their
    committed metrics. Only the leader (rank 0 under torchrun) writes."""
    from bpfree.config import load_params, resolve_experiment, run_specs
    from bpfree.provenance import atomic_write_json, git_info

    git_info()  # pin the commit this process starts from; runs may outlive later commits
    params = load_params()
    if request.profile not in params["profiles"]:
        raise ConfigError("profile", request.profile, "unknown profile", list(params["profiles"]))
    if request.experiment not in params["experiments"]:
        raise ConfigError("experiment", request.experiment, "unknown experiment", list(params["experiments"]))
    out_dir = request.layout.runs(request.profile, request.experiment)
    ckpt_dir = request.layout.checkpoints(request.profile, request.experiment)
    trained = Trained(ckpt_dir / TRAINED_FILE)
    reason = not_run_reason(resolve_experiment(params, request.experiment, request.profile), request, log)
    if reason:
        if leader:
            atomic_write_json(out_dir / NOT_RUN_FILE, {"reason": reason, "profile": request.profile})
            trained.write({})
        return 0
    # Through the typed schema (bpfree.spec): a key it does not know stops here, before any work.
    runs = run_specs(params, request.experiment, request.profile)
    trained.keep_only({r.run_id for r in runs})  # runs the params no longer define
    runs = selected_runs(runs, request)
    for folder in (out_dir, ckpt_dir):  # before minutes of training, not after them
        ensure_writable(folder)
    return _train_runs(runs, request, out_dir, ckpt_dir, trained, log, leader)


def _train_runs(runs, request: TrainRequest, out_dir: Path, ckpt_dir: Path, trained: Trained, log: Log,
                leader: bool) -> int:
    from bpfree.data import load_prepared_data
    from bpfree.progress import run_bar
    from bpfree.record import data_hash
    from bpfree.training import code_hash, preflight, select_device

    device = select_device(runs[0].device)
    data = load_prepared_data(str(request.layout.prepared(runs[0].dataset)), device)
    preflight(runs, data, device)  # every run's sizes, model and rule, before any of them trains
    for folder in (out_dir, ckpt_dir):
        folder.mkdir(parents=True, exist_ok=True)
    (out_dir / NOT_RUN_FILE).unlink(missing_ok=True)
    hashes = (data_hash(data.manifest), code_hash())
    log(f"[{request.profile}] {request.experiment}: {len(runs)} runs on {device}")
    bar = run_bar(len(runs), request.experiment, enabled=leader)
    differ = 0
    for run in runs:
        bar.update(1)
        differ += _one_run(run, data, device, hashes, request, out_dir, ckpt_dir, trained, log, leader)
    bar.close()
    if leader:
        trained.write()
    if differ:
        log(f"[{request.profile}] {request.experiment}: {differ} run(s) differ from their committed metrics "
            f"(see above; `git diff results/` shows them)")
    return differ


def _one_run(run: RunSpec, data, device, hashes, request: TrainRequest, out_dir: Path, ckpt_dir: Path,
             trained: Trained, log: Log, leader: bool) -> int:
    """Skip, reuse, verify or train one run; 1 if it differs from its committed metrics."""
    from bpfree.config import config_hash
    from bpfree.provenance import atomic_write_json

    dhash, chash_code = hashes
    chash = config_hash(run.hash_payload(), dhash)
    run_id = run.run_id
    metrics_path = out_dir / run_id / "metrics.json"
    committed = read_metrics(metrics_path)
    old_config, old_code = (committed or {}).get("config_hash"), (committed or {}).get("code_hash")
    same = (old_config, old_code) == (chash, chash_code)
    if same and not request.force and trained.has(run_id, chash, chash_code):
        log(f"  {run_id}: up to date (config {chash}, code {chash_code}), skipped")
        return 0
    if old_config == chash and request.reuse and not request.force:
        log(f"  {run_id}: committed metrics reused (config {chash}, ran with code {old_code})")
        trained.add(run_id, chash, old_code)
        return 0
    verifying = same and not request.force
    if old_config == chash and not same:
        log(f"  {run_id}: code changed since it ran ({old_code} -> {chash_code})")
    log(f"  {run_id}: {'re-training to verify the committed metrics' if verifying else 'training'}"
        f" (config {chash})")
    ckpt = ckpt_dir / f"{run_id}.pt"
    scratch = ckpt_dir / f".{run_id}.verify.pt" if verifying else ckpt
    metrics = train_one(run, data, device, scratch, resume_path(ckpt_dir, run), request.resume_every_s, log, leader)
    metrics.update(config_hash=chash, code_hash=chash_code, profile=request.profile,
                   experiment=request.experiment, run_id=run_id)
    if not leader:
        return 0
    if verifying:
        from bpfree.verify import compare_runs
        differences = compare_runs(committed, json.loads(json.dumps(metrics, default=str)))
        if scratch.exists():
            scratch.replace(ckpt)
        if not differences:
            resume_path(ckpt_dir, run).unlink(missing_ok=True)
            trained.add(run_id, chash, chash_code)
            trained.write()
            log(f"  {run_id}: reproduced the committed metrics ({metrics['wall_time_s']:.1f}s)")
            return 0
        log(f"  {run_id}: DIFFERS from the committed metrics ({len(differences)} values), "
            f"writing the new ones: " + "; ".join(map(str, differences[:3])))
    if metrics.get("checkpoint"):
        metrics["checkpoint"] = str(ckpt)
    atomic_write_json(metrics_path, metrics, compact=metrics.get("curves") is not None)
    resume_path(ckpt_dir, run).unlink(missing_ok=True)  # only once the metrics are safe
    trained.add(run_id, chash, chash_code)
    trained.write()
    log(f"  {run_id}: {metrics['status']}, selected test acc {metrics['selected_test_acc']}, "
        f"{metrics['wall_time_s']:.1f}s")
    return 1 if verifying else 0
