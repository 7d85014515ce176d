"""Stage: run every (rule, seed) of one experiment for the current profile.

Why per-run files and skipping: a CPU profile runs for hours; an interruption must cost
only the run in progress. A run whose metrics.json carries the same config hash (resolved
config + data hash) and the same code hash (the trainer's sources) is not run again.
"""
from __future__ import annotations

import argparse
import json

from bpfree.distributed import leader_process
from bpfree.progress import run_bar
from stages import MISSING_FILE, NOT_RUN_FILE, PREPARED, checkpoints_dir, entry, log as _log, runs_dir

# Under torchrun every rank trains; only rank 0 speaks and writes results.
LEADER = leader_process()


def log(msg: str) -> None:
    if LEADER:
        _log(msg)


def resume_path(ckpt_dir, run: dict):
    """Where a run's per-epoch state lives until its metrics.json is written."""
    return ckpt_dir / f"{run['run_id']}.resume.pt"


def existing_hashes(path) -> tuple[str | None, str | None]:
    try:
        with open(path) as fh:
            metrics = json.load(fh)
        return metrics.get("config_hash"), metrics.get("code_hash")
    except (OSError, ValueError, AttributeError):
        return None, None  # absent or unreadable: run it again


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.train")
    parser.add_argument("experiment")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    parser.add_argument("--rules", nargs="*", help="only these rules (to shard runs over processes)")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--resume-every", type=float, default=30.0, metavar="SECONDS",
                        help="save a run's state after an epoch once this long has passed since the "
                             "last save (0: after every epoch); a killed run continues from it")
    parser.add_argument("--keep-finished", action="store_true",
                        help="reuse a finished run whose config hash matches even if the code hash "
                             "changed (its metrics keep their own commit and code hash); for "
                             "continuing a long sweep across commits")
    args = parser.parse_args(argv)

    from bpfree.config import ConfigError, config_hash, load_params, resolve_experiment, run_configs
    from bpfree.data import load_prepared_data
    from bpfree.provenance import atomic_write_json, git_info
    from bpfree.continual import train_continual
    from bpfree.transfer import train_transfer
    from bpfree.training import code_hash, data_hash, select_device, train_run

    git_info()  # pin the commit this process starts from; runs may outlive later commits
    params = load_params()
    profile = args.profile or params["profile"]
    if profile not in params["profiles"]:
        raise ConfigError("profile", profile, "unknown profile", list(params["profiles"]))
    out_dir, ckpt_dir = runs_dir(profile, args.experiment), checkpoints_dir(profile, args.experiment)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    not_run = out_dir / NOT_RUN_FILE
    exp = resolve_experiment(params, args.experiment, profile)
    if exp.get("skip"):
        atomic_write_json(not_run, {"reason": exp["skip"], "profile": profile})
        log(f"[{profile}] {args.experiment}: NOT RUN in this profile: {exp['skip']}")
        return 0
    missing = PREPARED / exp["dataset"] / MISSING_FILE
    if missing.is_file():
        # The pipeline goes on to the tables, which show NOT RUN with this message.
        message = json.loads(missing.read_text())["message"]
        atomic_write_json(not_run, {"reason": f"data missing: {message}", "profile": profile})
        log(f"[{profile}] {args.experiment}: NOT RUN, {exp['dataset']} is missing:\n{message}")
        return 0
    pretrained = (exp.get("transfer") or {}).get("pretrained")
    if pretrained:
        from bpfree.data import MissingDataError
        from bpfree.data.weights import locate_weights
        try:
            locate_weights(pretrained)
        except MissingDataError as error:
            atomic_write_json(not_run, {"reason": f"weights missing: {error}", "profile": profile})
            log(f"[{profile}] {args.experiment}: NOT RUN, weights {pretrained} are missing:\n{error}")
            return 0
    not_run.unlink(missing_ok=True)
    runs = run_configs(params, args.experiment, profile)
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
    device = select_device(runs[0]["device"])
    data = load_prepared_data(str(PREPARED / runs[0]["dataset"]), device)
    dhash, chash_code = data_hash(data.manifest), code_hash()
    log(f"[{profile}] {args.experiment}: {len(runs)} runs on {device}")
    bar = run_bar(len(runs), args.experiment, enabled=LEADER)
    for run in runs:
        bar.update(1)
        chash = config_hash(run, dhash)
        metrics_path = out_dir / run["run_id"] / "metrics.json"
        old_config, old_code = existing_hashes(metrics_path)
        if (old_config, old_code) == (chash, chash_code):
            log(f"  {run['run_id']}: up to date (config {chash}, code {chash_code}), skipped")
            continue
        if old_config == chash and args.keep_finished:
            log(f"  {run['run_id']}: kept (config {chash}; ran with code {old_code}, now {chash_code})")
            continue
        if old_config == chash:
            log(f"  {run['run_id']}: code changed since it ran ({old_code} -> {chash_code})")
        log(f"  {run['run_id']}: training (config {chash})")
        if run.get("continual"):
            metrics = train_continual(run, data, device, log=log)
        elif run.get("transfer"):
            metrics = train_transfer(run, data, device, log=log)
        else:
            metrics = train_run(run, data, device, checkpoint_path=ckpt_dir / f"{run['run_id']}.pt",
                                resume_path=resume_path(ckpt_dir, run), resume_every_s=args.resume_every,
                                log=log, progress=LEADER)
        metrics.update(config_hash=chash, code_hash=chash_code, profile=profile, experiment=args.experiment, run_id=run["run_id"])
        if not LEADER:
            continue
        atomic_write_json(metrics_path, metrics, compact=metrics.get("curves") is not None)
        resume_path(ckpt_dir, run).unlink(missing_ok=True)  # only once the metrics are safe
        log(f"  {run['run_id']}: {metrics['status']}, selected test acc {metrics['selected_test_acc']}, "
            f"{metrics['wall_time_s']:.1f}s")
    bar.close()
    return 0


if __name__ == "__main__":
    entry(main)
