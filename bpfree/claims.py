"""The claims registry and the verdict logic.

Why its own module with no training imports: a verdict must depend only on the claim and
on committed summaries, so CI can judge every claim in milliseconds without torch work,
and the same code produces the tables and the claim tests.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bpfree.layout import natural_key  # noqa: F401  (re-exported: reporting and tests use it from here)

CLAIMS_FILE = Path(__file__).with_name("claims.yaml")
PROVENANCE_KINDS = ("table", "repo-output", "figure", "qualitative")
KINDS = ("absolute", "relative", "comparison")
PROFILES = ("smoke", "cpu", "gpu")
PASS, FAIL, DIVERGED, NOT_RUN = "PASS", "FAIL", "DIVERGED", "NOT RUN"
VERDICTS = (PASS, FAIL, DIVERGED, NOT_RUN)
# metric name -> (summary stats key, per-seed transform of the selected test accuracy)
METRICS = {
    "test_error_pct": ("test_error_stats", lambda acc: 100.0 - acc),
    "test_acc_pct": ("selected_test_acc_stats", lambda acc: acc),
}
_REQUIRED = ("id", "paper", "provenance", "experiment", "dataset", "architecture", "metric",
             "kind", "profile", "shortened", "values", "tolerance_reason")
# Per-run scalars the evaluate stage records (stages/evaluate.py run_scalars); a layer name
# follows the slash, e.g. conservation_deviation/fc1.
SCALARS = ("test_acc_pct", "test_error_pct", "final_train_acc_pct", "final_train_loss",
           "final_test_loss", "mean_task_acc_pct", "mean_layer_gini",
           "sign_flip_pct", "source_test_acc_pct")  # the last two: transfer runs
LAYER_SCALARS = ("conservation_deviation", "conservation_excluded", "weight_feedback_angle_deg",
                 "update_gradient_angle_deg", "initial_conservation_deviation",
                 "initial_weight_feedback_angle_deg", "initial_update_gradient_angle_deg",
                 "task_drop_pct")  # task_drop_pct/<t>: accuracy change of task t by the end
COMPARISON_BOUNDS = ("max", "min", "at_most", "at_least", "within", "closer_to", "target")


def known_metric(name: str) -> bool:
    if name.startswith("pruned_acc_") and "/" in name:  # pruned_acc_<method>/<fraction>
        return True
    return name in METRICS or name in SCALARS or (
        "/" in name and name.split("/", 1)[0] in LAYER_SCALARS and bool(name.split("/", 1)[1]))


class ClaimsError(ValueError):
    """claims.yaml is malformed; the message names the claim and the field."""


@dataclass
class Claim:
    id: str
    paper: str
    provenance: dict
    experiment: str
    dataset: str
    architecture: str
    metric: str
    kind: str
    profile: str
    shortened: bool
    values: dict[str, float]
    tolerance_reason: str
    tolerance: dict[str, float] = field(default_factory=dict)
    reference_rule: str | None = None
    checks: list[dict] = field(default_factory=list)
    # rule -> why it does not reproduce. The table still says FAIL; the claim test expects
    # exactly these failures, so a new failure (a regression) or a fixed one both show up.
    # For comparison claims the keys are check labels (see check_label).
    known_failures: dict[str, str] = field(default_factory=dict)
    statement: str = ""  # comparison claims: the paper's qualitative statement
    # check label -> why a passing check the runs cannot fail (see cannot_fail) is kept; the
    # claim test expects exactly these, and the front page does not count them as PASS.
    cannot_fail: dict[str, str] = field(default_factory=dict)

    @property
    def rules(self) -> list[str]:
        if self.kind == "relative":
            return [self.reference_rule] + [c["rule"] for c in self.checks]
        if self.kind == "comparison":
            names = []
            for c in self.checks:
                for r in (c["rule"], (c.get("ref") or {}).get("rule"), c.get("closer_to"), c.get("than")):
                    if r and r not in names:
                        names.append(r)
            return names
        return list(self.values)

    def tolerance_for(self, rule: str) -> float:
        return float(self.tolerance.get(rule, self.tolerance["default"]))


@dataclass
class Row:
    """One line of a claims table: a rule (absolute) or a rule-vs-reference check (relative)."""

    claim: str
    rule: str
    paper: str
    reproduced: str
    seeds: str
    tolerance: str
    verdict: str
    profile: str
    data_variant: str
    notes: str
    mean: float | None = None
    reason: str = ""  # why the row is not PASS/FAIL (NOT RUN / DIVERGED), for the claim summary
    # For checks against a bound: how far the worst observed seed lies inside it (negative:
    # outside), and the observed spread (std, pooled over the compared sides): a check whose
    # bound sits many spreads from every observed value cannot be failed by the runs
    # (bpfree.claims.cannot_fail).
    margin: float | None = None
    spread: float | None = None


@dataclass
class ClaimResult:
    claim: Claim
    verdict: str
    rows: list[Row]
    reason: str = ""


# ----------------------------------------------------------------------------- loading
def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ClaimsError(f"{where}: {msg}")


def seed_list(seeds) -> str:
    """Seeds as short text, runs of consecutive integers as ranges: "1-24, 30" (100 seeds
    would otherwise fill a table cell)."""
    out, run = [], []
    for s in sorted(seeds, key=natural_key):
        if str(s).isdigit() and run and int(s) == int(run[-1]) + 1:
            run.append(s)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}{', ' if len(run) == 2 else '-'}{run[-1]}")
        run = [s] if str(s).isdigit() else []
        if not run:
            out.append(str(s))
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}{', ' if len(run) == 2 else '-'}{run[-1]}")
    return ", ".join(out)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_registry(path: str | Path = CLAIMS_FILE) -> tuple[dict, list[Claim]]:
    """Papers and claims, validated: a malformed claim must not silently never be checked."""
    from bpfree.config import ConfigError, load_yaml
    try:
        raw = load_yaml(path)  # a key given twice (two known_failures for one rule) is an error
    except ConfigError as error:
        raise ClaimsError(str(error)) from None
    _check(isinstance(raw, dict) and "claims" in raw and "papers" in raw, str(path),
           "needs top-level 'papers' and 'claims'")
    papers = raw["papers"]
    claims, seen = [], set()
    for i, c in enumerate(raw["claims"]):
        where = f"claims[{i}] ({c.get('id', '?') if isinstance(c, dict) else '?'})"
        _check(isinstance(c, dict), where, "must be a mapping")
        if isinstance(c, dict) and c.get("kind") == "comparison":
            c.setdefault("values", {})  # qualitative statements have no paper numbers
        for key in _REQUIRED:
            _check(key in c, where, f"missing field {key!r}")
        _check(c["id"] not in seen, where, "duplicate id")
        seen.add(c["id"])
        _check(c["paper"] in papers, where, f"paper {c['paper']!r} not in papers {sorted(papers)}")
        prov = c["provenance"]
        _check(isinstance(prov, dict) and prov.get("kind") in PROVENANCE_KINDS and prov.get("source"),
               where, f"provenance needs kind in {PROVENANCE_KINDS} and a source")
        _check(c.get("kind") in KINDS, where, f"kind {c.get('kind')!r} not in {KINDS}")
        if c["kind"] == "comparison":
            c.setdefault("values", {})
        _check(known_metric(c.get("metric", "")) if c["kind"] == "comparison" else c.get("metric") in METRICS,
               where, f"metric {c.get('metric')!r} not in {sorted(METRICS)} (comparison claims may "
                      f"also use {list(SCALARS)} or <{'|'.join(LAYER_SCALARS)}>/<layer>)")
        _check(c["profile"] in PROFILES, where, f"profile {c['profile']!r} not in {PROFILES}")
        _check(isinstance(c["shortened"], bool), where, "shortened must be true/false")
        _check(isinstance(c["values"], dict) and (c["values"] or c["kind"] == "comparison")
               and all(_number(v) for v in c["values"].values()), where, "values: rule -> number")
        _check(isinstance(c["tolerance_reason"], str) and c["tolerance_reason"].strip(), where,
               "every tolerance needs a reason")
        claim = Claim(**{k: c[k] for k in _REQUIRED},
                      tolerance=c.get("tolerance") or {}, reference_rule=c.get("reference_rule"),
                      checks=c.get("checks") or [], known_failures=c.get("known_failures") or {},
                      statement=" ".join(str(c.get("statement", "")).split()),
                      cannot_fail=c.get("cannot_fail") or {})
        if claim.kind == "comparison":
            _validate_comparison(claim, where)
            claims.append(claim)
            continue
        _check(isinstance(claim.known_failures, dict)
               and all(r in claim.values and isinstance(why, str) and why.strip()
                       for r, why in claim.known_failures.items()), where,
               "known_failures: rule (with a paper value) -> non-empty reason")
        if claim.kind == "absolute":
            tol = claim.tolerance
            _check(isinstance(tol, dict) and _number(tol.get("default")) and tol["default"] >= 0
                   and all(_number(v) and v >= 0 for v in tol.values()), where,
                   "absolute claims need tolerance {default: number >= 0, <rule>: ...}")
        else:
            _check(claim.reference_rule in claim.values, where,
                   "relative claims need reference_rule with a paper value")
            _check(bool(claim.checks), where, "relative claims need checks")
            for j, chk in enumerate(claim.checks):
                w = f"{where}.checks[{j}]"
                _check(isinstance(chk, dict) and chk.get("rule") in claim.values, w,
                       "check needs a rule that has a paper value")
                bounds = [k for k in ("within", "at_least") if k in chk]
                _check(len(bounds) == 1 and _number(chk[bounds[0]]) and chk[bounds[0]] >= 0, w,
                       "exactly one of within / at_least, a number >= 0")
        claims.append(claim)
    return papers, claims


def check_label(chk: dict) -> str:
    """A check's name in tables and known_failures: its id, or rule@point[ vs ref@point]."""
    if chk.get("id"):
        return str(chk["id"])
    def point(rule, at, metric):
        if isinstance(at, list):
            at = "{" + ",".join(map(str, at)) + "}"
        return f"{rule}" + (f"@{at}" if at is not None else "") + (f"[{metric}]" if metric else "")
    label = point(chk["rule"], chk.get("at"), chk.get("metric"))
    ref = chk.get("ref")
    if ref:
        label += " vs " + point(ref.get("rule", chk["rule"]), ref.get("at", chk.get("at")), ref.get("metric"))
    if chk.get("closer_to"):
        label += f" closer to {chk['closer_to']} than {chk['than']}"
    return label


def _validate_comparison(claim: Claim, where: str) -> None:
    _check(bool(claim.statement), where, "comparison claims need the paper's statement")
    _check(bool(claim.checks), where, "comparison claims need checks")
    labels = []
    for j, chk in enumerate(claim.checks):
        w = f"{where}.checks[{j}]"
        _check(isinstance(chk, dict) and isinstance(chk.get("rule"), str), w, "check needs a rule")
        bounds = [k for k in COMPARISON_BOUNDS if k in chk]
        _check(len(bounds) == 1, w, f"exactly one of {COMPARISON_BOUNDS}")
        bound = bounds[0]
        if bound == "closer_to":
            _check(isinstance(chk.get("than"), str) and "ref" not in chk, w,
                   "closer_to needs than: <rule> and no ref")
        elif bound == "target":
            _check(_number(chk["target"]) and _number(chk.get("tolerance")) and chk["tolerance"] >= 0
                   and "ref" not in chk, w, "target (the paper's number) needs tolerance >= 0 and no ref")
        else:
            _check(_number(chk[bound]), w, f"{bound} must be a number")
            needs_ref = bound in ("at_most", "at_least", "within")
            _check(needs_ref == isinstance(chk.get("ref"), dict), w,
                   "at_most / at_least / within compare with a ref: {rule, at, metric}; "
                   "max / min bound the value itself")
        if "margin_se" in chk:
            _check(bound in ("at_least", "at_most") and _number(chk["margin_se"]) and chk["margin_se"] > 0, w,
                   "margin_se (a number > 0) clears an at_least / at_most bound by that many standard "
                   "errors of the difference")
        for m in (chk.get("metric"), (chk.get("ref") or {}).get("metric")):
            _check(m is None or known_metric(m), w, f"unknown metric {m!r}")
        labels.append(check_label(chk))
    _check(len(set(labels)) == len(labels), where, "check labels must be unique (give an id)")
    _check(isinstance(claim.known_failures, dict)
           and all(k in labels and isinstance(v, str) and v.strip() for k, v in claim.known_failures.items()),
           where, f"known_failures: check label (one of {labels}) -> non-empty reason")


def load_claims(path: str | Path = CLAIMS_FILE) -> list[Claim]:
    return load_registry(path)[1]


def load_summaries(results_dir: str | Path = "results") -> dict[str, dict]:
    """Every profile's summary present under results/ (committed cpu/gpu ones included)."""
    if not Path(results_dir).is_dir():
        raise ClaimsError(f"results directory {results_dir} not found: give --results the folder that "
                          f"holds <profile>/summary.json (default: results)")
    out = {}
    for path in sorted(Path(results_dir).glob("*/summary.json")):
        try:
            with open(path) as fh:
                out[path.parent.name] = json.load(fh)
        except ValueError as error:
            raise ClaimsError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}; truncated?): "
                              f"rebuild it with `python -m stages.evaluate --profile {path.parent.name}`") from None
    return out


# ----------------------------------------------------------------------------- verdicts
def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _signed(v: float) -> str:
    return f"{v:+.2f}"


@dataclass
class _RuleData:
    status: str  # OK | DIVERGED | NOT RUN
    reason: str = ""
    mean: float | None = None
    std: float | None = None
    n: int = 0
    per_seed: dict = field(default_factory=dict)
    best_test: float | None = None
    se: float | None = None


def _rule_data(claim: Claim, rule: str, summaries: dict, metric: str | None = None) -> _RuleData:
    """A rule's (or a "rule@sweep=value" entry's) numbers for this claim's metric."""
    metric = metric or claim.metric
    summary = summaries.get(claim.profile)
    if summary is None:
        return _RuleData(NOT_RUN, f"no results/{claim.profile}/summary.json: profile "
                                  f"'{claim.profile}' has not been run and committed")
    exp = summary.get("experiments", {}).get(claim.experiment)
    if exp is None:
        return _RuleData(NOT_RUN, f"experiment {claim.experiment} absent from the {claim.profile} summary")
    if exp.get("not_run"):
        return _RuleData(NOT_RUN, f"{claim.experiment} not run in profile {claim.profile}: {exp['not_run']}")
    entry = exp.get("rules", {}).get(rule)
    if entry is None:
        return _RuleData(NOT_RUN, f"rule {rule} not run in {claim.experiment} ({claim.profile})")
    statuses = entry.get("status", {})
    if any(s == "DIVERGED" for s in statuses.values()):
        bad = sorted((s for s, st in statuses.items() if st == "DIVERGED"), key=natural_key)
        return _RuleData(DIVERGED, f"seed(s) {seed_list(bad)} diverged")
    missing = sorted((s for s, st in statuses.items() if st != "OK"), key=natural_key)
    if len(missing) == len(statuses):
        return _RuleData(NOT_RUN, f"no finished run ({seed_list(missing) or 'no seeds'})")
    unstable = _unstable_text(entry)
    if metric not in METRICS or claim.kind == "comparison":  # per-run scalars
        stats = (entry.get("scalar_stats") or {}).get(metric)
        if not stats or stats.get("mean") is None:
            return _RuleData(NOT_RUN, f"{rule} in {claim.experiment} ({claim.profile}) has no {metric}")
        per_seed = {s: v for s, v in (entry.get("scalars") or {}).get(metric, {}).items()
                    if v is not None and statuses.get(s) == "OK"}
        reason = (f"INCOMPLETE: {len(per_seed)} of {len(statuses)} seeds ran "
                  f"(missing {seed_list(missing)})") if missing else ""
        return _RuleData("OK", reason=_join(reason, unstable), mean=stats["mean"], std=stats["std"],
                         n=stats["n"], per_seed=per_seed, se=stats.get("se"))
    stats_key, transform = METRICS[metric]
    stats = entry[stats_key]
    per_seed = {s: transform(v) for s, v in entry["selected_test_acc"].items() if v is not None}
    best = entry.get("best_test_acc_test_selected_stats", {}).get("mean")
    # A partly run claim is judged on the seeds that finished, and says so: hiding finished
    # numbers behind NOT RUN would be less honest than showing them with their seed count.
    reason = (f"INCOMPLETE: {len(per_seed)} of {len(statuses)} seeds ran "
              f"(missing {seed_list(missing)})") if missing else ""
    return _RuleData("OK", reason=_join(reason, unstable), mean=stats["mean"], std=stats["std"], n=stats["n"],
                     per_seed=per_seed, best_test=None if best is None else transform(best))


def _unstable_text(entry: dict) -> str:
    """UNSTABLE seeds: their training loss rose 10-fold over the first epoch's and came back
    under the divergence bounds (bpfree.training); counted, and said."""
    flagged = {seed: x for seed, x in (entry.get("loss_instability") or {}).items()
               if x.get("diverged_epoch") is None and x.get("unstable_epoch") is not None}
    if not flagged:
        return ""
    return "UNSTABLE: " + ", ".join(f"seed {seed} (loss {x['peak_ratio']:.0f}x its first epoch's, from epoch "
                                    f"{x['unstable_epoch']})"
                                    for seed, x in sorted(flagged.items(), key=lambda kv: natural_key(kv[0])))


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


def _notes(claim: Claim, summaries: dict, extra: list[str]) -> str:
    notes = [f"{claim.provenance['kind']}"]
    exp = summaries.get(claim.profile, {}).get("experiments", {}).get(claim.experiment)
    if exp is not None:
        if exp.get("shortened"):
            notes.append("SHORTENED protocol: " + "; ".join(exp.get("deviations", [])))
        if bool(exp.get("shortened")) != claim.shortened:
            notes.append(f"WARNING: claims.yaml says shortened={claim.shortened}, the run's "
                         f"config says {bool(exp.get('shortened'))}")
        notes.append(f"selection: {exp.get('selection')}")
    elif claim.shortened:
        notes.append(f"protocol shortened in profile {claim.profile}")
    return "; ".join(notes + extra)


def _variant(claim: Claim, summaries: dict) -> str:
    exp = summaries.get(claim.profile, {}).get("experiments", {}).get(claim.experiment) or {}
    v = exp.get("data_variant")
    return ", ".join(v) if isinstance(v, list) else (v or "—")


def _reproduced(d: _RuleData) -> str:
    if d.status == NOT_RUN or d.mean is None:
        return "—"
    if d.n < 2:
        return f"{d.mean:.2f} (one seed, no spread)"
    return f"{d.mean:.2f} ± {d.std:.2f}"


def _seeds(d: _RuleData) -> str:
    if not d.per_seed:
        return "—"
    return f"{d.n} (" + ", ".join(f"{s}: {v:.2f}" for s, v in sorted(d.per_seed.items(),
                                                                       key=lambda kv: natural_key(kv[0]))) + ")"


def _combine(verdicts: list[str]) -> str:
    for v in (DIVERGED, NOT_RUN, FAIL):
        if v in verdicts:
            return v
    return PASS


def _absolute(claim: Claim, summaries: dict) -> list[Row]:
    rows = []
    for rule, paper in claim.values.items():
        d = _rule_data(claim, rule, summaries)
        tol = claim.tolerance_for(rule)
        extra = [d.reason] if d.reason else []
        if rule in claim.known_failures:
            extra.append(f"KNOWN FAILURE: {claim.known_failures[rule]}")
        margin = spread = None
        if d.status == "OK":
            verdict = PASS if abs(d.mean - paper) <= tol else FAIL
            extra.append(f"diff {_signed(d.mean - paper)}")
            if d.n > 1 and d.std:
                se = d.std / d.n ** 0.5
                extra.append(f"band = {tol / se:.1f} SE of the mean (seed std {d.std:.2g}, n {d.n})")
            if d.best_test is not None:
                extra.append(f"best-test-epoch value (test-selected, biotorch-style): {d.best_test:.2f}")
        else:
            verdict = d.status
        rows.append(Row(claim.id, rule, _fmt(paper), _reproduced(d), _seeds(d), f"± {tol:g}",
                        verdict, claim.profile, _variant(claim, summaries),
                        _notes(claim, summaries, extra), d.mean, "", margin, spread))
    return rows


def _relative(claim: Claim, summaries: dict) -> list[Row]:
    ref = claim.reference_rule
    ref_d = _rule_data(claim, ref, summaries)
    rows = []
    for chk in claim.checks:
        rule = chk["rule"]
        d = _rule_data(claim, rule, summaries)
        paper_gap = claim.values[rule] - claim.values[ref]
        if "within" in chk:
            tol_text = f"|{rule} − {ref}| ≤ {chk['within']:g}"
        else:
            tol_text = f"{rule} − {ref} ≥ {chk['at_least']:g}"
        extra = [r for r in (ref_d.reason and f"{ref}: {ref_d.reason}", d.reason) if r]
        if rule in claim.known_failures:
            extra.append(f"KNOWN FAILURE: {claim.known_failures[rule]}")
        if DIVERGED in (d.status, ref_d.status):
            verdict = DIVERGED
        elif NOT_RUN in (d.status, ref_d.status):
            verdict = NOT_RUN
        else:
            gap = d.mean - ref_d.mean
            ok = abs(gap) <= chk["within"] if "within" in chk else gap >= chk["at_least"]
            verdict = PASS if ok else FAIL
            extra.append(f"reproduced gap {_signed(gap)} (paper {_signed(paper_gap)}); "
                         f"{ref} {ref_d.mean:.2f}")
        rows.append(Row(claim.id, f"{rule} vs {ref}",
                        f"{claim.values[rule]:.2f} (gap {_signed(paper_gap)})", _reproduced(d),
                        _seeds(d), tol_text, verdict, claim.profile, _variant(claim, summaries),
                        _notes(claim, summaries, extra), d.mean))
    return rows


def _entry_key(claim: Claim, summaries: dict, rule: str, at) -> str:
    if at is None:
        return rule
    exp = summaries.get(claim.profile, {}).get("experiments", {}).get(claim.experiment) or {}
    param = (exp.get("sweep") or {}).get("param", "sweep")
    return f"{rule}@{param.rsplit('.', 1)[-1]}={at}"


def _pooled(parts: list[_RuleData], points: list) -> _RuleData:
    """One number per seed from several sweep points: the seed's mean over the points (only
    seeds that finished at every point), so seeds stay the unit of the standard error and a
    test pooled over widths gains power from every width without counting a seed twice."""
    for d in parts:
        if d.status != "OK":
            return d
    seeds = set.intersection(*(set(d.per_seed) for d in parts))
    if not seeds:
        return _RuleData(NOT_RUN, f"no seed finished at every point of {points}")
    per_seed = {s: statistics.fmean(d.per_seed[s] for d in parts) for s in sorted(seeds, key=natural_key)}
    values = list(per_seed.values())
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    dropped = sorted(set().union(*(set(d.per_seed) for d in parts)) - seeds, key=natural_key)
    reason = "; ".join(dict.fromkeys(d.reason for d in parts if d.reason))
    if dropped:
        reason = _join(reason, f"pooled over seeds finished at every point (left out {seed_list(dropped)})")
    return _RuleData("OK", reason=reason, mean=statistics.fmean(values), std=std, n=len(values),
                     per_seed=per_seed, se=std / math.sqrt(len(values)) if len(values) > 1 else None)


def _comparison(claim: Claim, summaries: dict) -> list[Row]:
    """Checks between rules, sweep points (at) and metrics of one experiment's runs."""
    rows = []
    for chk in claim.checks:
        label = check_label(chk)
        at = chk.get("at")

        def data(rule, point, metric):
            if isinstance(point, list):  # pooled over sweep points
                return _pooled([data(rule, p, metric) for p in point], point)
            return _rule_data(claim, _entry_key(claim, summaries, rule, point), summaries,
                              metric or claim.metric)

        main = data(chk["rule"], at, chk.get("metric"))
        others, extra = [], []
        if chk.get("ref"):
            ref = chk["ref"]
            others.append(data(ref.get("rule", chk["rule"]), ref.get("at", at), ref.get("metric") or chk.get("metric")))
        if chk.get("closer_to"):
            others += [data(chk["closer_to"], at, chk.get("metric")), data(chk["than"], at, chk.get("metric"))]
        everything = [main] + others
        for d in everything:
            if d.reason and d.reason not in extra:
                extra.append(d.reason)
        if label in claim.known_failures:
            extra.append(f"KNOWN FAILURE: {claim.known_failures[label]}")
        blocked = ""
        if any(d.status == DIVERGED for d in everything):
            verdict, shown = DIVERGED, "—"
        elif any(d.status == NOT_RUN for d in everything):
            verdict, shown = NOT_RUN, "—"
            blocked = next(d.reason for d in everything if d.status == NOT_RUN)
        else:
            ok, tol, shown, margin, spread = _judge(chk, main, others, extra)
            verdict = PASS if ok else FAIL
        if verdict in (DIVERGED, NOT_RUN):
            tol = "—"
        n = min((d.n for d in everything if d.status == "OK"), default=0)
        paper_text = f"{chk['target']:g}" if "target" in chk else (claim.statement if not rows else "″")
        if verdict in (DIVERGED, NOT_RUN):
            margin = spread = None
        rows.append(Row(claim.id, label, paper_text, shown,
                        str(n) if n else "—", tol, verdict, claim.profile,
                        _variant(claim, summaries), _notes(claim, summaries, extra), main.mean,
                        blocked, margin, spread))
    return rows


def _judge(chk: dict, main: _RuleData, others: list[_RuleData], extra: list[str]):
    """(passes, tolerance text, shown value, margin, spread) of one check on finished runs;
    notes for the row go to `extra`."""
    v = main.mean
    margin = spread = None
    seeds = list(main.per_seed.values())
    one_seed = main.n < 2  # no observed spread to measure the bound against
    if "max" in chk and seeds:
        margin, spread = chk["max"] - max(seeds), None if one_seed else main.std
    elif "min" in chk and seeds:
        margin, spread = min(seeds) - chk["min"], None if one_seed else main.std
    if "max" in chk:
        ok, tol, shown = v <= chk["max"], f"≤ {chk['max']:g}", _pm(main)
    elif "min" in chk:
        ok, tol, shown = v >= chk["min"], f"≥ {chk['min']:g}", _pm(main)
    elif "target" in chk:
        ok = abs(v - chk["target"]) <= chk["tolerance"]
        tol, shown = f"{chk['target']:g} ± {chk['tolerance']:g}", _pm(main)
        extra.append(f"diff {v - chk['target']:+.2f}")
    elif "closer_to" in chk:
        target, rival = others
        gap, rival_gap = abs(v - target.mean), abs(rival.mean - target.mean)
        ok = gap <= rival_gap
        tol = f"|{chk['rule']} − {chk['closer_to']}| ≤ |{chk['than']} − {chk['closer_to']}|"
        shown = f"{gap:.3g} vs {rival_gap:.3g}"
        extra.append(f"{chk['rule']} {_pm(main)}, {chk['closer_to']} {_pm(target)}, "
                     f"{chk['than']} {_pm(rival)}")
    else:
        diff = v - others[0].mean
        bound = [k for k in ("at_most", "at_least", "within") if k in chk][0]
        margin, spread = _diff_margin(main, others[0], bound, chk[bound])
        sym = {"at_most": "≤", "at_least": "≥", "within": "|·| ≤"}[bound]
        shown = f"{_pm(main)} vs {_pm(others[0])} (diff {diff:+.3g})"
        if "margin_se" in chk:
            ok, tol, why = _clears_by_se(main, others[0], bound, chk[bound], chk["margin_se"])
            extra.append(why)
        else:
            ok = {"at_most": diff <= chk.get("at_most", 0), "at_least": diff >= chk.get("at_least", 0),
                  "within": abs(diff) <= chk.get("within", 0)}[bound]
            tol = f"difference {sym} {chk[bound]:g}"
    return ok, tol, shown, margin, spread


def diff_se(main: _RuleData, ref: _RuleData) -> tuple[float | None, str]:
    """(standard error of the mean difference, how it was taken): paired over the seeds both
    sides ran when they ran the same seeds (same seed = same data order and draw), else the
    two sides' standard errors added in quadrature; None with fewer than 2 seeds a side."""
    a, b = main.per_seed, ref.per_seed
    if len(a) >= 2 and set(a) == set(b):
        diffs = [a[s] - b[s] for s in a]
        return statistics.stdev(diffs) / math.sqrt(len(diffs)), f"paired over {len(diffs)} seeds"
    if len(a) >= 2 and len(b) >= 2:
        return math.hypot(statistics.stdev(a.values()) / math.sqrt(len(a)),
                          statistics.stdev(b.values()) / math.sqrt(len(b))), "unpaired"
    return None, "fewer than 2 seeds a side"


def _clears_by_se(main: _RuleData, ref: _RuleData, bound: str, value: float, k: float) -> tuple[bool, str, str]:
    """(ok, tolerance text, note): the mean difference clears the bound by k standard errors
    of the difference, so that a sign settled by seed noise does not pass."""
    diff = main.mean - ref.mean
    se, how = diff_se(main, ref)
    sym = "≥" if bound == "at_least" else "≤"
    tol = f"difference {sym} {value:g} {'+' if bound == 'at_least' else '−'} {k:g} SE"
    if se is None:
        return False, tol, f"a margin in standard errors needs 2+ seeds a side ({how})"
    need = value + k * se if bound == "at_least" else value - k * se
    ok = diff >= need if bound == "at_least" else diff <= need
    return ok, f"{tol} (= {need:+.3g})", (f"difference {diff:+.3g}, SE {se:.2g} ({how}): "
                                          f"{(diff - value) / se if se else math.inf:+.1f} SE from {value:g}")


def _diff_margin(main: _RuleData, ref: _RuleData, bound: str, value: float) -> tuple[float | None, float | None]:
    """(margin of the worst seed difference inside the bound, pooled std) for a difference
    check; seeds are paired where both sides ran the same seeds, else every pair counts."""
    a, b = main.per_seed, ref.per_seed
    if not a or not b:
        return None, None
    common = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in common] if common else [x - y for x in a.values() for y in b.values()]
    if bound == "at_least":
        margin = min(diffs) - value
    elif bound == "at_most":
        margin = value - max(diffs)
    else:
        margin = value - max(abs(d) for d in diffs)
    spread = ((main.std or 0.0) ** 2 + (ref.std or 0.0) ** 2) ** 0.5 if main.n > 1 and ref.n > 1 else None
    return margin, spread


# A check whose bound lies more than this many observed spreads (std) beyond every observed
# value cannot be failed by the runs it judges: noise of that size never reaches it.
CANNOT_FAIL_SPREADS = 10.0


def cannot_fail(row: Row, spreads: float = CANNOT_FAIL_SPREADS) -> bool:
    """A passing check with a bound further than `spreads` x the observed spread from every
    observed value (rows without a spread, i.e. one seed, are not judged)."""
    return (row.verdict == PASS and row.margin is not None and row.spread is not None
            and row.margin > spreads * max(row.spread, 1e-12))


def _pm(d: _RuleData) -> str:
    """mean ± standard error (the B-paper's error bars); one seed has no error bar."""
    if d.mean is None:
        return "—"
    return f"{d.mean:.4g}" + (f" ± {d.se:.2g}" if d.n > 1 and d.se is not None else " (1 seed)")


def evaluate_claim(claim: Claim, summaries: dict[str, dict]) -> ClaimResult:
    """Judge one claim against the summaries of every profile present."""
    if claim.kind == "comparison":
        rows = _comparison(claim, summaries)
    else:
        rows = _absolute(claim, summaries) if claim.kind == "absolute" else _relative(claim, summaries)
    verdict = _combine([r.verdict for r in rows])
    reason = ""
    if verdict == NOT_RUN and claim.kind == "comparison":
        reason = next((r.reason for r in rows if r.verdict == NOT_RUN), "")
    elif verdict == NOT_RUN:
        reasons = []
        for rule in claim.rules:
            r = _rule_data(claim, rule, summaries).reason
            if r and r not in reasons:
                reasons.append(r)
        reason = "; ".join(reasons)
    elif verdict != PASS:
        reason = "; ".join(f"{r.rule}: {r.verdict}" for r in rows if r.verdict != PASS)
    return ClaimResult(claim, verdict, rows, reason)


def row_status(claim: Claim, row: Row) -> str:
    """PASS / known failure / not run, or a problem: a new FAIL (or DIVERGED), or a listed
    known failure that now passes (the registry must be kept true)."""
    known = claim.known_failures.get(row.rule) or claim.known_failures.get(row.rule.split(" vs ")[0])
    if row.verdict == PASS:
        return "now passes" if known else "pass"
    if row.verdict in (FAIL, DIVERGED) and known:
        return "known failure"  # a divergence explained in known_failures, like a FAIL
    if row.verdict == NOT_RUN:
        return "not run"
    return "new failure"


PROBLEM_STATUSES = ("now passes", "new failure")


def evaluate_all(claims: list[Claim], summaries: dict[str, dict]) -> list[ClaimResult]:
    return [evaluate_claim(c, summaries) for c in claims]


def claims_for_params(claims: list[Claim], params: dict[str, Any]) -> list[str]:
    """Problems linking claims to params.yaml (unknown experiment / rule / profile)."""
    problems = []
    for c in claims:
        exp = params["experiments"].get(c.experiment)
        if exp is None:
            problems.append(f"{c.id}: experiment {c.experiment} not in params.yaml")
            continue
        for rule in c.rules:
            if rule not in exp["rules"]:
                problems.append(f"{c.id}: rule {rule} not run by {c.experiment}")
        if c.kind == "comparison":
            values = [str(v) for v in (exp.get("sweep") or {}).get("values", [])]
            for chk in c.checks:
                for at in (chk.get("at"), (chk.get("ref") or {}).get("at")):
                    for point in (at if isinstance(at, list) else [at]):
                        if point is not None and str(point) not in values:
                            problems.append(f"{c.id}: sweep point {point} not in {c.experiment}'s sweep {values}")
        if c.profile not in params["profiles"]:
            problems.append(f"{c.id}: profile {c.profile} not in params.yaml")
    return problems
