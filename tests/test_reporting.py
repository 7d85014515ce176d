"""Verdict logic and table rendering, on synthetic summaries (no training)."""
import copy
import json

import pytest
import yaml

from bpfree.claims import (DIVERGED, FAIL, NOT_RUN, PASS, ClaimsError, evaluate_claim, load_registry)
from bpfree.reporting import claims_table, write_reports

REGISTRY = {
    "papers": {"toy_paper": {"title": "Toy paper", "sources": ["Toy et al. 2024"]}},
    "claims": [
        {"id": "T-abs", "paper": "toy_paper", "provenance": {"kind": "table", "source": "Table 1"},
         "experiment": "E1", "dataset": "MNIST", "architecture": "MLP", "metric": "test_error_pct",
         "kind": "absolute", "profile": "cpu", "shortened": True,
         "values": {"bp": 2.0, "fa": 5.0}, "tolerance": {"default": 0.5, "fa": 1.0},
         "tolerance_reason": "one seed"},
        {"id": "T-rel", "paper": "toy_paper", "provenance": {"kind": "qualitative", "source": "Sec. 4"},
         "experiment": "E1", "dataset": "MNIST", "architecture": "MLP", "metric": "test_error_pct",
         "kind": "relative", "profile": "cpu", "shortened": True, "reference_rule": "bp",
         "values": {"bp": 2.0, "fa": 5.0, "usf": 2.2},
         "checks": [{"rule": "usf", "within": 1.0}, {"rule": "fa", "at_least": 2.0}],
         "tolerance_reason": "ordering only"},
        {"id": "T-gpu", "paper": "toy_paper", "provenance": {"kind": "repo-output", "source": "log"},
         "experiment": "E1", "dataset": "MNIST", "architecture": "MLP", "metric": "test_acc_pct",
         "kind": "absolute", "profile": "gpu", "shortened": False, "values": {"bp": 98.0},
         "tolerance": {"default": 0.3}, "tolerance_reason": "seed spread"},
    ],
}


def rule_entry(accs: dict, status: dict | None = None):
    status = status or {s: "OK" for s in accs}
    ok = [v for s, v in accs.items() if status[s] == "OK"]
    errs = [100 - v for v in ok]

    def stats(vals):
        if not vals:
            return {"mean": None, "std": None, "n": 0}
        m = sum(vals) / len(vals)
        sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else 0.0
        return {"mean": m, "std": sd, "n": len(vals)}

    return {"status": status, "selected_test_acc": {s: v for s, v in accs.items() if status[s] == "OK"},
            "selected_test_acc_stats": stats(ok), "test_error_stats": stats(errs),
            "best_test_acc_test_selected_stats": stats([v + 0.1 for v in ok])}


def summary(rules: dict):
    return {"profile": "cpu", "mismatches": [], "experiments": {"E1": {
        "dataset": "mnist", "model": "mlp", "data_variant": ["official"], "selection": "best_val",
        "shortened": True, "deviations": ["epochs 20 (protocol 100)"], "rules": rules}}}


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(REGISTRY))
    papers, claims = load_registry(path)
    return path, {c.id: c for c in claims}


GOOD = {"bp": rule_entry({"1": 98.1, "2": 97.9}), "fa": rule_entry({"1": 95.5, "2": 94.7}),
        "usf": rule_entry({"1": 97.5, "2": 97.7})}


def test_absolute_pass(registry):
    _, claims = registry
    res = evaluate_claim(claims["T-abs"], {"cpu": summary(GOOD)})
    assert res.verdict == PASS
    bp = res.rows[0]
    assert bp.rule == "bp" and bp.reproduced == "2.00 ± 0.14" and bp.verdict == PASS
    assert "SHORTENED" in bp.notes and "epochs 20" in bp.notes


def test_absolute_fail_outside_tolerance(registry):
    _, claims = registry
    rules = copy.deepcopy(GOOD)
    rules["fa"] = rule_entry({"1": 93.0, "2": 93.4})  # error 6.8 vs 5.0 +- 1.0
    res = evaluate_claim(claims["T-abs"], {"cpu": summary(rules)})
    assert res.verdict == FAIL and [r.verdict for r in res.rows] == [PASS, FAIL]


def test_tolerance_edge_is_inclusive(registry):
    _, claims = registry
    rules = copy.deepcopy(GOOD)
    rules["bp"] = rule_entry({"1": 97.5})  # error exactly 2.5 = 2.0 + 0.5
    assert evaluate_claim(claims["T-abs"], {"cpu": summary(rules)}).rows[0].verdict == PASS
    rules["bp"] = rule_entry({"1": 97.4})
    assert evaluate_claim(claims["T-abs"], {"cpu": summary(rules)}).rows[0].verdict == FAIL


def test_any_diverged_seed_gives_diverged(registry):
    _, claims = registry
    rules = copy.deepcopy(GOOD)
    rules["fa"] = rule_entry({"1": 95.0, "2": 10.0}, {"1": "OK", "2": "DIVERGED"})
    res = evaluate_claim(claims["T-abs"], {"cpu": summary(rules)})
    assert res.verdict == DIVERGED and "diverged" in res.rows[1].notes


def test_partly_run_rule_is_judged_on_finished_seeds_and_says_so(registry):
    _, claims = registry
    rules = {**GOOD, "fa": rule_entry({"1": 95.0, "2": 95.0}, {"1": "OK", "2": "STALE"})}
    res = evaluate_claim(claims["T-abs"], {"cpu": summary(rules)})
    fa = res.rows[1]
    assert fa.verdict in (PASS, FAIL) and "INCOMPLETE: 1 of 2 seeds ran (missing 2)" in fa.notes
    assert fa.reproduced.endswith("(one seed, no spread)")


@pytest.mark.parametrize("summaries,reason", [
    ({}, "no results/cpu/summary.json"),
    ({"gpu": summary(GOOD)}, "no results/cpu/summary.json"),
    ({"cpu": {"experiments": {}}}, "experiment E1 absent"),
    ({"cpu": summary({"bp": GOOD["bp"]})}, "rule fa not run"),
    ({"cpu": summary({**GOOD, "fa": rule_entry({"1": 95.0}, {"1": "MISSING"})})}, "no finished run (1)"),
])
def test_not_run_with_reason(registry, summaries, reason):
    _, claims = registry
    res = evaluate_claim(claims["T-abs"], summaries)
    assert res.verdict == NOT_RUN and reason in res.reason


def test_relative_pass_and_gaps(registry):
    _, claims = registry
    res = evaluate_claim(claims["T-rel"], {"cpu": summary(GOOD)})
    assert res.verdict == PASS
    usf, fa = res.rows
    assert usf.rule == "usf vs bp" and "gap +0.40" in usf.notes and "paper +0.20" in usf.notes
    assert fa.tolerance == "fa − bp ≥ 2"


@pytest.mark.parametrize("usf_acc,fa_acc,verdicts", [
    ((96.9, 96.9), (94.0, 94.0), [FAIL, PASS]),     # usf 1.1 worse than bp: outside "within 1"
    ((99.1, 99.1), (94.0, 94.0), [FAIL, PASS]),     # "within" is two-sided
    ((97.5, 97.5), (96.5, 96.5), [PASS, FAIL]),     # fa only 1.5 worse: "at least 2" fails
])
def test_relative_fail(registry, usf_acc, fa_acc, verdicts):
    _, claims = registry
    rules = {"bp": rule_entry({"1": 98.0, "2": 98.0}), "usf": rule_entry(dict(zip("12", usf_acc))),
             "fa": rule_entry(dict(zip("12", fa_acc)))}
    res = evaluate_claim(claims["T-rel"], {"cpu": summary(rules)})
    assert [r.verdict for r in res.rows] == verdicts and res.verdict == FAIL


def test_relative_reference_diverged_or_missing(registry):
    _, claims = registry
    rules = copy.deepcopy(GOOD)
    rules["bp"] = rule_entry({"1": 98.0, "2": 10.0}, {"1": "OK", "2": "DIVERGED"})
    res = evaluate_claim(claims["T-rel"], {"cpu": summary(rules)})
    assert res.verdict == DIVERGED and all(r.verdict == DIVERGED for r in res.rows)
    del rules["bp"]
    res = evaluate_claim(claims["T-rel"], {"cpu": summary(rules)})
    assert res.verdict == NOT_RUN and "rule bp not run" in res.reason


def test_accuracy_metric_not_converted(registry):
    _, claims = registry
    res = evaluate_claim(claims["T-gpu"], {"gpu": summary({"bp": rule_entry({"1": 98.2})})})
    assert res.verdict == PASS and res.rows[0].reproduced == "98.20 (one seed, no spread)"


def test_table_rendering_has_every_column_and_value(registry):
    _, claims = registry
    results = [evaluate_claim(c, {"cpu": summary(GOOD)}) for c in claims.values()]
    table = claims_table(results)
    header = table.splitlines()[0]
    for col in ("claim", "rule", "paper value", "reproduced mean ± std", "seeds", "tolerance",
                "verdict", "profile", "data variant", "notes"):
        assert col in header
    assert "| T-abs " in table and "5.00" in table and "± 1" in table and "official" in table
    assert "NOT RUN" in table  # T-gpu: no gpu summary
    assert table.count("\n") == 1 + sum(len(r.rows) for r in results)


def test_write_reports(registry, tmp_path):
    path, _ = registry
    results = tmp_path / "results"
    (results / "cpu").mkdir(parents=True)
    rules = copy.deepcopy(GOOD)
    rules["fa"] = rule_entry({"1": 93.0, "2": 93.4})
    for e in rules.values():
        e["device"] = {"1": "cpu: AMD EPYC", "2": "cpu: AMD EPYC"}
        e["commit"] = {"1": "0e0d5c6", "2": "5a361fb+dirty"}
    (results / "cpu" / "summary.json").write_text(json.dumps(summary(rules)))
    curves = results / "cpu" / "learning_curves" / "E1"
    curves.mkdir(parents=True)
    (curves / "bp.csv").write_text("epoch,test_acc,n_seeds\n1,90.0,2\n2,97.0,2\n")
    written = write_reports(results, path)
    assert sorted(p.relative_to(results).as_posix() for p in written) == [
        "README.md", "figures/learning_curves_cpu_E1.png", "metrics/cpu.json", "metrics/gpu.json",
        "metrics/smoke.json", "tables/runs_smoke.md", "tables/toy_paper.md"]
    # The DVC metrics of a profile: each of its claims' rows, and each experiment's headline.
    cpu = json.loads((results / "metrics" / "cpu.json").read_text())
    assert cpu["claims"]["T-abs"]["verdict"] == "FAIL" and cpu["claims"]["T-rel"]["verdict"] == "PASS"
    row = next(v for k, v in cpu["claims"]["T-abs"].items() if k != "verdict")
    assert set(row) == {"paper", "reproduced", "tolerance", "verdict", "pass"}
    assert "T-gpu" not in cpu["claims"] and "T-gpu" in json.loads((results / "metrics" / "gpu.json").read_text())["claims"]
    assert cpu["experiments"]["E1"]["selected_test_acc"]
    paper = (results / "tables" / "toy_paper.md").read_text()
    assert "### T-abs: FAIL" in paper and "### T-rel: PASS" in paper and "### T-gpu: NOT RUN" in paper
    assert "protocol shortened in this profile: YES" in paper
    readme = (results / "README.md").read_text()
    # The front page: one line per paper, claims by class (T-abs ran a shortened protocol).
    assert "| [Toy paper](#toy-paper) | 3        | 1      |                    |             | 1             |" in readme
    assert "[page](tables/toy_paper.md)" in readme and "Profiles with a summary: cpu" in readme
    section = readme.split("## Toy paper", 1)[1].split("## Runs per profile", 1)[0]
    assert "PASS 1 · FAIL budget 1 · NOT RUN gpu pending 1" in section
    assert "| T-abs   | cpu       | FAIL budget         | no full-protocol pass yet; fa: 6.80 ± 0.28 vs 5.00 (tolerance ± 1)" in section
    assert "![" not in section and "### Provenance" not in section  # both on the paper's page
    # The paper's page: figures (learning curves) and provenance.
    assert "![learning_curves_cpu_E1](../figures/learning_curves_cpu_E1.png)" in paper
    assert "`learning_curves_gpu_E1`: not drawn (no summary)" in paper
    provenance = paper.split("## Provenance", 1)[1]
    assert "| cpu       | E1           | bp, fa, usf | 1, 2    | cpu: AMD EPYC | official" in provenance
    assert "0e0d5c6, 5a361fb+dirty" in provenance and "epochs 20 (protocol 100)" in provenance


def _result(registry, claim_id, rules, profile="cpu", shortened=True):
    _, claims = registry
    s = summary(rules)
    s["experiments"]["E1"]["shortened"] = shortened
    return evaluate_claim(claims[claim_id], {profile: s})


def test_front_page_classes_say_what_would_change_a_verdict(registry):
    from bpfree.reporting import status_class
    bad = copy.deepcopy(GOOD)
    bad["fa"] = rule_entry({"1": 93.0, "2": 93.4})
    datasets, absent = {"E1": "mnist"}, {"cifar100": "not offline"}
    short_fail = _result(registry, "T-abs", bad)
    full_fail = _result(registry, "T-abs", bad, shortened=False)
    assert status_class(short_fail, [short_fail], {"cpu": {"experiments": {"E1": {"shortened": True}}}},
                        datasets, absent) == ("FAIL budget", "no full-protocol pass yet")
    assert status_class(full_fail, [full_fail], {"cpu": {"experiments": {"E1": {"shortened": False}}}},
                        datasets, absent)[0] == "FAIL open"
    # a shortened FAIL whose experiment passes at the full protocol on the gpu says so
    full_pass = _result(registry, "T-gpu", {"bp": rule_entry({"1": 98.0, "2": 98.1})}, profile="gpu",
                        shortened=False)
    summaries = {"cpu": {"experiments": {"E1": {"shortened": True}}},
                 "gpu": {"experiments": {"E1": {"shortened": False}}}}
    assert full_pass.verdict == PASS
    assert status_class(short_fail, [short_fail, full_pass], summaries, datasets, absent) == \
        ("FAIL budget", "passes at the full protocol on profile gpu")
    not_run = _result(registry, "T-gpu", {}, profile="gpu")
    assert status_class(not_run, [not_run], {}, datasets, absent)[0] == "NOT RUN gpu pending"
    assert status_class(not_run, [not_run], {}, {"E1": "cifar100"}, absent) == \
        ("NOT RUN data absent", "cifar100: not offline")
    cpu_not_run = _result(registry, "T-abs", {})
    assert status_class(cpu_not_run, [cpu_not_run], {}, datasets, absent)[0] == "NOT RUN runs pending"


@pytest.mark.parametrize("field,value,msg", [
    ("tolerance_reason", "", "reason"),
    ("metric", "top5", "metric"),
    ("profile", "laptop", "profile"),
    ("provenance", {"kind": "blog", "source": "x"}, "provenance"),
    ("tolerance", {"fa": 1.0}, "default"),
])
def test_registry_rejects_malformed_claims(tmp_path, field, value, msg):
    reg = copy.deepcopy(REGISTRY)
    reg["claims"][0][field] = value
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(reg))
    with pytest.raises(ClaimsError, match=msg):
        load_registry(path)


def test_registry_rejects_missing_field(tmp_path):
    reg = copy.deepcopy(REGISTRY)
    del reg["claims"][1]["tolerance_reason"]
    path = tmp_path / "claims.yaml"
    path.write_text(yaml.safe_dump(reg))
    with pytest.raises(ClaimsError, match="T-rel.*tolerance_reason"):
        load_registry(path)


def test_protocol_tables_render_into_the_paper_page_and_reject_short_rows(tmp_path):
    from bpfree.reporting import load_protocols, protocol_section
    protocols = load_protocols()
    tables = protocols["fa_reference_tables"]
    assert {t["experiment"] for t in tables} == {"A1_mnist_lenet", "A1_cifar10_lenet", "A2_mnist_mlp"}
    text = "\n".join(protocol_section(tables))
    header = next(line for line in text.splitlines() if line.startswith("| setting"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["setting", "paper", "authors' code", "ours", "why"]
    assert "layers/dfa/conv.py:51-54" in text and "FCNN_KP.py" in text
    bad = tmp_path / "protocols.yaml"
    bad.write_text("p:\n  - {experiment: X, title: t, rows: [[a, b, c]]}\n")
    with pytest.raises(ValueError, match="needs 5 cells"):
        load_protocols(bad)


def test_seeds_and_sweep_points_sort_as_numbers():
    from bpfree.claims import natural_key
    assert sorted(["100", "15", "2", "width100", "width15"], key=natural_key) == \
        ["2", "15", "100", "width15", "width100"]


def test_a_check_whose_bound_no_seed_can_reach_is_flagged_and_not_counted_as_pass(registry, tmp_path):
    from bpfree.claims import CANNOT_FAIL_SPREADS, cannot_fail, evaluate_claim, load_registry
    from bpfree.reporting import status_class
    reg = copy.deepcopy(REGISTRY)
    reg["claims"].append({
        "id": "T-cmp", "paper": "toy_paper", "provenance": {"kind": "qualitative", "source": "Sec. 5"},
        "experiment": "E1", "dataset": "MNIST", "architecture": "MLP", "metric": "test_acc_pct",
        "kind": "comparison", "profile": "cpu", "shortened": False, "statement": "usf beats fa",
        "checks": [{"rule": "usf", "ref": {"rule": "fa"}, "at_least": 0.0}],
        "tolerance_reason": "ordering"})
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(reg))
    claim = {c.id: c for c in load_registry(path)[1]}["T-cmp"]
    for e in GOOD.values():
        e["scalars"] = {"test_acc_pct": e["selected_test_acc"]}
        e["scalar_stats"] = {"test_acc_pct": e["selected_test_acc_stats"]}
    close = evaluate_claim(claim, {"cpu": summary(GOOD)})  # usf 97.6 vs fa 95.1, spread ~0.6
    (row,) = close.rows
    assert row.verdict == PASS and row.margin == pytest.approx(97.5 - 95.5) and not cannot_fail(row)
    far = copy.deepcopy(GOOD)
    far["fa"] = rule_entry({"1": 50.0, "2": 50.1})
    far["fa"]["scalars"] = {"test_acc_pct": far["fa"]["selected_test_acc"]}
    far["fa"]["scalar_stats"] = {"test_acc_pct": far["fa"]["selected_test_acc_stats"]}
    res = evaluate_claim(claim, {"cpu": summary(far)})
    (row,) = res.rows
    assert row.margin > CANNOT_FAIL_SPREADS * row.spread and cannot_fail(row)
    assert status_class(res, [res], {}, {}, {})[0] == "PASS cannot fail"


def test_every_rule_has_its_own_colour_in_every_figure():
    from bpfree import list_rules
    from bpfree.plots import RULE_COLOURS
    assert set(list_rules()) <= set(RULE_COLOURS)
    assert len(set(RULE_COLOURS.values())) == len(RULE_COLOURS)


def test_figures_leave_out_runs_the_summary_does_not_count(tmp_path):
    """A stale run (an older config the summary no longer counts as OK) stays out of figures."""
    from bpfree.plots import current_runs
    runs = tmp_path / "runs"
    for run_id, seed in (("bp_seed1", 1), ("bp_seed0", 0)):
        (runs / run_id).mkdir(parents=True)
        (runs / run_id / "metrics.json").write_text(json.dumps(
            {"status": "OK", "seed": seed, "config": {"rule": {"name": "bp"}}}))
    summary_ = {"experiments": {"E1": {"rules": {"bp": {"status": {"1": "OK"}}}}}}
    assert [m["seed"] for m in current_runs(runs, summary_, "E1")] == [1]
    assert sorted(m["seed"] for m in current_runs(runs, None, "E1")) == [0, 1]


def _beats_claim(tmp_path, margin_se=None, bound="at_least"):
    from bpfree.claims import load_registry
    chk = {"rule": "usf", "ref": {"rule": "fa"}, bound: 0.0}
    if margin_se is not None:
        chk["margin_se"] = margin_se
    reg = copy.deepcopy(REGISTRY)
    reg["claims"].append({
        "id": "T-beats", "paper": "toy_paper", "provenance": {"kind": "qualitative", "source": "Sec. 5"},
        "experiment": "E1", "dataset": "MNIST", "architecture": "MLP", "metric": "test_acc_pct",
        "kind": "comparison", "profile": "cpu", "shortened": False, "statement": "usf beats fa",
        "checks": [chk], "tolerance_reason": "a margin in standard errors"})
    path = tmp_path / "beats.yaml"
    path.write_text(yaml.safe_dump(reg))
    return {c.id: c for c in load_registry(path)[1]}["T-beats"]


def _scalar_summary(per_rule: dict) -> dict:
    rules = {}
    for rule, accs in per_rule.items():
        e = rule_entry(accs)
        e["scalars"] = {"test_acc_pct": e["selected_test_acc"]}
        e["scalar_stats"] = {"test_acc_pct": {**e["selected_test_acc_stats"],
                                              "se": e["selected_test_acc_stats"]["std"] / len(accs) ** 0.5}}
        rules[rule] = e
    return {"cpu": summary(rules)}


def test_a_sign_settled_by_seed_noise_does_not_pass_a_margin_in_standard_errors(tmp_path):
    from bpfree.claims import ClaimsError, evaluate_claim
    noisy = _scalar_summary({"usf": {"1": 97.9, "2": 97.1, "3": 98.3}, "fa": {"1": 97.6, "2": 97.5, "3": 97.7}})
    assert evaluate_claim(_beats_claim(tmp_path), noisy).rows[0].verdict == PASS  # bare sign: +0.17
    (row,) = evaluate_claim(_beats_claim(tmp_path, margin_se=2), noisy).rows
    # paired differences +0.3, -0.4, +0.6: mean +0.167, SE 0.296; 2 SE asks for +0.59
    assert row.verdict == FAIL and "2 SE (= +0.593)" in row.tolerance and "paired over 3 seeds" in row.notes
    clear = _scalar_summary({"usf": {"1": 98.6, "2": 98.5, "3": 98.8}, "fa": {"1": 97.6, "2": 97.5, "3": 97.7}})
    assert evaluate_claim(_beats_claim(tmp_path, margin_se=2), clear).rows[0].verdict == PASS
    unpaired = _scalar_summary({"usf": {"4": 98.6, "5": 98.5, "6": 98.8}, "fa": {"1": 97.6, "2": 97.5, "3": 97.7}})
    assert "unpaired" in evaluate_claim(_beats_claim(tmp_path, margin_se=2), unpaired).rows[0].notes
    one = _scalar_summary({"usf": {"1": 99.0}, "fa": {"1": 97.0}})
    (row,) = evaluate_claim(_beats_claim(tmp_path, margin_se=2), one).rows
    assert row.verdict == FAIL and "needs 2+ seeds a side" in row.notes  # a margin it cannot measure fails
    with pytest.raises(ClaimsError, match="margin_se"):
        _beats_claim(tmp_path, margin_se=2, bound="within")


def test_claim_figures_carry_each_checks_paper_value_band_and_verdict(tmp_path):
    from bpfree.claims import evaluate_claim
    from bpfree.reporting import check_marks
    claim = _beats_claim(tmp_path)
    claim.checks.append({"rule": "usf", "target": 96.0, "tolerance": 1.0})
    res = evaluate_claim(claim, _scalar_summary({"usf": {"1": 97.9, "2": 97.1, "3": 98.3},
                                                 "fa": {"1": 97.6, "2": 97.5, "3": 97.7}}))
    sign, target = check_marks([res], "cpu", "E1")
    assert "kind" not in sign and sign["text"].endswith("difference ≥ 0: PASS")
    assert (target["kind"], target["value"], target["band"], target["rule"]) == ("target", 96.0, 1.0, "usf")
    assert target["text"].endswith("96 ± 1: FAIL")  # 97.77 is outside 96 ± 1
    assert check_marks([res], "gpu", "E1") == []


def test_long_seed_lists_read_as_ranges():
    from bpfree.claims import seed_list
    assert seed_list([str(s) for s in range(100, 0, -1)]) == "1-100"
    assert seed_list(["2021", "2023", "2022", "7"]) == "7, 2021-2023"
    assert seed_list(["1", "2", "5"]) == "1, 2, 5"


def test_a_check_pooled_over_sweep_points_averages_each_seed_over_the_points(tmp_path):
    from bpfree.claims import evaluate_claim, load_registry
    reg = copy.deepcopy(REGISTRY)
    reg["claims"].append({
        "id": "T-pool", "paper": "toy_paper", "provenance": {"kind": "figure", "source": "Fig. 2"},
        "experiment": "E1", "dataset": "MNIST", "architecture": "MLP", "metric": "test_acc_pct",
        "kind": "comparison", "profile": "cpu", "shortened": False, "statement": "usf above fa at every width",
        "checks": [{"id": "pooled", "rule": "usf", "at": [1, 2], "ref": {"rule": "fa"}, "at_least": 0.0,
                    "margin_se": 2}],
        "tolerance_reason": "pooled"})
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(reg))
    claim = {c.id: c for c in load_registry(path)[1]}["T-pool"]
    # usf - fa per seed: point 1 (+1, -1, +2), point 2 (+1, +3, +1): pooled (+1, +1, +1.5)
    summ = _scalar_summary({"usf@sweep=1": {"1": 91, "2": 89, "3": 92}, "fa@sweep=1": {"1": 90, "2": 90, "3": 90},
                            "usf@sweep=2": {"1": 81, "2": 83, "3": 81, "4": 99}, "fa@sweep=2": {"1": 80, "2": 80, "3": 80}})
    (row,) = evaluate_claim(claim, summ).rows
    assert row.rule == "pooled" and row.reproduced.startswith("86.17 ± 0.17 vs 85 ± 0 (diff +1.17)")
    assert row.verdict == PASS and "paired over 3 seeds" in row.notes and "left out 4" in row.notes
