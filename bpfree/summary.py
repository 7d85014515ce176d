"""Aggregate a profile's runs into its summary (results/<profile>/summary.json).

Why a separate aggregation: the tables and claim tests read only summaries, so they do not
depend on how runs are laid out; and re-evaluating each checkpoint here catches a
checkpoint that does not hold the model the metrics describe. `python -m stages.evaluate`
is the stage around it.
"""
from __future__ import annotations

import json
import math
import statistics

import torch

from bpfree.layout import LAYOUT, NOT_RUN_FILE, natural_key

RECHECK_TOLERANCE = 1e-6  # percent points; same kernels and batch size => identical counts


def _stats(values: list[float]) -> dict:
    """Mean, sample std and standard error (std / sqrt(n), what the B-paper reports)."""
    if not values:
        return {"mean": None, "std": None, "n": 0, "se": None}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values),
            "se": std / len(values) ** 0.5}


def run_scalars(metrics: dict) -> dict[str, float]:
    """The per-run numbers claims and tables may use, flattened to "<quantity>[/<layer>]"."""
    out = dict(metrics.get("scalars") or {})  # e.g. the forgetting benchmark's per-task drops
    acc = metrics.get("selected_test_acc")
    if acc is not None:
        out["test_acc_pct"], out["test_error_pct"] = acc, 100.0 - acc
    history = metrics.get("history") or []
    if history:
        final = history[-1]
        for key, name in (("train_acc", "final_train_acc_pct"), ("train_loss", "final_train_loss"),
                          ("test_loss", "final_test_loss")):
            if final.get(key) is not None:
                out[name] = final[key]
    diagnostics = metrics.get("diagnostics") or []
    for prefix, diag in (("initial_", diagnostics[0] if diagnostics else None),
                         ("", diagnostics[-1] if len(diagnostics) > 1 else None)):
        if diag is None:
            continue
        for quantity in ("weight_feedback_angle_deg", "update_gradient_angle_deg"):
            for layer, v in (diag.get(quantity) or {}).items():
                if v is not None:
                    out[f"{prefix}{quantity}/{layer}"] = v
        for layer, c in (diag.get("conservation") or {}).items():
            if c.get("mean_abs_deviation") is not None:
                out[f"{prefix}conservation_deviation/{layer}"] = c["mean_abs_deviation"]
            out[f"{prefix}conservation_excluded/{layer}"] = c.get("excluded")
    return out


def run_provenance(metrics: dict) -> tuple[str, str]:
    """(device, commit) of a run as the front page shows them: "cuda: NVIDIA H100", "0e0d5c6+dirty"."""
    env = metrics.get("environment") or {}
    device = env.get("device", "?").split(":")[0]
    name = env.get("device_name")
    git = metrics.get("git") or {}
    commit = (git.get("commit") or "unknown")[:7]
    return (f"{device}: {name}" if name else device), commit + ("+dirty" if git.get("dirty") else "")


CURVE_COLUMNS = ("train_loss", "train_acc", "val_acc", "test_acc", "test_loss")


def logged_epochs(metrics: dict) -> list[dict]:
    """Every logged epoch's numbers, from the full history or from a long run's compact curves."""
    curves = metrics.get("curves")
    if curves:
        return [{"epoch": e, **{c: curves[c][i] for c in CURVE_COLUMNS if c in curves}}
                for i, e in enumerate(curves["epoch"])]
    return metrics.get("history") or []


def mean_learning_curve(runs: list[dict]) -> list[dict]:
    """Per logged epoch, the mean over the seeds that logged it (n_seeds says how many)."""
    by_epoch: dict[int, dict[str, list[float]]] = {}
    for metrics in runs:
        for row in logged_epochs(metrics):
            cell = by_epoch.setdefault(row["epoch"], {"n": []})
            cell["n"].append(1)
            for column in CURVE_COLUMNS:
                if row.get(column) is not None:
                    cell.setdefault(column, []).append(row[column])
    return [{"epoch": epoch, **{c: round(statistics.fmean(v), 6) for c, v in cell.items() if c != "n"},
             "n_seeds": len(cell["n"])} for epoch, cell in sorted(by_epoch.items())]


def write_learning_curves(curves: dict[str, dict[str, list[dict]]], out_dir) -> int:
    """One CSV per (experiment, rule[, sweep point]), the DVC plots of learning curves.

    Rewritten whole each time, so a curve of runs that no longer exist does not linger.
    """
    import csv
    import io
    import shutil
    from pathlib import Path

    from bpfree.provenance import atomic_write_text

    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    written = 0
    for exp_id, groups in curves.items():
        for group, rows in groups.items():
            if not rows:
                continue
            columns = ["epoch", *[c for c in CURVE_COLUMNS if any(c in r for r in rows)], "n_seeds"]
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
            atomic_write_text(out_dir / exp_id / f"{group}.csv", buffer.getvalue())
            written += 1
    out_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when empty
    return written


def write_curve_overlays(curves_dir, plots_dir) -> int:
    """results/<profile>/plots/<experiment>.csv: all of an experiment's learning curves in one
    long table with a `curve` column (rule, or rule_<sweep point>), so `dvc plots show` draws
    one plot per experiment with a line per rule (template .dvc/plots/rules.json). Derived
    from the per-curve CSVs, which the figures read."""
    import csv
    import io
    import shutil
    from pathlib import Path

    from bpfree.provenance import atomic_write_text

    curves_dir, plots_dir = Path(curves_dir), Path(plots_dir)
    if plots_dir.exists():
        shutil.rmtree(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)  # a DVC output even when empty
    written = 0
    for exp_dir in sorted(p for p in curves_dir.glob("*") if p.is_dir()):
        rows, columns = [], ["curve"]
        for file in sorted(exp_dir.glob("*.csv"), key=lambda f: natural_key(f.stem)):
            with open(file, newline="") as fh:
                reader = csv.DictReader(fh)
                columns += [c for c in reader.fieldnames or [] if c not in columns]
                rows += [{"curve": file.stem, **row} for row in reader]
        if not rows:
            continue
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(plots_dir / f"{exp_dir.name}.csv", buffer.getvalue())
        written += 1
    return written


TEST_DRAW = "randperm(seed 0)[:test_images], sorted"  # which test images the curves use


def pruning_test_indices(total: int, n_test: int) -> torch.Tensor:
    """The test images pruning curves use (TEST_DRAW): a seeded draw, not the first n, since
    a run's test subset may be ordered by class; the same for every run and rule."""
    n_test = min(int(n_test), total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n_test].sort().values


def recorded_stability(metrics: dict) -> dict:
    """The divergence rule (bpfree.training.loss_instability) applied to a run's recorded
    training losses, so committed runs are judged by it without re-training; task-sequence
    runs are judged task by task (each task starts from its own first epoch)."""
    from bpfree.training import loss_instability
    curves = metrics.get("curves") or {}
    if curves.get("train_loss"):
        return loss_instability(curves["epoch"], curves["train_loss"])
    history = [h for h in metrics.get("history") or [] if "train_loss" in h]
    worst = loss_instability([], [])
    for task in sorted({h.get("task") for h in history}, key=str):
        rows = [h for h in history if h.get("task") == task]
        found = loss_instability([h["epoch"] for h in rows], [h["train_loss"] for h in rows])
        if found["diverged_epoch"] is not None:
            return {**found, "task": task} if task is not None else found
        if found["unstable_epoch"] is not None and worst["unstable_epoch"] is None:
            worst = {**found, "task": task} if task is not None else found
    return worst


def pruning_evaluation(metrics: dict, run: dict, data_cache: dict, spec: dict, log=print) -> dict | None:
    """Pruning curves of a run's checkpoint (no fine-tuning), cached next to its metrics.

    Scalars pruned_acc_<method>/<fraction> feed the claims; per-layer Gini of |w| too. The
    cache is keyed by the checkpoint's sha256, so a retrained run is measured again.
    """
    import hashlib

    from bpfree.data import load_prepared_data
    from bpfree.provenance import atomic_write_json
    from bpfree.pruning import layer_gini, pruning_curve, relevance_scores
    from bpfree.training import (CheckpointError, device_splits, evaluate_split, load_checkpoint_model,
                                 set_determinism)

    ckpt = LAYOUT.checkpoints(metrics["profile"], metrics["experiment"]) / f"{metrics['run_id']}.pt"
    # Not inside the run's directory: that belongs to the train stage.
    cache = LAYOUT.pruning(metrics["profile"]) / metrics["experiment"] / f"{metrics['run_id']}.json"
    cached = _read(cache)
    if metrics["status"] != "OK":
        return None
    if not ckpt.is_file():
        # Runs made on a lent GPU machine come back without checkpoints (too large to carry):
        # their curves, measured there, are kept as long as they belong to this run.
        if cached and cached.get("spec") == spec and cached.get("run_config_hash") == metrics["config_hash"]:
            return cached
        return None
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
    if cached and cached.get("checkpoint_sha256") == digest and cached.get("spec") == spec \
            and cached.get("test_draw") == TEST_DRAW:
        return cached
    # Sixty full test passes of a VGG: on the GPU when the run's machine has one.
    device = torch.device("cuda" if run["device"] == "cuda" and torch.cuda.is_available() else "cpu")
    set_determinism(run.get("threads"))
    key = (run["dataset"], str(device))
    if key not in data_cache:
        data_cache[key] = load_prepared_data(str(LAYOUT.prepared(run["dataset"])), device)
    images = device_splits(data_cache[key], run, device)
    try:
        model = load_checkpoint_model(ckpt, run, images, device).eval()
    except CheckpointError as error:
        log(f"warning: {error}; no pruning curves for it")
        return None
    pick = pruning_test_indices(len(images.y_test), spec.get("test_images", len(images.y_test)))
    n_test = len(pick)
    x_test, y_test = images.x_test[pick.to(images.x_test.device)], images.y_test[pick.to(images.y_test.device)]
    batch = int(spec.get("relevance_batch", 256))
    scores = relevance_scores(model, images.prepare(images.x_train[:batch]), images.y_train[:batch])
    step = float(spec.get("step", 0.05))
    fractions = [round(i * step, 6) for i in range(int(round(1 / step)))]
    curves = {}
    for method in spec["methods"]:
        curves[method] = pruning_curve(model, lambda m: evaluate_split(m, images, x_test, y_test, loss_fn=None)[0],
                                       method, fractions, scores if method == "relevance" else None,
                                       spec.get("layers", "all"))
    result = {"checkpoint_sha256": digest, "run_config_hash": metrics["config_hash"], "spec": spec,
              "test_images": n_test, "test_draw": TEST_DRAW, "device": str(device), "curves": curves, "gini": layer_gini(model)}
    atomic_write_json(cache, result)
    return result


def pruning_scalars(result: dict) -> dict[str, float]:
    out = {}
    for method, curve in result["curves"].items():
        for point in curve:
            out[f"pruned_acc_{method}/{point['fraction']:g}"] = point["value"]
    ginis = list(result["gini"].values())
    if ginis:
        # fsum: the same mean whether the per-layer values come in the model's order (a fresh
        # measurement) or the cache file's sorted order
        out["mean_layer_gini"] = math.fsum(ginis) / len(ginis)
    return out


def _read(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def recheck(metrics: dict, run: dict, data_cache: dict, previous: dict | None = None, log=print) -> dict:
    """Re-evaluate the final test accuracy from the checkpoint on the run's own test subset.

    Checkpoints are DVC outputs, not committed: on a fresh checkout whose runs are up to
    date they are absent, and the check an earlier evaluation made of these same metrics
    (same config hash and recorded accuracy) is carried over, marked as such.
    """
    from bpfree.data import load_prepared_data
    from bpfree.training import (CheckpointError, accuracy, device_splits, load_checkpoint_model,
                                 select_device, set_determinism)

    ckpt = LAYOUT.checkpoints(metrics["profile"], metrics["experiment"]) / f"{metrics['run_id']}.pt"
    if metrics["status"] != "OK":
        return {"checked": False, "reason": f"run {metrics['status']}"}
    if metrics.get("task_accuracy") is not None:
        return {"checked": False, "reason": "task-sequence run: no single final model to re-check; "
                                            "its per-task accuracy matrix is recorded"}
    if metrics.get("transfer") is not None:
        return {"checked": False, "reason": "transfer run: its metrics are its record (no checkpoint kept)"}
    if not ckpt.is_file():
        if previous and previous.get("checked") \
                and previous.get("recorded_final_test_acc") == metrics["final_test_acc"] \
                and previous.get("run_config_hash", metrics["config_hash"]) == metrics["config_hash"]:
            return {**previous, "run_config_hash": metrics["config_hash"],
                    "carried_over": "checkpoint absent here; checked by an earlier evaluation of these metrics"}
        return {"checked": False, "reason": f"no checkpoint at {ckpt} (not pulled from the DVC cache?)"}
    device = select_device(run["device"]) if run["device"] != "cuda" or torch.cuda.is_available() \
        else torch.device("cpu")
    set_determinism(run.get("threads"))
    key = (run["dataset"], str(device))
    if key not in data_cache:
        data_cache[key] = load_prepared_data(str(LAYOUT.prepared(run["dataset"])), device)
    data = data_cache[key]
    images = device_splits(data, run, device)
    try:
        model = load_checkpoint_model(ckpt, run, images, device)
    except CheckpointError as error:
        log(f"warning: {error}")
        return {"checked": False, "reason": str(error), "unreadable": True}
    acc = accuracy(model, images, images.x_test, images.y_test)
    recorded = metrics["final_test_acc"]
    match = recorded is not None and abs(acc - recorded) <= RECHECK_TOLERANCE
    return {"checked": True, "checkpoint_test_acc": acc, "recorded_final_test_acc": recorded,
            "match": match, "device": str(device), "run_config_hash": metrics["config_hash"]}


def _not_run_entry(exp: dict, reason: str, note: str) -> dict:
    return {"dataset": exp["dataset"], "model": exp["model"]["name"], "not_run": reason,
            "shortened": exp["shortened"], "deviations": exp["deviations"],
            "epochs": exp["epochs"], "selection": exp["selection"], "notes": note, "rules": {}}


def _new_rule_entry(run: dict) -> dict:
    entry = {"seeds": [], "status": {}, "selected_test_acc": {}, "final_test_acc": {},
             "best_test_acc_test_selected": {}, "selected_epoch": {}, "mean_step_ms": {},
             "checkpoint_check": {}, "code_hash": {}, "device": {}, "commit": {},
             "lr": run["optimizer"]["lr"], "scalars": {}}
    if run.get("sweep"):
        entry.update(rule=run["rule"]["name"], sweep_param=run["sweep"]["param"], sweep_value=run["sweep"]["value"])
    return entry


def _run_status(metrics: dict | None, expected_hash: str | None, entry: dict, seed: str) -> str:
    """OK / DIVERGED / FAILED as recorded (a loss that exploded and came back is DIVERGED),
    MISSING, or STALE (produced by another config: never mixed in)."""
    if metrics is None:
        return "MISSING"
    if metrics.get("config_hash") != expected_hash:
        return "STALE"
    status = metrics["status"]
    stability = recorded_stability(metrics)
    if status == "OK" and stability["diverged_epoch"] is not None:
        status = "DIVERGED"  # the loss exploded and came back: still diverged (training.py)
    if stability["diverged_epoch"] is not None or stability["unstable_epoch"] is not None:
        entry.setdefault("loss_instability", {})[seed] = stability
    return status


def _record_run(entry: dict, seed: str, metrics: dict, run: dict, exp: dict, earlier: dict, data_cache: dict,
                mismatches: list[str], exp_id: str, log) -> None:
    """One finished run's numbers, scalars, pruning curves and checkpoint check into its entry."""
    for field in ("selected_test_acc", "final_test_acc", "best_test_acc_test_selected",
                  "selected_epoch", "mean_step_ms", "code_hash"):
        entry[field][seed] = metrics.get(field)
    entry["device"][seed], entry["commit"][seed] = run_provenance(metrics)
    scalars = run_scalars(metrics)
    if exp.get("pruning"):
        pruned = pruning_evaluation(metrics, run, data_cache, exp["pruning"], log=log)
        if pruned is not None:
            scalars.update(pruning_scalars(pruned))
    for name, value in scalars.items():
        entry["scalars"].setdefault(name, {})[seed] = value
    check = recheck(metrics, run, data_cache, earlier.get(seed), log=log)
    entry["checkpoint_check"][seed] = check
    if check.get("checked") and not check["match"]:
        mismatches.append(f"{exp_id}/{run['run_id']}: checkpoint gives {check['checkpoint_test_acc']}, "
                          f"metrics say {check['recorded_final_test_acc']}")
    if check.get("unreadable"):
        mismatches.append(f"{exp_id}/{run['run_id']}: {check['reason']}")


def _rule_stats(e: dict) -> None:
    ok = [s for s, st in e["status"].items() if st == "OK"]
    for key in ("selected_test_acc", "final_test_acc", "best_test_acc_test_selected"):
        e[key + "_stats"] = _stats([e[key][s] for s in ok if e[key].get(s) is not None])
    e["test_error_stats"] = _stats([100.0 - e["selected_test_acc"][s] for s in ok
                                    if e["selected_test_acc"].get(s) is not None])
    e["scalar_stats"] = {name: _stats([v[s] for s in ok if v.get(s) is not None])
                         for name, v in sorted(e["scalars"].items())}
    e["any_diverged"] = any(st == "DIVERGED" for st in e["status"].values())
    e["complete"] = all(st in ("OK", "DIVERGED") for st in e["status"].values())


def summarise(params: dict, profile: str, log=print) -> dict:
    """Every experiment of the profile: per rule (and sweep point) each seed's status and
    numbers, their statistics, checkpoint checks and mean learning curves."""
    from bpfree.config import config_hash, experiment_notes, resolve_experiment, run_configs, sweep_label
    from bpfree.data import read_manifest
    from bpfree.record import data_hash

    summary = {"profile": profile, "experiments": {}, "mismatches": []}
    notes = experiment_notes()
    finished: dict[str, dict[str, list[dict]]] = {}  # experiment -> curve group -> OK runs
    previous = (_read(LAYOUT.summary(profile)) or {}).get("experiments", {})
    data_cache: dict = {}
    for exp_id in params["experiments"]:
        exp = resolve_experiment(params, exp_id, profile)
        not_run = _read(LAYOUT.runs(profile, exp_id) / NOT_RUN_FILE)
        reason = exp.get("skip") or (not_run or {}).get("reason")
        if reason:
            summary["experiments"][exp_id] = _not_run_entry(exp, reason, notes.get(exp_id, ""))
            continue
        try:
            dhash = data_hash(read_manifest(LAYOUT.prepared(exp["dataset"])))
        except Exception:  # noqa: BLE001 - no prepared data: trust the hash stored in the runs
            dhash = None
        rules: dict[str, dict] = {}
        variants = set()
        for run in run_configs(params, exp_id, profile):
            key = run["rule"]["name"]
            if run.get("sweep"):  # one entry per (rule, sweep value): "fa@width=200"
                key = f"{key}@{sweep_label(run['sweep']['param'])}={run['sweep']['value']}"
            entry = rules.setdefault(key, _new_rule_entry(run))
            seed = str(run["seed"])
            entry["seeds"].append(run["seed"])
            metrics = _read(LAYOUT.metrics(profile, exp_id, run["run_id"]))
            expected = None if metrics is None else \
                config_hash(run, dhash if dhash else metrics.get("data", {}).get("hash"))
            status = entry["status"][seed] = _run_status(metrics, expected, entry, seed)
            if status in ("MISSING", "STALE"):
                continue
            if status == "OK" and not (run.get("continual") or run.get("transfer")):
                # (task sequences log per task; their figures are the task matrices)
                finished.setdefault(exp_id, {}).setdefault(run["run_id"].rsplit("_seed", 1)[0], []).append(metrics)
            variants.add(metrics["data"].get("variant"))
            earlier = previous.get(exp_id, {}).get("rules", {}).get(key, {}).get("checkpoint_check", {})
            _record_run(entry, seed, metrics, run, exp, earlier, data_cache, summary["mismatches"], exp_id, log)
        for e in rules.values():
            _rule_stats(e)
        summary["experiments"][exp_id] = {
            "dataset": exp["dataset"], "model": exp["model"]["name"],
            "data_variant": sorted(v for v in variants if v) or None,
            "selection": exp["selection"], "shortened": exp["shortened"],
            "deviations": exp["deviations"], "epochs": exp["epochs"],
            "notes": notes.get(exp_id, ""),
            "sweep": exp.get("sweep"),
            "rules": rules,
        }
    summary["learning_curves"] = {exp_id: {group: mean_learning_curve(runs) for group, runs in groups.items()}
                                  for exp_id, groups in finished.items()}
    return summary
