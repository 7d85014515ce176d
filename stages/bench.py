"""Stage: step time and memory of every rule against BP -> results/bench.json and bench.md.

Why a stage: the speed of each rule is part of what this suite reports, so it is rebuilt
with the pipeline, per profile (smoke: two small cases, a few steps; cpu: one thread, as
the cpu runs train; gpu: every case on the GPU). Each profile's record replaces only its
own entry in bench.json, so the cpu and gpu measurements sit side by side.
"""
from __future__ import annotations

import argparse

from stages import RESULTS, entry, log

BENCH_JSON = RESULTS / "bench.json"
BENCH_MD = RESULTS / "bench.md"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    args = parser.parse_args(argv)

    from bpfree.benchmark import record_profile
    from bpfree.config import DEFAULT_PROFILE

    record_profile(args.profile or DEFAULT_PROFILE, BENCH_JSON, BENCH_MD, log=log)
    log(f"wrote {BENCH_JSON} and {BENCH_MD}")
    return 0


if __name__ == "__main__":
    entry(main)
