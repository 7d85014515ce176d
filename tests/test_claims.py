"""Every claim whose profile has committed results must PASS; the others are skipped, saying why.

These read results/<profile>/summary.json through bpfree.claims, the same code that writes
the tables, so CI fails when a table would show a claim not reproducing. Rows listed in a
claim's `known_failures` (with the reason) are expected to FAIL and are reported as xfail;
if one starts to PASS the test fails too, so the registry is kept true.
"""
from pathlib import Path

import pytest

from bpfree.claims import evaluate_claim, claims_for_params, load_claims, load_registry, load_summaries, row_status
from bpfree.config import load_params

REPO = Path(__file__).resolve().parents[1]
CLAIMS = load_claims()
SUMMARIES = load_summaries(REPO / "results")


def test_registry_matches_params():
    """A claim pointing at an experiment, rule or profile that params.yaml lacks would never run."""
    assert claims_for_params(CLAIMS, load_params(REPO / "params.yaml")) == []


def test_registry_covers_section_b():
    ids = {c.id for c in CLAIMS}
    assert {"B1-conservation-law", "B3-alignment-dynamics", "B4-benign-overparameterisation",
            "B5-cifar100-k-class", "B6-tinyimagenet-k-class"} <= ids


def test_registry_covers_section_a():
    ids = {c.id for c in CLAIMS}
    assert {"A1-mnist-lenet-error", "A1-cifar10-lenet-sgd-error", "A1-cifar10-lenet-ordering",
            "A2-mnist-mlp-accuracy"} <= ids
    papers, _ = load_registry()
    assert all(c.paper in papers for c in CLAIMS)


@pytest.mark.parametrize("claim", CLAIMS, ids=[c.id for c in CLAIMS])
def test_claim_reproduces(claim):
    if claim.profile not in SUMMARIES:
        reason = f"{claim.id}: no committed results/{claim.profile}/summary.json (profile '{claim.profile}' not run yet)"
        print(reason)
        pytest.skip(reason)
    result = evaluate_claim(claim, SUMMARIES)
    problems, expected, not_run = [], [], []
    for row in result.rows:
        status = row_status(claim, row)  # comparison claims key known failures by the check's label
        line = (f"{row.rule}: paper {row.paper}, reproduced {row.reproduced}, tol {row.tolerance}, "
                f"{row.verdict} ({row.notes})")
        if status == "now passes":
            problems.append(f"{line}\n    now PASSES: remove it from known_failures")
        elif status == "known failure":
            expected.append(line)
        elif status == "not run":
            not_run.append(line)
        elif status == "new failure":
            problems.append(line)
    assert not problems, f"{claim.id} does not reproduce:\n  " + "\n  ".join(problems)
    if not_run:
        pytest.skip(f"{claim.id}: rows not run: " + "; ".join(not_run))
    if expected:
        pytest.xfail(f"{claim.id}: known failures: " + "; ".join(expected))


def test_an_unstable_seed_is_counted_and_said():
    """A seed whose loss spiked 10-fold and recovered under the divergence bounds stays in the
    numbers, and the row says which seed and how far."""
    from bpfree.claims import _rule_data, load_registry
    _, claims = load_registry()
    claim = next(c for c in claims if c.id == "A1-mnist-lenet-error")
    entry = {"status": {"1": "OK", "2": "OK"}, "selected_test_acc": {"1": 99.0, "2": 98.0},
             "test_error_stats": {"mean": 1.5, "std": 0.7, "n": 2},
             "loss_instability": {"2": {"diverged_epoch": None, "unstable_epoch": 40, "peak_ratio": 38.6}}}
    summaries = {"cpu": {"experiments": {"A1_mnist_lenet": {"rules": {"fa": entry}}}}}
    data = _rule_data(claim, "fa", summaries)
    assert data.status == "OK" and data.n == 2
    assert "UNSTABLE: seed 2 (loss 39x its first epoch's, from epoch 40)" in data.reason


def test_checks_the_runs_cannot_fail_are_declared_with_a_reason():
    """A passing check whose bound lies more than CANNOT_FAIL_SPREADS observed spreads beyond
    every seed (bpfree.claims.cannot_fail) proves nothing about these runs: each must be
    listed in its claim's `cannot_fail` with why it is kept (the front page then does not
    count it as a PASS), and a listed one that no longer qualifies must be removed."""
    from bpfree.claims import cannot_fail
    undeclared, stale = [], []
    for claim in CLAIMS:
        if claim.profile not in SUMMARIES:
            continue
        rows = evaluate_claim(claim, SUMMARIES).rows
        flagged = {r.rule for r in rows if cannot_fail(r)}
        undeclared += [f"{claim.id}: {label}" for label in sorted(flagged - set(claim.cannot_fail))]
        stale += [f"{claim.id}: {label}" for label in sorted(set(claim.cannot_fail) - flagged)]
    assert not undeclared, "checks the runs cannot fail, not declared in cannot_fail:\n  " + "\n  ".join(undeclared)
    assert not stale, "declared cannot_fail but the runs could fail them now (remove):\n  " + "\n  ".join(stale)


def test_known_failure_texts_type_no_measured_numbers():
    """Measured values go stale when results change: known-failure and cannot-fail texts point
    to the table rows or the experiment instead of typing decimals (settings such as an lr of
    3e-3 or 50 epochs are not measurements and may stay)."""
    import re
    decimal = re.compile(r"(?<![\w.])[-+]?\d+\.\d+(?![\w.])")
    typed = [f"{c.id} [{key}]: {decimal.findall(text)}" for c in CLAIMS
             for key, text in {**c.known_failures, **c.cannot_fail}.items() if decimal.search(text)]
    assert not typed, "typed measurements in claims.yaml prose:\n  " + "\n  ".join(typed)
