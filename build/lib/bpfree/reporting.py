"""Markdown tables of paper value / reproduced value / tolerance / verdict.

Why generated, never hand-edited: the tables are the project's public claim; rendering
them from claims.yaml and the committed summaries means a table cannot say PASS unless
the claim test (which uses the same verdict code) passes too.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from tabulate import tabulate

from bpfree.claims import (CANNOT_FAIL_SPREADS, CLAIMS_FILE, DIVERGED, FAIL, PASS, VERDICTS, ClaimResult,
                           cannot_fail, evaluate_all, load_registry, natural_key, load_summaries)
from bpfree.provenance import atomic_write_text

COLUMNS = ["claim", "rule", "paper value", "reproduced mean ± std", "seeds", "tolerance",
           "verdict", "profile", "data variant", "notes"]


def _md(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def claims_table(results: list[ClaimResult]) -> str:
    rows = []
    for res in results:
        for r in res.rows:
            notes = r.notes
            if cannot_fail(r):
                kept = res.claim.cannot_fail.get(r.rule, "not declared")
                notes = (f"CANNOT FAIL: the bound lies {r.margin / max(r.spread, 1e-12):.0f} observed spreads beyond "
                         f"every seed; kept because: {' '.join(kept.split())}; {notes}")
            elif r.margin is not None and r.spread:
                notes = f"worst seed {r.margin:+.3g} inside the bound = {r.margin / r.spread:+.1f} spreads; {notes}"
            rows.append([_md(x) for x in (r.claim, r.rule, r.paper, r.reproduced, r.seeds,
                                           r.tolerance, r.verdict, r.profile, r.data_variant,
                                           notes)])
    return tabulate(rows, headers=COLUMNS, tablefmt="github", disable_numparse=True)


def sweep_table(summary: dict | None, spec: dict) -> str:
    """Rows = sweep values, columns = rules, cells = mean ± standard error (n repeats); with
    `per_seed: true` each seed's value follows in brackets, so one dead seed cannot hide in a mean."""
    missing = _not_run_text(summary, spec)
    if missing:
        return missing
    exp = summary["experiments"][spec["experiment"]]
    digits = int(spec.get("digits", 2))
    cells: dict = {}
    rules: list[str] = []
    for entry in exp.get("rules", {}).values():
        if "sweep_value" not in entry:
            continue
        rule, value = entry["rule"], entry["sweep_value"]
        if rule not in rules:
            rules.append(rule)
        stats = (entry.get("scalar_stats") or {}).get(spec["metric"]) or {}
        total = len(entry.get("status", {}))
        if stats.get("mean") is None:
            cells[(value, rule)] = "—"
        else:
            text = f"{stats['mean']:.{digits}f} ± {stats['se']:.{digits}f}" if stats["n"] > 1 \
                else f"{stats['mean']:.{digits}f}"
            text += "" if stats["n"] == total else f" ({stats['n']}/{total})"
            if spec.get("per_seed"):
                per_seed = (entry.get("scalars") or {}).get(spec["metric"]) or {}
                text += " [" + " / ".join(f"{v:.{digits}f}" for v in per_seed.values() if v is not None) + "]"
            cells[(value, rule)] = text
    values = (exp.get("sweep") or {}).get("values", [])
    label = (exp.get("sweep") or {}).get("param", "sweep").rsplit(".", 1)[-1]
    rows = [[v] + [cells.get((v, r), "—") for r in rules] for v in values]
    return tabulate(rows, headers=[label] + rules, tablefmt="github", disable_numparse=True)


SPREADS = {"se": ("standard error", lambda st: st["se"]), "std": ("std", lambda st: st["std"]),
           "half_std": ("half std", lambda st: st["std"] / 2)}


def _not_run_text(summary: dict | None, spec: dict) -> str | None:
    exp = (summary or {}).get("experiments", {}).get(spec["experiment"])
    if summary is None:
        return f"_NOT RUN: profile {spec['profile']} has no committed summary_"
    if exp is None:
        return f"_NOT RUN: {spec['experiment']} absent from the {spec['profile']} summary_"
    if exp.get("not_run"):
        return f"_NOT RUN in profile {spec['profile']}: {_md(exp['not_run'])}_"
    return None


def metric_table(summary: dict | None, spec: dict) -> str:
    """Rows = rules, columns = metrics, cells = mean ± spread over seeds (n/total when partial)."""
    missing = _not_run_text(summary, spec)
    if missing:
        return missing
    exp = summary["experiments"][spec["experiment"]]
    digits = int(spec.get("digits", 2))
    _, spread = SPREADS[spec.get("spread", "se")]
    rows = []
    for rule, entry in exp.get("rules", {}).items():
        row, total = [rule], len(entry.get("status", {}))
        for metric in spec["metrics"]:
            st = (entry.get("scalar_stats") or {}).get(metric) or {}
            if st.get("mean") is None:
                row.append("—")
                continue
            text = f"{st['mean']:.{digits}f}" + (f" ± {spread(st):.{digits}f}" if st["n"] > 1 else "")
            row.append(text + ("" if st["n"] == total else f" ({st['n']}/{total})"))
        rows.append(row)
    return tabulate(rows, headers=["rule"] + list(spec["metrics"]), tablefmt="github", disable_numparse=True)


PROTOCOLS_FILE = Path(__file__).with_name("protocols.yaml")
PROTOCOL_COLUMNS = ["setting", "paper", "authors' code", "ours", "why"]


def load_protocols(path: str | Path = PROTOCOLS_FILE) -> dict[str, list[dict]]:
    """paper key -> protocol tables (setting | paper | authors' code | ours | why)."""
    from bpfree.config import load_yaml
    protocols = load_yaml(path) or {}
    for key, tables in protocols.items():
        for table in tables:
            for row in table["rows"]:
                if len(row) != len(PROTOCOL_COLUMNS):
                    raise ValueError(f"{path}: {key} {table['experiment']}: row {row[:1]} needs "
                                     f"{len(PROTOCOL_COLUMNS)} cells ({', '.join(PROTOCOL_COLUMNS)})")
    return protocols


def protocol_section(tables: list[dict]) -> list[str]:
    lines = ["## Protocol: the paper, the authors' code and ours", "",
             "From `bpfree/protocols.yaml`; file:line refer to the authors' repositories named there. "
             "OPEN marks a difference not yet removed.", ""]
    for table in tables:
        rows = [[_md(cell) for cell in row] for row in table["rows"]]
        lines += [f"### {table['title']}", "", f"Experiment `{table['experiment']}`.", "",
                  tabulate(rows, headers=PROTOCOL_COLUMNS, tablefmt="github", disable_numparse=True), ""]
    return lines


def render_paper(key: str, meta: dict, results: list[ClaimResult], summaries: dict | None = None,
                 figures: dict | None = None, protocols: list[dict] | None = None,
                 curves: dict | None = None, documented=()) -> str:
    lines = [f"# {meta.get('title', key)}", ""]
    for src in meta.get("sources", []):
        lines.append(f"- {src}")
    lines += ["", "Generated by `python -m stages.tables` from `bpfree/claims.yaml` and "
              "`results/<profile>/summary.json`; do not edit by hand.", "",
              "Metric units are percent points. Reproduced values are means over seeds of the "
              "test accuracy (or error) at the epoch the experiment's `selection` picks.", ""]
    if protocols:
        lines += protocol_section(protocols)
    lines += ["## Claims", ""]
    for res in results:
        c = res.claim
        lines.append(f"### {c.id}: {res.verdict}")
        lines.append("")
        lines.append(f"- provenance: {c.provenance['kind']} — {c.provenance['source']}")
        lines.append(f"- data: {c.dataset}; architecture: {c.architecture}")
        lines.append(f"- metric: `{c.metric}` ({c.kind}); profile `{c.profile}`; experiment "
                     f"`{c.experiment}`; protocol shortened in this profile: "
                     f"{'YES' if c.shortened else 'no'}")
        lines.append(f"- tolerance reason: {' '.join(c.tolerance_reason.split())}")
        if res.reason:
            lines.append(f"- verdict reason: {res.reason}")
        lines.append("")
    lines += ["## Table", "", claims_table(results), ""]
    if meta.get("metric_tables"):
        lines += ["## Results by rule", ""]
        for spec in meta["metric_tables"]:
            label = SPREADS[spec.get("spread", "se")][0]
            lines += [f"### {spec['title']}", "",
                      f"`{spec['experiment']}`, profile `{spec['profile']}`; mean ± {label} over seeds", "",
                      metric_table((summaries or {}).get(spec["profile"]), spec), ""]
    if meta.get("sweep_tables"):
        lines += ["## Results by sweep", "",
                  "Mean ± standard error over repeats; (k/n) marks cells where only k of n "
                  "repeats have finished.", ""]
        for spec in meta["sweep_tables"]:
            lines += [f"### {spec['title']}", "",
                      f"`{spec['experiment']}`, profile `{spec['profile']}`, metric `{spec['metric']}`", "",
                      sweep_table((summaries or {}).get(spec["profile"]), spec), ""]
    names = [spec["name"] for spec in meta.get("figures") or []]
    drawn = [(n, (figures or {}).get(n, (None, "not drawn"))) for n in names]
    drawn += [(f"learning_curves_{p}_{e}", (curves or {}).get((p, e), (None, "not drawn")))
              for p, e in claims_used(results)]
    if drawn:
        lines += ["## Figures", ""]
        for name, (path, why) in drawn:
            lines += [f"![{name}](../figures/{name}.png)", ""] if path is not None else \
                [f"- `{name}`: not drawn ({_md(why)[:200]})", ""]
    lines += ["## Provenance", "", provenance_table(summaries or {}, claims_used(results), documented), ""]
    return "\n".join(lines)


# What a reader needs from the front page: is the claim reproduced, and if not, what would
# change that (a fix, a bigger budget, data we cannot reach, a GPU window, runs in progress)?
CLASSES = ("PASS", "PASS cannot fail", "FAIL open", "FAIL budget", "DIVERGED", "NOT RUN data absent",
           "NOT RUN gpu pending", "NOT RUN runs pending")


def _shortened(res: ClaimResult, summaries: dict) -> bool:
    exp = (summaries.get(res.claim.profile) or {}).get("experiments", {}).get(res.claim.experiment) or {}
    return bool(exp.get("shortened", res.claim.shortened))


def status_class(res: ClaimResult, results: list[ClaimResult], summaries: dict,
                 datasets: dict[str, str], absent: dict[str, str]) -> tuple[str, str]:
    """(class, note): FAIL budget when the profile ran a shortened protocol (noting a claim on
    the same experiment that passes at the full one); NOT RUN split by why."""
    c = res.claim
    if res.verdict == PASS:
        vacuous = [r.rule for r in res.rows if cannot_fail(r)]
        if vacuous:
            return "PASS cannot fail", (f"{', '.join(vacuous)}: bound beyond {CANNOT_FAIL_SPREADS:g} observed "
                                        f"spreads of every seed")
        return PASS, ""
    if res.verdict == DIVERGED:
        return DIVERGED, ""
    if res.verdict == FAIL:
        if not _shortened(res, summaries):
            return "FAIL open", ""
        full = sorted({o.claim.profile for o in results if o is not res and o.claim.experiment == c.experiment
                       and o.verdict == PASS and not _shortened(o, summaries)})
        return "FAIL budget", (f"passes at the full protocol on profile {', '.join(full)}" if full
                               else "no full-protocol pass yet")
    dataset = datasets.get(c.experiment)
    if dataset in absent:
        return "NOT RUN data absent", f"{dataset}: {absent[dataset]}"
    return ("NOT RUN gpu pending", "") if c.profile == "gpu" else ("NOT RUN runs pending", "")


def _first_sentence(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split())
    cut = text.find(". ")
    text = text if cut < 0 else text[:cut + 1]
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def short_reason(res: ClaimResult) -> str:
    """The failing rows (reproduced vs paper, tolerance) and the first sentence of a known
    failure's explanation; or the NOT RUN reason."""
    if res.verdict == PASS:
        why = [res.claim.cannot_fail[r.rule] for r in res.rows if cannot_fail(r) and r.rule in res.claim.cannot_fail]
        return f"Kept: {_first_sentence(why[0], 160)}" if why else ""
    bad = [r for r in res.rows if r.verdict not in (PASS, "NOT RUN")] or [r for r in res.rows if r.verdict != PASS]
    parts = []
    for r in bad[:2]:
        if r.verdict in (FAIL, DIVERGED) and r.reproduced not in ("", "—"):
            paper = f" vs {r.paper}" if res.claim.kind != "comparison" else ""
            parts.append(f"{r.rule}: {r.reproduced}{paper} (tolerance {r.tolerance})")
        else:
            parts.append(f"{r.rule}: {r.verdict}")
    if len(bad) > 2:
        parts.append(f"{len(bad) - 2} more rows")
    known = next((res.claim.known_failures.get(r.rule) or res.claim.known_failures.get(r.rule.split(" vs ")[0])
                  for r in bad if res.claim.known_failures.get(r.rule)
                  or res.claim.known_failures.get(r.rule.split(" vs ")[0])), None)
    text = "; ".join(parts) if res.verdict != "NOT RUN" else _first_sentence(res.reason, 160)
    if known:
        text += f". Known: {_first_sentence(known, 160)}"
    return text


def verdict_counts(results: list[ClaimResult]) -> dict[str, int]:
    counts = Counter(r.verdict for r in results)
    return {v: counts.get(v, 0) for v in VERDICTS}


def _runs_overview(summaries: dict[str, dict]) -> str:
    """Every profile's runs, claimed or not: smoke numbers are a regression baseline, not claims."""
    rows = []
    for profile, summary in sorted(summaries.items()):
        for exp_id, exp in summary.get("experiments", {}).items():
            for rule, e in exp.get("rules", {}).items():
                st = e.get("selected_test_acc_stats", {})
                statuses = Counter(e.get("status", {}).values())
                rows.append([profile, exp_id, rule,
                             "—" if st.get("mean") is None else f"{st['mean']:.2f} ± {st['std']:.2f}",
                             st.get("n", 0), ", ".join(f"{k} {v}" for k, v in sorted(statuses.items(), key=lambda kv: natural_key(kv[0]))),
                             "yes" if exp.get("shortened") else "no"])
    if not rows:
        return "_no summaries under results/ yet_"
    return tabulate(rows, headers=["profile", "experiment", "rule", "selected test acc %",
                                   "seeds", "run status", "shortened"],
                    tablefmt="github", disable_numparse=True)


def _seeds_text(seeds: list[str]) -> str:
    return ", ".join(sorted(seeds, key=natural_key)) if len(seeds) <= 6 else f"{len(seeds)} seeds"


def provenance_table(summaries: dict[str, dict], used: list[tuple[str, str]], documented=()) -> str:
    """Where each number of a paper's claims came from: profile, seeds, device, data, commit.
    `documented`: profiles whose results/<profile>/PROVENANCE.md tells what a missing commit was."""
    rows = []
    for profile, exp_id in used:
        exp = (summaries.get(profile) or {}).get("experiments", {}).get(exp_id)
        if exp is None or exp.get("not_run"):
            why = "no summary" if exp is None else f"NOT RUN: {exp['not_run']}"
            rows.append([profile, exp_id, "—", "—", "—", "—", "—", _md(why)[:120]])
            continue
        finished, devices, commits = {}, set(), set()
        for rule, e in exp.get("rules", {}).items():
            ok = [seed for seed, status in e.get("status", {}).items() if status in ("OK", "DIVERGED")]
            finished[rule.split("@")[0]] = finished.get(rule.split("@")[0], set()) | set(ok)
            devices |= {e.get("device", {}).get(seed) for seed in ok}
            commits |= {e.get("commit", {}).get(seed) for seed in ok}
        seeds = sorted(set().union(*finished.values()), key=natural_key) if finished else []
        rows.append([profile, exp_id, ", ".join(sorted(finished)), _seeds_text(seeds),
                     "; ".join(sorted(d for d in devices if d)) or "—",
                     ", ".join(exp.get("data_variant") or []) or "—",
                     ", ".join(sorted(c for c in commits if c)).replace(
                         "unknown", f"unknown (see {profile}/PROVENANCE.md)" if profile in documented else "unknown") or "—",
                     "shortened: " + "; ".join(exp.get("deviations") or []) if exp.get("shortened") else ""])
    return tabulate(rows, headers=["profile", "experiment", "rules", "seeds", "device", "data variant",
                                   "commit", "protocol"], tablefmt="github", disable_numparse=True)


def claims_used(results: list[ClaimResult]) -> list[tuple[str, str]]:
    """(profile, experiment) pairs a paper's claims read, in claim order."""
    return list(dict.fromkeys((r.claim.profile, r.claim.experiment) for r in results))


def render_readme(papers: dict, by_paper: dict[str, list[ClaimResult]],
                  summaries: dict[str, dict], datasets: dict[str, str] | None = None,
                  absent: dict[str, str] | None = None) -> str:
    """The front page: one line per paper (claims by class), then per paper each claim's
    class and the short reason it is not PASS. Figures, provenance and the paper's full
    tables live on its page (tables/<paper>.md); smoke runs are a regression baseline and
    stay off this page."""
    datasets, absent = datasets or {}, absent or {}
    everything = [r for results in by_paper.values() for r in results]
    classes = {id(r): status_class(r, everything, summaries, datasets, absent) for r in everything}
    lines = ["# Results", "",
             "Generated by `python -m stages.tables`; do not edit by hand.", "",
             f"Profiles with a summary: {', '.join(sorted(summaries)) or 'none'}. Every number comes "
             "from `results/<profile>/runs/<experiment>/<run>/metrics.json` (seed, resolved config and "
             "its hash, code hash, data hash, device, package versions, git commit), summarised in "
             "`results/<profile>/summary.json`.", "",
             "Classes: **PASS cannot fail**: it passes, but a check's bound lies more than "
             f"{CANNOT_FAIL_SPREADS:g} observed spreads (std) beyond every seed, so these runs could not have "
             "failed it; **FAIL open**: the protocol ran as stated and the claim failed; **FAIL budget**: "
             "the profile runs a shortened protocol; **DIVERGED**: a run's loss exploded; **NOT RUN data "
             "absent**: the dataset is not reachable from these machines; **NOT RUN gpu pending**: waits "
             "for a GPU window; **NOT RUN runs pending**: its cpu runs have not finished.", "",
             "## Verdicts per paper", ""]
    rows, total = [], Counter()
    for key, results in by_paper.items():
        counts = Counter(classes[id(r)][0] for r in results)
        total.update(counts)
        anchor = key.replace("_", "-")
        rows.append([f"[{papers[key].get('title', key)}](#{anchor})", len(results),
                     *[counts.get(c, 0) or "" for c in CLASSES], f"[page](tables/{key}.md)"])
    rows.append(["**all**", sum(len(r) for r in by_paper.values()), *[total.get(c, 0) for c in CLASSES], ""])
    lines.append(tabulate(rows, headers=["paper", "claims", *CLASSES, "details"], tablefmt="github",
                          disable_numparse=True))
    for key, results in by_paper.items():
        meta = papers[key]
        counts = Counter(classes[id(r)][0] for r in results)
        lines += ["", f'<a id="{key.replace("_", "-")}"></a>', "", f"## {meta.get('title', key)}", "",
                  " · ".join(f"{c} {counts[c]}" for c in CLASSES if counts.get(c)) + "  ", 
                  f"Paper values, reproduced values, tolerances, figures, protocol tables and provenance: "
                  f"[tables/{key}.md](tables/{key}.md).", ""]
        crow = []
        for res in sorted(results, key=lambda r: CLASSES.index(classes[id(r)][0])):
            cls, note = classes[id(res)]
            reason = short_reason(res)
            crow.append([res.claim.id, res.claim.profile, cls, _md("; ".join(x for x in (note, reason) if x))])
        lines.append(tabulate(crow, headers=["claim", "profile", "class", "why"], tablefmt="github",
                              disable_numparse=True))
    lines += ["", "## Runs per profile", "", "cpu and gpu runs; the smoke profile's runs are listed in "
              "[tables/runs_smoke.md](tables/runs_smoke.md).", "",
              _runs_overview({p: s for p, s in summaries.items() if p != "smoke"}), ""]
    mismatches = [(p, m) for p, s in sorted(summaries.items()) for m in s.get("mismatches", [])]
    if mismatches:
        lines += ["## Checkpoint re-check mismatches", ""]
        lines += [f"- {p}: {m}" for p, m in mismatches]
        lines.append("")
    return "\n".join(lines)


def metrics_record(results: list[ClaimResult], summary: dict | None, profile: str) -> dict:
    """results/metrics/<profile>.json, a DVC metrics file: every claim row of this profile
    (paper value, reproduced value, tolerance, verdict) and each experiment's headline
    accuracy per rule (mean selected test accuracy over seeds)."""
    claims: dict[str, dict] = {}
    for res in results:
        if res.claim.profile != profile:
            continue
        entry = claims.setdefault(res.claim.id, {"verdict": res.verdict})
        for row in res.rows:
            entry[row.rule or "all"] = {"paper": row.paper, "reproduced": row.mean, "tolerance": row.tolerance,
                                        "verdict": row.verdict, "pass": int(row.verdict == "PASS")}
    experiments = {}
    for exp_id, exp in sorted(((summary or {}).get("experiments") or {}).items()):
        accs = {rule: (entry.get("selected_test_acc_stats") or {}).get("mean")
                for rule, entry in sorted((exp.get("rules") or {}).items())}
        experiments[exp_id] = {"selected_test_acc": {r: a for r, a in accs.items() if a is not None}}
    return {"profile": profile, "claims": claims, "experiments": experiments}


METRIC_PROFILES = ("smoke", "cpu", "gpu")


def figure_marks(res: ClaimResult) -> dict:
    """What a learning-curve figure shows of a claim: its verdict, and for absolute claims the
    paper's value as test accuracy with its band, per rule."""
    c, marks = res.claim, {"id": res.claim.id, "verdict": res.verdict}
    if c.kind == "absolute" and c.metric in ("test_acc_pct", "test_error_pct"):
        to_acc = (lambda v: 100.0 - v) if c.metric == "test_error_pct" else (lambda v: v)
        marks["paper_acc"] = {rule: to_acc(v) for rule, v in c.values.items()}
        marks["band"] = {rule: c.tolerance_for(rule) for rule in c.values}
    return marks


def check_marks(results: list[ClaimResult], profile: str, experiment: str) -> list[dict]:
    """What a claim figure shows of the checks on its experiment: every check's bound and
    verdict as a footnote line, and for checks on one value (a paper target with its band, or
    a min / max bound) a mark at the check's sweep point (`at`) in the rule's colour."""
    marks = []
    for res in results:
        c = res.claim
        if (c.profile, c.experiment) != (profile, experiment):
            continue
        if c.kind != "comparison":  # absolute / relative: a paper value and band per rule
            for row in res.rows:
                marks.append({"text": f"{c.id} {row.rule}: paper {row.paper}, {row.tolerance}: {row.verdict}"})
            continue
        for chk, row in zip(c.checks, res.rows):
            mark = {"text": f"{c.id} {row.rule}: {row.tolerance}: {row.verdict}", "rule": chk["rule"],
                    "at": None if chk.get("at") is None else str(chk["at"]),
                    "metric": chk.get("metric") or c.metric}
            if "target" in chk:
                mark.update(kind="target", value=chk["target"], band=chk["tolerance"])
            elif "min" in chk or "max" in chk:
                mark.update(kind="min" if "min" in chk else "max", value=chk.get("min", chk.get("max")))
            marks.append(mark)
    return marks


def experiment_datasets() -> dict[str, str]:
    """experiment -> dataset, from params.yaml (an experiment no profile ran is still classed)."""
    from bpfree.config import PARAMS_FILE, load_yaml
    try:
        return {k: v.get("dataset") for k, v in (load_yaml(PARAMS_FILE).get("experiments") or {}).items()}
    except (OSError, AttributeError):
        return {}


def datasets_absent(claims_path: str | Path = CLAIMS_FILE) -> dict[str, str]:
    """claims.yaml's datasets_absent: dataset -> why no machine here can read it."""
    from bpfree.config import load_yaml
    absent = load_yaml(claims_path).get("datasets_absent") or {}
    if not isinstance(absent, dict) or not all(isinstance(v, str) and v.strip() for v in absent.values()):
        raise ValueError(f"{claims_path}: datasets_absent must map each dataset to the reason it is absent")
    return absent


def write_reports(results_dir: str | Path = "results", claims_path: str | Path = CLAIMS_FILE) -> list[Path]:
    """results/tables/<paper>.md for every paper and results/README.md; returns the paths."""
    results_dir = Path(results_dir)
    papers, claims = load_registry(claims_path)
    summaries = load_summaries(results_dir)
    results = evaluate_all(claims, summaries)
    by_paper: dict[str, list[ClaimResult]] = {key: [] for key in papers}
    for res in results:
        by_paper[res.claim.paper].append(res)
    written, figures = [], {}
    (results_dir / "figures").mkdir(parents=True, exist_ok=True)  # a DVC output even when empty
    from bpfree.plots import draw_figure  # matplotlib only when figures are drawn
    for key, meta in papers.items():
        for spec in meta.get("figures") or []:
            verdicts = [f"{r.claim.id}: {r.verdict}" for r in results
                        if (r.claim.profile, r.claim.experiment) == (spec["profile"], spec["experiment"])]
            marks = check_marks(results, spec["profile"], spec["experiment"])
            figures[spec["name"]] = draw_figure(results_dir, summaries, {**spec, "verdicts": verdicts,
                                                                         "marks": marks})
            if figures[spec["name"]][0] is not None:
                written.append(figures[spec["name"]][0])
    from bpfree.plots import draw_learning_curves
    curves = {}
    for res in by_paper.values():
        for profile, experiment in claims_used(res):
            if (profile, experiment) not in curves:
                marks = [figure_marks(r) for r in results if (r.claim.profile, r.claim.experiment) == (profile, experiment)]
                curves[(profile, experiment)] = draw_learning_curves(results_dir, summaries, profile, experiment, marks)
                if curves[(profile, experiment)][0] is not None:
                    written.append(curves[(profile, experiment)][0])
    protocols = load_protocols() if Path(claims_path).resolve() == CLAIMS_FILE.resolve() else {}
    documented = [p for p in summaries if (results_dir / p / "PROVENANCE.md").is_file()]
    for key, res in by_paper.items():
        paper_figures = {s["name"]: figures[s["name"]] for s in papers[key].get("figures") or []}
        written.append(atomic_write_text(results_dir / "tables" / f"{key}.md",
                                         render_paper(key, papers[key], res, summaries, paper_figures,
                                                      protocols.get(key), curves, documented)))
    written.append(atomic_write_text(results_dir / "tables" / "runs_smoke.md", "\n".join([
        "# Smoke-profile runs", "", "The smoke profile is a regression baseline (tiny budgets, "
        "checked by `bpfree verify`), not a reproduction.", "",
        _runs_overview({p: s for p, s in summaries.items() if p == "smoke"}), ""])))
    import json
    for profile in METRIC_PROFILES:
        record = metrics_record(results, summaries.get(profile), profile)
        written.append(atomic_write_text(results_dir / "metrics" / f"{profile}.json",
                                         json.dumps(record, indent=2, sort_keys=True) + "\n"))
    datasets, absent = experiment_datasets(), datasets_absent(claims_path)
    written.append(atomic_write_text(results_dir / "README.md",
                                     render_readme(papers, by_paper, summaries, datasets, absent)))
    return written
