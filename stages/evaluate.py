"""Stage: aggregate the current profile's runs into results/<profile>/summary.json, its mean
learning curves and the curve overlays DVC plots (bpfree.summary does the work)."""
from __future__ import annotations

import argparse

from stages import entry, log


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate")
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    from bpfree.config import DEFAULT_PROFILE, load_params
    from bpfree.layout import LAYOUT
    from bpfree.provenance import atomic_write_json
    from bpfree.summary import summarise, write_curve_overlays, write_learning_curves

    params = load_params()
    profile = args.profile or DEFAULT_PROFILE
    LAYOUT.pruning(profile).mkdir(parents=True, exist_ok=True)  # a DVC output even when unused
    summary = summarise(params, profile, log=log)
    n_curves = write_learning_curves(summary.pop("learning_curves"), LAYOUT.learning_curves(profile))
    write_curve_overlays(LAYOUT.learning_curves(profile), LAYOUT.plots(profile))
    atomic_write_json(LAYOUT.summary(profile), summary)
    n_runs = sum(len(r["status"]) for e in summary["experiments"].values() for r in e["rules"].values())
    log(f"[{profile}] summarised {n_runs} runs -> {LAYOUT.summary(profile)}; "
        f"{len(summary['mismatches'])} checkpoint mismatches; {n_curves} learning curves -> "
        f"{LAYOUT.learning_curves(profile)}")
    for m in summary["mismatches"]:
        log(f"  MISMATCH {m}")
    return 0


if __name__ == "__main__":
    entry(main)
