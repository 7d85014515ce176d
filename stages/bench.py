"""Stage: step time and memory of every rule against BP -> results/bench.json and bench.md.

Why a stage: the speed of each rule is part of what this suite reports, so it is rebuilt
with the pipeline, per profile (smoke: two small cases, a few steps; cpu: one thread, as
the cpu runs train; gpu: every case on the GPU). Each profile's record replaces only its
own entry in bench.json, so the cpu and gpu measurements sit side by side.
"""
from __future__ import annotations

import argparse
import json

from stages import RESULTS, entry, log

BENCH_JSON = RESULTS / "bench.json"
BENCH_MD = RESULTS / "bench.md"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.bench")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    args = parser.parse_args(argv)

    import torch

    from bpfree.benchmark import PROFILES, render_markdown, run_benchmark
    from bpfree.config import DEFAULT_PROFILE, ConfigError, load_params
    from bpfree.provenance import atomic_write_json, atomic_write_text

    profile = args.profile or DEFAULT_PROFILE
    if profile not in PROFILES:
        raise ConfigError("profile", profile, "no benchmark preset", list(PROFILES))
    if profile == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("profile", profile, "the gpu benchmark needs a CUDA device; use smoke or cpu here")
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # as the cpu profile's runs train
    log(f"[{profile}] benchmarking on {device}")
    record = run_benchmark(profile, device, log=log)
    try:
        records = json.loads(BENCH_JSON.read_text())
    except (OSError, ValueError):
        records = {}
    records[profile] = record
    atomic_write_json(BENCH_JSON, records)
    atomic_write_text(BENCH_MD, render_markdown(records))
    log(f"wrote {BENCH_JSON} and {BENCH_MD}")
    return 0


if __name__ == "__main__":
    entry(main)
