"""Comparison claims (qualitative statements as checks over sweeps), sweep tables and figures."""
import pytest
import yaml

from bpfree.claims import (DIVERGED, FAIL, NOT_RUN, PASS, ClaimsError, check_label, evaluate_claim,
                           load_registry)
from bpfree.plots import sweep_series
from bpfree.reporting import sweep_table, write_reports


def entry(rule, width, values, statuses=None):
    """A summary entry "rule@width=w" with per-seed scalars {metric: [v_seed0, v_seed1, ...]}."""
    import statistics
    n = len(next(iter(values.values())))
    statuses = statuses or ["OK"] * n
    scalars = {m: {str(i): v for i, v in enumerate(vs)} for m, vs in values.items()}
    stats = {}
    for m, vs in values.items():
        ok = [v for v, st in zip(vs, statuses) if st == "OK"]
        sd = statistics.stdev(ok) if len(ok) > 1 else 0.0
        stats[m] = {"mean": statistics.fmean(ok) if ok else None, "std": sd, "n": len(ok),
                    "se": sd / len(ok) ** 0.5 if ok else None}
    return f"{rule}@width={width}", {
        "rule": rule, "sweep_param": "model.options.width", "sweep_value": width,
        "seeds": list(range(n)), "status": {str(i): st for i, st in enumerate(statuses)},
        "selected_test_acc": {str(i): 50.0 for i in range(n)}, "scalars": scalars, "scalar_stats": stats}


def summary(entries, not_run=None):
    exp = {"dataset": "mnist", "model": "mlp", "shortened": False, "deviations": [], "selection": "final",
           "sweep": {"param": "model.options.width", "values": [15, 200]}, "rules": dict(entries)}
    if not_run:
        exp = {"not_run": not_run, "rules": {}, "shortened": False}
    return {"cpu": {"profile": "cpu", "experiments": {"B2": exp}, "mismatches": []}}


REGISTRY = {
    "papers": {"p": {"title": "P", "sources": ["s"],
                     "sweep_tables": [{"experiment": "B2", "profile": "cpu", "metric": "conservation_deviation/fc1",
                                       "digits": 3, "title": "dev"}],
                     "figures": [{"name": "dev_vs_width", "kind": "sweep", "experiment": "B2", "profile": "cpu",
                                  "metric": "conservation_deviation/fc1", "ylabel": "dev", "log_y": True}]}},
    "claims": [{
        "id": "C", "paper": "p", "provenance": {"kind": "figure", "source": "fig"}, "experiment": "B2",
        "dataset": "d", "architecture": "a", "metric": "conservation_deviation/fc1", "kind": "comparison",
        "profile": "cpu", "shortened": False, "statement": "small, larger at small width",
        "checks": [{"rule": "fa", "at": 200, "max": 0.1},
                   {"rule": "fa", "at": 200, "ref": {"at": 15}, "at_most": 0.0},
                   {"rule": "usf", "at": 15, "closer_to": "bp", "than": "fa"},
                   {"rule": "fa", "at": 15, "metric": "weight_feedback_angle_deg/classifier",
                    "ref": {"metric": "initial_weight_feedback_angle_deg/classifier"}, "at_most": 0.0}],
        "tolerance_reason": "written before the runs"}],
}


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(REGISTRY))
    return path


def base_entries(fa200=(0.05, 0.07)):
    return [
        entry("fa", 15, {"conservation_deviation/fc1": [0.3, 0.2],
                         "weight_feedback_angle_deg/classifier": [40.0, 42.0],
                         "initial_weight_feedback_angle_deg/classifier": [85.0, 86.0]}),
        entry("fa", 200, {"conservation_deviation/fc1": list(fa200)}),
        entry("usf", 15, {"conservation_deviation/fc1": [0.12, 0.1]}),
        entry("bp", 15, {"conservation_deviation/fc1": [0.1, 0.1]}),
    ]


def verdicts(registry, summaries):
    _, claims = load_registry(registry)
    result = evaluate_claim(claims[0], summaries)
    return result, [r.verdict for r in result.rows]


def test_all_checks_pass(registry):
    result, v = verdicts(registry, summary(base_entries()))
    assert v == [PASS] * 4 and result.verdict == PASS
    assert result.rows[0].reproduced.startswith("0.06 ± ")  # mean ± standard error
    assert result.rows[1].rule == "fa@200 vs fa@15"


def test_bound_and_ordering_failures(registry):
    result, v = verdicts(registry, summary(base_entries(fa200=(0.4, 0.5))))
    assert v[:2] == [FAIL, FAIL] and result.verdict == FAIL


def test_closer_to_fails_when_the_rival_is_closer(registry):
    entries = base_entries()
    entries[2] = entry("usf", 15, {"conservation_deviation/fc1": [0.6, 0.6]})
    _, v = verdicts(registry, summary(entries))
    assert v[2] == FAIL


def test_missing_sweep_point_and_skipped_experiment_are_not_run(registry):
    _, v = verdicts(registry, summary(base_entries()[:1] + base_entries()[2:]))
    assert v[0] == NOT_RUN and v[1] == NOT_RUN and v[2] == PASS
    result, v = verdicts(registry, summary([], not_run="gpu profile only"))
    assert set(v) == {NOT_RUN} and "gpu profile only" in result.reason


def test_diverged_repeat_gives_diverged(registry):
    entries = base_entries()
    entries[1] = entry("fa", 200, {"conservation_deviation/fc1": [0.05, 0.07]}, statuses=["OK", "DIVERGED"])
    _, v = verdicts(registry, summary(entries))
    assert v[0] == DIVERGED


def test_incomplete_repeats_are_judged_and_flagged(registry):
    entries = base_entries()
    entries[1] = entry("fa", 200, {"conservation_deviation/fc1": [0.05, 0.07]}, statuses=["OK", "MISSING"])
    result, v = verdicts(registry, summary(entries))
    assert v[0] == PASS and "INCOMPLETE" in result.rows[0].notes


@pytest.mark.parametrize("check, msg", [
    ({"rule": "fa", "at": 200}, "exactly one of"),
    ({"rule": "fa", "at": 200, "at_most": 0.0}, "ref"),
    ({"rule": "fa", "max": 0.1, "ref": {"at": 15}}, "max / min"),
    ({"rule": "fa", "closer_to": "bp"}, "than"),
    ({"rule": "fa", "max": 0.1, "metric": "no_such_metric/fc1"}, "unknown metric"),
])
def test_malformed_comparison_checks_are_rejected(tmp_path, check, msg):
    raw = yaml.safe_load(yaml.safe_dump(REGISTRY))
    raw["claims"][0]["checks"] = [check]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ClaimsError, match=msg.replace("/", ".").replace("(", r"\(")):
        load_registry(path)


def test_known_failures_of_comparison_claims_name_a_check(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(REGISTRY))
    raw["claims"][0]["known_failures"] = {"fa": "why"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ClaimsError, match="check label"):
        load_registry(path)
    raw["claims"][0]["known_failures"] = {check_label(raw["claims"][0]["checks"][0]): "why"}
    path.write_text(yaml.safe_dump(raw))
    load_registry(path)


def test_sweep_table_and_series(registry):
    s = summary(base_entries())["cpu"]
    spec = REGISTRY["papers"]["p"]["sweep_tables"][0]
    table = sweep_table(s, spec)
    assert "| width" in table and "0.250 ± 0.050" in table and "0.060 ± 0.010" in table
    series = sweep_series(s, "B2", "conservation_deviation/fc1")
    assert [p[0] for p in series["fa"]] == [15, 200]
    assert "NOT RUN" in sweep_table(summary([], not_run="gpu only")["cpu"], spec)


def test_reports_draw_and_link_figures(registry, tmp_path):
    import json
    results = tmp_path / "results"
    (results / "cpu").mkdir(parents=True)
    (results / "cpu" / "summary.json").write_text(json.dumps(summary(base_entries())["cpu"]))
    written = write_reports(results, registry)
    png = results / "figures" / "dev_vs_width.png"
    assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(tables/p.md)" in (results / "README.md").read_text()  # figures live on the paper page
    assert "../figures/dev_vs_width.png" in (results / "tables" / "p.md").read_text()
    first = png.read_bytes()
    write_reports(results, registry)
    assert png.read_bytes() == first  # same data, same bytes


def test_pruning_and_history_figures_are_drawn_from_results(tmp_path):
    import json

    from bpfree.plots import plot_history, plot_pruning

    stats = lambda v: {"mean": v, "se": 0.5, "n": 3, "std": 0.8}  # noqa: E731
    summary_ = {"experiments": {"E2": {"rules": {
        rule: {"scalar_stats": {f"pruned_acc_global_magnitude/{f}": stats(80 - f * k)
                                for f in (0.0, 0.5, 0.9)}}
        for rule, k in (("bp", 40), ("lfp_eps", 10))}}}}
    png = plot_pruning(summary_, {"experiment": "E2", "profile": "gpu", "methods": ["global_magnitude"]},
                       tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plot_pruning({"experiments": {"E2": {"rules": {}}}}, {"experiment": "E2", "profile": "gpu"},
                        tmp_path / "none.png") is None
    runs = tmp_path / "cpu" / "runs" / "E4"
    for rule in ("bp", "lfp_eps"):
        for at in ("atan", "none"):
            d = runs / f"{rule}_{at}"
            d.mkdir(parents=True)
            d.joinpath("metrics.json").write_text(json.dumps({
                "status": "OK", "config": {"rule": {"name": rule}, "sweep": {"value": at}},
                "history": [{"epoch": e, "test_acc": 10.0 * e} for e in (1, 2, 3)]}))
    spec = {"experiment": "E4", "profile": "cpu", "column": "test_acc", "at": ["atan", "none"]}
    assert plot_history(tmp_path, spec, tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_history(tmp_path, {**spec, "experiment": "nothing"}, tmp_path / "x.png") is None
