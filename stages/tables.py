"""Stage: claims tables for every paper and results/README.md, from ALL profiles' summaries.

Why all profiles: the default profile is smoke, but the claims are checked by committed cpu
and gpu results; the tables must show those even when only smoke was re-run.
"""
from __future__ import annotations

import argparse

from stages import RESULTS, entry, log


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.tables")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    from bpfree.claims import evaluate_all, load_claims, load_summaries
    from bpfree.reporting import write_reports

    for path in write_reports(args.results):
        log(f"wrote {path}")
    results = evaluate_all(load_claims(), load_summaries(args.results))
    for res in results:
        log(f"  {res.claim.id} [{res.claim.profile}]: {res.verdict}" + (f" ({res.reason})" if res.reason else ""))
    return 0


if __name__ == "__main__":
    entry(main)
