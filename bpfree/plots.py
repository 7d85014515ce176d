"""Figures of the reproduced results, drawn from committed summaries and run files only.

Why here and not in the trainer: a figure must be re-drawable from what is committed
(results/<profile>/summary.json and runs/*/metrics.json) without re-running anything, and
the same numbers feed the tables, so a figure cannot disagree with its table.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402

from bpfree.layout import Layout  # noqa: E402

# One colour per rule, the same in every figure and never shared by two rules (tab20 and
# a few tab10 extras; BP black as the reference).
RULE_COLOURS = {"bp": "black", "fa": "#d62728", "adafa": "#ff7f0e", "usf": "#1f77b4", "brsf": "#17becf",
                "frsf": "#9467bd", "kp": "#8c564b", "wm": "#e377c2", "dfa": "#2ca02c", "backman": "#bcbd22",
                "lfp0": "#7f7f7f", "lfp_eps": "#98df8a", "lfp_ab": "#ffbb78", "lfp_zpzm": "#c5b0d5",
                "lfnn": "#aec7e8", "lfnn_l": "#ff9896", "lfnn_heads": "#c49c94", "tp": "#f7b6d2",
                "dtp": "#dbdb8d", "lra": "#9edae5"}
LEGEND = {"loc": "center left", "bbox_to_anchor": (1.01, 0.5), "frameon": False}  # outside the data


PNG_METADATA = {"Software": None}  # no version stamp: same data, same bytes


def sweep_series(summary: dict, experiment: str, metric: str) -> dict[str, list[tuple]]:
    """rule -> [(sweep value, mean, standard error, n)] from a summary's "rule@p=v" entries."""
    exp = summary.get("experiments", {}).get(experiment) or {}
    series: dict[str, list[tuple]] = {}
    for entry in exp.get("rules", {}).values():
        if "sweep_value" not in entry:
            continue
        stats = (entry.get("scalar_stats") or {}).get(metric) or {}
        if stats.get("mean") is None:
            continue
        series.setdefault(entry["rule"], []).append(
            (entry["sweep_value"], stats["mean"], stats.get("se") or 0.0, stats["n"]))
    for points in series.values():
        points.sort(key=lambda p: p[0])
    return series


def _verdicts(spec: dict) -> str:
    """The verdicts of the claims that read this figure's experiment (set by the report)."""
    return ("\n" + "; ".join(spec["verdicts"])) if spec.get("verdicts") else ""


def _footnote(fig, spec: dict, limit: int = 12) -> None:
    """Each check on the figure's experiment, its bound and its verdict, under the figure."""
    lines = [m["text"] for m in spec.get("marks") or []]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more checks (see the table)"]
    if lines:
        fig.text(0.0, 0.0, "\n".join(lines), ha="left", va="top", fontsize=6, family="monospace")


def _point_marks(ax, spec: dict, metric: str | None, at=None, x=None) -> None:
    """Paper targets (hollow marker, band as error bar) and min / max bounds (a triangle
    pointing into the allowed side) of checks on `metric`: at their sweep point, or, on an
    epoch axis (x given), as a line across the panel for the checks at this panel's point."""
    for m in spec.get("marks") or []:
        if m.get("kind") is None or m["metric"] != metric or (x is not None and m["at"] != at):
            continue
        colour = RULE_COLOURS.get(m["rule"], "grey")
        label = (f"{m['rule']}: paper {m['value']:g} ± {m['band']:g}" if m["kind"] == "target"
                 else f"{m['rule']} {'≥' if m['kind'] == 'min' else '≤'} {m['value']:g} (claim)")
        if label in ax.get_legend_handles_labels()[1]:
            label = "_nolegend_"  # one legend entry per bound, however many points it marks
        if x is not None:
            ax.axhline(m["value"], ls=":", lw=1.2, color=colour, label=label)
            if m["kind"] == "target":
                ax.axhspan(m["value"] - m["band"], m["value"] + m["band"], color=colour, alpha=0.12)
            continue
        if m["at"] is None:
            continue
        pos = float(m["at"])
        if m["kind"] == "target":
            ax.errorbar([pos], [m["value"]], yerr=[m["band"]], marker="D", ms=6, mfc="none", capsize=4,
                        ls="none", color=colour, label=label)
        else:
            ax.plot([pos], [m["value"]], marker="^" if m["kind"] == "min" else "v", ms=8, mfc="none",
                    ls="none", color=colour, label=label)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, metadata=PNG_METADATA, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)  # atomic: a reader never sees half a PNG
    return path


def plot_sweep(summary: dict, spec: dict, path: Path) -> Path | None:
    """One line per rule: metric against the swept parameter, error bars = standard error."""
    series = sweep_series(summary, spec["experiment"], spec["metric"])
    if not series:
        return None
    param = (summary["experiments"][spec["experiment"]].get("sweep") or {}).get("param", "sweep")
    fig, ax = plt.subplots(figsize=(6.6, 3.6), layout="constrained")
    for rule, points in sorted(series.items()):
        xs, ys, es = [p[0] for p in points], [p[1] for p in points], [p[2] for p in points]
        ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=rule,
                    color=RULE_COLOURS.get(rule))
    if spec.get("log_y") and all(p[1] > 0 for pts in series.values() for p in pts):
        ax.set_yscale("log")
    if spec.get("log_x"):  # where the action is at the small end of the sweep (B2's widths)
        ax.set_xscale("log")
        ticks = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.minorticks_off()
    if spec.get("chance") is not None:  # the paper's Figure 1 marks chance level
        ax.axhline(spec["chance"], ls="--", lw=1, color="grey", label=spec.get("chance_label", "chance"))
    if all(_is_number(m.get("at")) for m in spec.get("marks") or [] if m.get("kind")):
        _point_marks(ax, spec, spec["metric"])
    _footnote(fig, spec)
    n = sorted({p[3] for pts in series.values() for p in pts})
    ax.set_xlabel(param.rsplit(".", 1)[-1])
    ax.set_ylabel(spec.get("ylabel", spec["metric"]))
    ax.set_title(f"{spec['experiment']} ({spec['profile']}, n = {'/'.join(map(str, n))} repeats)" + _verdicts(spec),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **LEGEND)
    return _save(fig, path)


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except (TypeError, ValueError):
        return False


def _run_curve(metrics: dict, column: str) -> tuple[list, list]:
    """(epochs, values) of one diagnostics column, from compact curves or the full lists."""
    curves = metrics.get("curves")
    if curves and column in curves:
        return curves["diagnostics_epoch"], curves[column]
    quantity, _, layer = column.partition("/")
    epochs, values = [], []
    for d in metrics.get("diagnostics") or []:
        if quantity == "conservation_deviation":
            v = ((d.get("conservation") or {}).get(layer) or {}).get("mean_abs_deviation")
        else:
            v = (d.get(quantity) or {}).get(layer)
        epochs.append(d["epoch"])
        values.append(v)
    return epochs, values


def current_runs(runs_dir: Path, summary: dict | None, experiment: str):
    """The metrics.json of runs the summary counts as OK (the config-hash check of evaluate),
    so a figure never mixes in stale runs of an older config; without a summary, every OK run."""
    from bpfree.config import sweep_label
    rules = (((summary or {}).get("experiments") or {}).get(experiment) or {}).get("rules")
    for path in sorted(Path(runs_dir).glob("*/metrics.json")):
        with open(path) as fh:
            m = json.load(fh)
        if m.get("status") != "OK":
            continue
        if rules is not None:
            config = m.get("config") or {}
            sweep, key = config.get("sweep"), config.get("rule", {}).get("name")
            if sweep:
                key = f"{key}@{sweep_label(sweep['param'])}={sweep['value']}"
            if (rules.get(key) or {}).get("status", {}).get(str(m.get("seed"))) != "OK":
                continue
        yield m


def mean_curves(runs_dir: Path, column: str, at=None, summary: dict | None = None,
                experiment: str = "") -> dict[str, tuple[list, list]]:
    """rule -> (epochs, mean over repeats) of a diagnostics column at one sweep point."""
    per_rule: dict[str, dict[int, list[float]]] = {}
    for m in current_runs(runs_dir, summary, experiment):
        if m.get("status") != "OK":
            continue
        sweep = (m.get("config") or {}).get("sweep")
        if at is not None and (sweep is None or str(sweep["value"]) != str(at)):
            continue
        rule = m["config"]["rule"]["name"]
        for e, v in zip(*_run_curve(m, column)):
            if v is not None and math.isfinite(v):
                per_rule.setdefault(rule, {}).setdefault(e, []).append(v)
    return {rule: (sorted(by_epoch), [statistics.fmean(by_epoch[e]) for e in sorted(by_epoch)])
            for rule, by_epoch in per_rule.items()}


def plot_curves(results_dir: Path, spec: dict, path: Path, summary: dict | None = None) -> Path | None:
    """Grid: one row per column (quantity), one panel per sweep point; a line per rule."""
    runs_dir = Layout(results=Path(results_dir)).runs(spec["profile"], spec["experiment"])
    points = spec.get("at") or [None]
    columns = spec["columns"]
    data = {(c, a): mean_curves(runs_dir, c, a, summary, spec["experiment"]) for c in columns for a in points}
    if not any(data.values()):
        return None
    fig, axes = plt.subplots(len(columns), len(points), figsize=(4.2 * len(points) + 1.4, 3.0 * len(columns)), layout="constrained",
                             squeeze=False)
    for i, column in enumerate(columns):
        for j, at in enumerate(points):
            ax = axes[i][j]
            for rule, (xs, ys) in sorted(data[(column, at)].items()):
                ax.plot(xs, ys, label=rule, color=RULE_COLOURS.get(rule), lw=1.2)
            ax.set_xlabel("epoch")
            ax.set_ylabel((spec.get("ylabels") or columns)[i], fontsize=8)
            if at is not None:
                ax.set_title(f"width {at}" if "width" in spec["experiment"] else f"{at}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8, **LEGEND)
    _footnote(fig, spec)
    fig.suptitle(f"{spec['experiment']} ({spec['profile']}), mean over repeats" + _verdicts(spec), fontsize=9)
    return _save(fig, path)


def plot_task_matrix(results_dir: Path, spec: dict, path: Path, summary: dict | None = None) -> Path | None:
    """Mean test accuracy on task t (column) after learning task i (row), one panel per rule."""
    runs_dir = Layout(results=Path(results_dir)).runs(spec["profile"], spec["experiment"])
    per_rule: dict[str, list] = {}
    for m in current_runs(runs_dir, summary, spec["experiment"]):
        if m.get("task_accuracy"):
            per_rule.setdefault(m["config"]["rule"]["name"], []).append(m["task_accuracy"])
    if not per_rule:
        return None
    rules = sorted(per_rule)
    fig, axes = plt.subplots(1, len(rules), figsize=(3.6 * len(rules), 3.2), layout="constrained",
                             squeeze=False)
    for ax, rule in zip(axes[0], rules):
        mats = per_rule[rule]
        k = len(mats[0])
        mean = [[statistics.fmean(m[i][t] for m in mats) for t in range(k)] for i in range(k)]
        image = ax.imshow(mean, vmin=0, vmax=100, cmap="viridis")
        for i in range(k):
            for t in range(k):
                ax.text(t, i, f"{mean[i][t]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if mean[i][t] < 60 else "black")
        ax.set_xticks(range(k), [f"T{t + 1}" for t in range(k)])
        ax.set_yticks(range(k), [f"after T{i + 1}" for i in range(k)])
        ax.set_title(f"{rule} ({len(mats)} seeds)", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="test accuracy %")
    _footnote(fig, spec)
    if spec.get("verdicts"):
        fig.suptitle("; ".join(spec["verdicts"]), fontsize=8)
    return _save(fig, path)


def plot_pruning(summary: dict, spec: dict, path: Path) -> Path | None:
    """Accuracy of the pruned (not fine-tuned) models against the fraction pruned, one panel
    per pruning method, one line per rule; from the evaluate stage's pruned_acc_* scalars."""
    rules = (summary["experiments"][spec["experiment"]].get("rules") or {})
    methods = spec.get("methods") or ["global_magnitude", "layer_magnitude", "relevance"]
    data = {}
    for rule, entry in rules.items():
        for name, stats in (entry.get("scalar_stats") or {}).items():
            method, _, fraction = name.removeprefix("pruned_acc_").partition("/")
            if name.startswith("pruned_acc_") and method in methods and stats.get("mean") is not None:
                data.setdefault(method, {}).setdefault(rule, []).append(
                    (float(fraction), stats["mean"], stats.get("se") or 0.0))
    if not data:
        return None
    shown = [m for m in methods if m in data]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.8 * len(shown) + 1.4, 3.2), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, method in zip(axes[0], shown):
        for rule, points in sorted(data[method].items()):
            points.sort()
            ax.errorbar([100 * p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                        marker="o", ms=2, capsize=1.5, lw=1.1, label=rule, color=RULE_COLOURS.get(rule))
        ax.set_title(method.replace("_", " "), fontsize=9)
        ax.set_xlabel("weights pruned %")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy %")
    axes[0][-1].legend(fontsize=8, **LEGEND)
    _footnote(fig, spec)
    fig.suptitle(f"{spec['experiment']} ({spec['profile']}), no fine-tuning, mean over seeds" + _verdicts(spec), fontsize=9)
    return _save(fig, path)


# A history column and the claim metric it ends in (test_acc per epoch -> test_acc_pct).
HISTORY_METRICS = {"test_acc": "test_acc_pct", "train_acc": "train_acc_pct"}


def plot_history(results_dir: Path, spec: dict, path: Path, summary: dict | None = None) -> Path | None:
    """A per-epoch history column (e.g. test_acc) against epoch: one panel per sweep point,
    one line per rule, mean over seeds."""
    runs_dir = Layout(results=Path(results_dir)).runs(spec["profile"], spec["experiment"])
    column = spec.get("column", "test_acc")
    points = spec.get("at") or [None]
    data: dict = {}
    for m in current_runs(runs_dir, summary, spec["experiment"]):
        sweep = (m.get("config") or {}).get("sweep")
        at = str(sweep["value"]) if sweep else None
        if m.get("status") != "OK" or (spec.get("at") and at not in map(str, points)):
            continue
        for h in m.get("history") or []:
            if h.get(column) is not None:
                data.setdefault(at, {}).setdefault(m["config"]["rule"]["name"], {}).setdefault(
                    h["epoch"], []).append(h[column])
    if not data:
        return None
    keys = [str(p) if p is not None else None for p in points]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 1.4, 3.2), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, at in zip(axes[0], keys):
        for rule, by_epoch in sorted((data.get(at) or {}).items()):
            epochs = sorted(by_epoch)
            ax.plot(epochs, [statistics.fmean(by_epoch[e]) for e in epochs], marker="o", ms=3,
                    label=f"{rule} (n={len(by_epoch[epochs[-1]])})", color=RULE_COLOURS.get(rule))
        if at is not None:
            ax.set_title(f"{spec.get('at_label', 'sweep')} = {at}", fontsize=9)
        _point_marks(ax, spec, HISTORY_METRICS.get(column, column), at=at, x="epoch")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, **LEGEND)
    axes[0][0].set_ylabel(spec.get("ylabel", column))
    _footnote(fig, spec)
    fig.suptitle(f"{spec['experiment']} ({spec['profile']}), mean over seeds" + _verdicts(spec), fontsize=9)
    return _save(fig, path)


def learning_curve_files(results_dir: Path, summary: dict, profile: str, experiment: str) -> dict:
    """sweep value (None without a sweep) -> rule -> the evaluate stage's learning-curve CSV."""
    from bpfree.config import sweep_label

    base = Layout(results=Path(results_dir)).learning_curves(profile, experiment)
    files: dict = {}
    for key, entry in ((summary.get("experiments") or {}).get(experiment) or {}).get("rules", {}).items():
        if "sweep_value" in entry:
            name = f"{entry['rule']}_{sweep_label(entry['sweep_param'])}{entry['sweep_value']}"
            at, rule = entry["sweep_value"], entry["rule"]
        else:
            name, at, rule = key, None, key
        if (base / f"{name}.csv").is_file():
            files.setdefault(at, {})[rule] = base / f"{name}.csv"
    return files


def _read_curve(path: Path, column: str) -> tuple[list[float], list[float], int]:
    import csv
    with open(path, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(column) not in (None, "")]
    seeds = max((int(r["n_seeds"]) for r in rows), default=0)
    return [float(r["epoch"]) for r in rows], [float(r[column]) for r in rows], seeds


def plot_learning_curves(results_dir: Path, summary: dict, profile: str, experiment: str, path: Path,
                         column: str = "test_acc", claims: list[dict] | None = None) -> Path | None:
    """Test accuracy against epoch, mean over seeds: a panel per sweep point, a line per rule.
    `claims` (id, verdict, and for absolute claims the paper's accuracy and band per rule): the
    paper's value as a dashed line in the rule's colour with its band shaded, verdicts in the title."""
    files = learning_curve_files(results_dir, summary, profile, experiment)
    if not files:
        return None
    points = sorted(files, key=lambda v: (v is not None, v))
    cols = min(len(points), 5)
    rows = math.ceil(len(points) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols + 1.6, 2.8 * rows), layout="constrained",
                             squeeze=False, sharey=True)
    param = ((summary["experiments"][experiment].get("sweep") or {}).get("param") or "").rsplit(".", 1)[-1]
    for index, at in enumerate(points):
        ax = axes[index // cols][index % cols]
        for rule, file in sorted(files[at].items()):
            xs, ys, n = _read_curve(file, column)
            ax.plot(xs, ys, lw=1.1, label=f"{rule} (n={n})", color=RULE_COLOURS.get(rule))
            for claim in claims or []:
                if at is None and rule in claim.get("paper_acc", {}) and column == "test_acc":
                    value, band = claim["paper_acc"][rule], claim["band"][rule]
                    colour = RULE_COLOURS.get(rule, "grey")
                    ax.axhline(value, ls="--", lw=0.8, color=colour)
                    ax.axhspan(value - band, value + band, color=colour, alpha=0.08, lw=0)
        if at is not None:
            ax.set_title(f"{param} = {at}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
        if index % cols == 0:
            ax.set_ylabel("test accuracy %" if column == "test_acc" else column, fontsize=8)
        if index == 0:
            ax.legend(fontsize=7, **LEGEND)
    for index in range(len(points), rows * cols):
        axes[index // cols][index % cols].set_visible(False)
    title = f"{experiment} ({profile}): learning curves, mean over seeds"
    if claims:
        title += "\n" + "; ".join(f"{c['id']}: {c['verdict']}" for c in claims)
        if any(c.get("paper_acc") for c in claims):
            title += " (dashed: paper value, shaded: tolerance)"
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)


def draw_learning_curves(results_dir: Path, summaries: dict, profile: str, experiment: str,
                         claims: list[dict] | None = None) -> tuple[Path | None, str]:
    """figures/learning_curves_<profile>_<experiment>.png, or why it is not drawn."""
    path = Path(results_dir) / "figures" / f"learning_curves_{profile}_{experiment}.png"
    summary = summaries.get(profile) or {}
    exp = (summary.get("experiments") or {}).get(experiment)
    why = ("no summary" if not summary else "absent from the summary" if exp is None
           else f"NOT RUN: {exp['not_run']}" if exp.get("not_run") else "")
    drawn = None if why else plot_learning_curves(results_dir, summary, profile, experiment, path,
                                                  claims=claims)
    if drawn is None:
        path.unlink(missing_ok=True)
        return None, why or "no learning curves (task sequences log per task, or no finished run)"
    return drawn, ""


def draw_figure(results_dir: Path, summaries: dict, spec: dict) -> tuple[Path | None, str]:
    """Draw one figure spec; returns (path or None, why not drawn)."""
    path = Path(results_dir) / "figures" / f"{spec['name']}.png"
    summary = summaries.get(spec["profile"])
    if summary is None:
        return None, f"profile {spec['profile']} has no committed summary"
    exp = summary.get("experiments", {}).get(spec["experiment"])
    if exp is None:
        return None, f"{spec['experiment']} absent from the {spec['profile']} summary"
    if exp.get("not_run"):
        return None, f"NOT RUN: {exp['not_run']}"
    drawers = {"sweep": lambda: plot_sweep(summary, spec, path),
               "curve": lambda: plot_curves(results_dir, spec, path, summary),
               "task_matrix": lambda: plot_task_matrix(results_dir, spec, path, summary),
               "pruning": lambda: plot_pruning(summary, spec, path),
               "history": lambda: plot_history(results_dir, spec, path, summary)}
    drawn = drawers[spec["kind"]]()
    if drawn is None:
        path.unlink(missing_ok=True)  # no stale figure of runs that are gone
        return None, "no finished runs yet"
    return drawn, ""
