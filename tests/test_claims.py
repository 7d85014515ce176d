"""Every claim whose profile has committed results must PASS; the others are skipped, saying why.

These read results/<profile>/summary.json through bpfree.claims, the same code that writes
the tables, so CI fails exactly when a table would show a claim not reproducing.
"""
from pathlib import Path

import pytest

from bpfree.claims import PASS, evaluate_claim, claims_for_params, load_claims, load_registry, load_summaries
from bpfree.config import load_params

REPO = Path(__file__).resolve().parents[1]
CLAIMS = load_claims()
SUMMARIES = load_summaries(REPO / "results")


def test_registry_matches_params():
    """A claim pointing at an experiment, rule or profile that params.yaml lacks would never run."""
    assert claims_for_params(CLAIMS, load_params(REPO / "params.yaml")) == []


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
    detail = "\n".join(f"  {r.rule}: paper {r.paper}, reproduced {r.reproduced}, tol {r.tolerance}, "
                       f"{r.verdict} ({r.notes})" for r in result.rows)
    assert result.verdict == PASS, f"{claim.id} is {result.verdict}: {result.reason}\n{detail}"
