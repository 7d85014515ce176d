"""The gpu queue: advance the gpu profile whenever a GPU machine is lent for a few minutes.

A lent machine is short-lived (minutes in all, start included), receives files in parts of
at most 64 MiB, and returns what its command writes under $OUT. So the queue

    plan                  lists the pending runs in the order of bpfree/gpu_queue.yaml (runs
                          committed with the current config hash are done and never queued)
    pack DATASET ...      splits data/prepared/<dataset> into parts (default 60 MiB) with a
                          manifest of sha256 sums, under gpu_parts/ (git-ignored)
    unpack                on the machine: joins every dataset whose parts have all arrived
                          (each part checked), and says which parts are still missing
    run --budget-s S      on the machine: trains the top pending runs that fit the budget, one
                          (experiment, rule, seed) at a time, copying each finished run (its
                          metrics.json carries seed, config, data hash, code hash, commit and
                          device) to $OUT at once, so a window that ends mid-queue loses at most
                          the run in flight; a run's own resume state goes back with it
    land DIR              here: copies the returned runs whose config hash the current params
                          still define into results/<profile>/runs (others are named and left)

and the next window starts where the last ended: `plan` no longer lists what landed.

    python -m stages.gpu_queue plan [--profile gpu]
    python -m stages.gpu_queue pack cifar10 mnist
    python -m stages.gpu_queue run --budget-s 480 --out "$OUT"     # on the GPU machine
    python -m stages.gpu_queue land <files_at>/out                  # then stages.evaluate
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from bpfree.layout import LAYOUT, Layout

RESULTS = LAYOUT.results
PREPARED = LAYOUT.prepared_root
QUEUE_FILE = Path(__file__).with_name("gpu_queue.yaml")
PARTS = Path("gpu_parts")


def load_queue(path: Path = QUEUE_FILE) -> list[dict]:
    """The priority list, checked: a typo must not silently drop a run from the queue."""
    import yaml
    from bpfree.config import ConfigError
    entries = yaml.safe_load(Path(path).read_text()) or []
    for i, e in enumerate(entries):
        where = f"{path}[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("experiment"), str):
            raise ConfigError(where, e, "each entry needs experiment: <id>")
        unknown = set(e) - {"experiment", "rules", "seeds", "why", "minutes"}
        if unknown:
            raise ConfigError(where, sorted(unknown), "unknown keys", ["experiment", "rules", "seeds", "why", "minutes"])
        if not isinstance(e.get("minutes", 1), (int, float)) or e.get("minutes", 1) <= 0:
            raise ConfigError(f"{where}.minutes", e.get("minutes"), "must be a positive number of minutes")
    return entries


def _data_hash(dataset: str, prepared: Path) -> str | None:
    from bpfree.record import data_hash
    manifest = Path(prepared) / dataset / "manifest.json"
    return data_hash(json.loads(manifest.read_text())) if manifest.is_file() else None


def pending(profile: str = "gpu", queue: list[dict] | None = None, results: Path = RESULTS,
            prepared: Path = PREPARED) -> list[dict]:
    """Pending runs in priority order: {experiment, rule, seed, run_id, dataset, minutes, why,
    data}, where data says whether the prepared set is here (else its hash cannot be known
    and the run cannot start)."""
    from bpfree.config import config_hash, load_params, resolve_experiment, run_configs
    params = load_params()
    jobs, seen = [], set()
    for e in queue if queue is not None else load_queue():
        exp_id = e["experiment"]
        if exp_id not in params["experiments"]:
            from bpfree.config import ConfigError
            raise ConfigError(f"gpu queue: {exp_id}", exp_id, "not an experiment of params.yaml",
                              list(params["experiments"]))
        if resolve_experiment(params, exp_id, profile).get("skip"):
            continue
        for run in run_configs(params, exp_id, profile):
            if e.get("rules") and run["rule"]["name"] not in e["rules"]:
                continue
            if e.get("seeds") and run["seed"] not in e["seeds"]:
                continue
            key = (exp_id, run["run_id"])
            if key in seen:
                continue
            seen.add(key)
            dhash = _data_hash(run["dataset"], prepared)
            done = Layout(results=Path(results)).metrics(profile, exp_id, run["run_id"])
            if dhash and done.is_file() and json.loads(done.read_text()).get("config_hash") == config_hash(run, dhash):
                continue
            jobs.append({"experiment": exp_id, "rule": run["rule"]["name"], "seed": run["seed"],
                         "run_id": run["run_id"], "dataset": run["dataset"], "minutes": float(e.get("minutes", 5)),
                         "why": e.get("why", ""), "data": dhash is not None})
    return jobs


# ----------------------------------------------------------------------------- data in parts
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(dataset: str, out: Path = PARTS, part_mib: float = 60.0, prepared: Path = PREPARED) -> dict:
    """data/prepared/<dataset> as an uncompressed tar cut into parts, plus a manifest."""
    from bpfree.data import DataError
    source = Path(prepared) / dataset
    if not (source / "manifest.json").is_file():
        raise DataError(f"{source} is not a prepared dataset (no manifest.json): run "
                        f"`python -m stages.prepare {dataset}` first")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"{dataset}.tar.tmp"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname=dataset)
    size, step = archive.stat().st_size, int(part_mib * (1 << 20))
    parts = []
    with open(archive, "rb") as fh:
        for index in range(max(1, -(-size // step))):
            name = f"{dataset}.part{index:03d}"
            data = fh.read(step)
            (out / name).write_bytes(data)
            parts.append({"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"dataset": dataset, "tar_sha256": _sha256(archive), "parts": parts}
    archive.unlink()
    (out / f"{dataset}.parts.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(parts_dir: Path = PARTS, prepared: Path = PREPARED) -> dict[str, list[str]]:
    """Join every dataset whose parts are all here and intact; returns {dataset: missing}."""
    from bpfree.data import DataError
    missing = {}
    for manifest_path in sorted(Path(parts_dir).glob("*.parts.json")):
        manifest = json.loads(manifest_path.read_text())
        dataset = manifest["dataset"]
        if (Path(prepared) / dataset / "manifest.json").is_file():
            continue  # joined in an earlier window
        absent = [p["file"] for p in manifest["parts"] if not (Path(parts_dir) / p["file"]).is_file()]
        if absent:
            missing[dataset] = absent
            continue
        joined = Path(parts_dir) / f"{dataset}.tar.tmp"
        with open(joined, "wb") as out:
            for p in manifest["parts"]:
                data = (Path(parts_dir) / p["file"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != p["sha256"]:
                    joined.unlink()
                    raise DataError(f"{p['file']}: sha256 differs from {manifest_path.name}: send the part again")
                out.write(data)
        if _sha256(joined) != manifest["tar_sha256"]:
            joined.unlink()
            raise DataError(f"{dataset}: the joined parts differ from the packed archive: pack and send again")
        Path(prepared).mkdir(parents=True, exist_ok=True)
        staging = Path(prepared) / f".{dataset}.unpacking"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(joined) as tar:
            tar.extractall(staging, filter="data")
        (staging / dataset).rename(Path(prepared) / dataset)  # whole or not at all
        staging.rmdir()
        joined.unlink()
        print(f"unpacked {dataset} into {Path(prepared) / dataset}", flush=True)
    return missing


# ----------------------------------------------------------------------------- run and land
def run_queue(budget_s: float, out: Path, profile: str = "gpu", queue: list[dict] | None = None,
              work: Path = Path("gpu_work"), results: Path = RESULTS) -> list[dict]:
    """Train pending runs in order while their estimated time fits what is left of the budget;
    every finished run is copied to `out` at once (with the queue's log)."""
    from bpfree.provenance import git_info
    start, done = time.monotonic(), []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = pending(profile, queue, results)
    record = {"profile": profile, "budget_s": budget_s, "commit": git_info().get("commit"), "runs": done,
              "pending_at_start": len(jobs)}
    for job in jobs:
        left = budget_s - (time.monotonic() - start)
        if not job["data"]:
            done.append({**job, "status": f"skipped: data/prepared/{job['dataset']} is not here (pack and send it)"})
            continue
        if 60 * job["minutes"] > left:
            print(f"stop: {job['experiment']}/{job['run_id']} needs ~{job['minutes']:g} min, {left:.0f} s left", flush=True)
            break
        t0 = time.monotonic()
        argv = [sys.executable, "-m", "stages.train", job["experiment"], "--profile", profile, "--rules", job["rule"],
                "--seeds", str(job["seed"]), "--results", str(work / "results"), "--checkpoints",
                str(work / "checkpoints")]
        code = subprocess.run(argv).returncode
        run_dir = Layout.under(work).runs(profile, job["experiment"]) / job["run_id"]
        status = "trained" if code == 0 and (run_dir / "metrics.json").is_file() else f"failed (exit {code})"
        if status == "trained":
            target = Layout.under(out).runs(profile, job["experiment"]) / job["run_id"]
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(run_dir, target)
        done.append({**job, "status": status, "seconds": round(time.monotonic() - t0, 1)})
        (out / "gpu_queue_log.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "gpu_queue_log.json").write_text(json.dumps(record, indent=1) + "\n")
    return done


def land(returned: Path, profile: str = "gpu", results: Path = RESULTS, prepared: Path = PREPARED) -> tuple[list, list]:
    """Copy returned runs the current params still define (same config hash) into results/."""
    from bpfree.config import config_hash, load_params, run_configs
    params = load_params()
    landed, left = [], []
    root = Layout.under(returned).runs(profile)
    for metrics_path in sorted(root.glob("*/*/metrics.json")):
        exp_id, run_id = metrics_path.parent.parent.name, metrics_path.parent.name
        metrics = json.loads(metrics_path.read_text())
        runs = {r["run_id"]: r for r in run_configs(params, exp_id, profile)} if exp_id in params["experiments"] else {}
        run = runs.get(run_id)
        dhash = _data_hash(run["dataset"], prepared) if run else None
        if run is None or dhash is None or metrics.get("config_hash") != config_hash(run, dhash):
            left.append(f"{exp_id}/{run_id}")
            continue
        target = Layout(results=Path(results)).runs(profile, exp_id) / run_id
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(metrics_path.parent, target)
        landed.append(f"{exp_id}/{run_id}")
    return landed, left


def add_commands(parser) -> None:
    """The queue's five commands and their options, for stages.gpu_queue."""
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="the pending runs, most valuable first")
    p.add_argument("--profile", default="gpu")
    p = sub.add_parser("pack", help="split prepared datasets into parts of at most --part-mib MiB")
    p.add_argument("datasets", nargs="+")
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--out", default=str(PARTS))
    p = sub.add_parser("unpack", help="join the datasets whose parts have all arrived")
    p.add_argument("--parts", default=str(PARTS))
    p = sub.add_parser("run", help="train the top pending runs that fit --budget-s, copying each to --out")
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--profile", default="gpu")
    p = sub.add_parser("land", help="copy returned runs the current params define into results/")
    p.add_argument("returned")
    p.add_argument("--profile", default="gpu")


def run_command(args):
    """Carry out one parsed command, yielding the lines it reports."""
    if args.command == "plan":
        jobs = pending(args.profile)
        for j in jobs:
            flag = "" if j["data"] else f"  [needs data/prepared/{j['dataset']}]"
            yield f"{j['experiment']}/{j['run_id']}  ~{j['minutes']:g} min  {j['why']}{flag}"
        yield f"{len(jobs)} pending gpu runs, ~{sum(j['minutes'] for j in jobs) / 60:.1f} h on one H100"
    elif args.command == "pack":
        for dataset in args.datasets:
            yield f"{dataset}: {len(pack(dataset, Path(args.out), args.part_mib)['parts'])} part(s) under {args.out}"
    elif args.command == "unpack":
        for dataset, absent in unpack(Path(args.parts)).items():
            yield f"{dataset}: waiting for {', '.join(absent)}"
    elif args.command == "run":
        for r in run_queue(args.budget_s, Path(args.out), args.profile):
            yield f"{r['experiment']}/{r['run_id']}: {r['status']}"
    else:
        landed, left = land(Path(args.returned), args.profile)
        yield f"landed {len(landed)} run(s); left {len(left)} the current params do not define: {', '.join(left) or '-'}"
        if landed:
            yield f"next: python -m stages.evaluate --profile {args.profile}, then dvc repro (tables)"
