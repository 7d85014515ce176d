"""One case of the step-time benchmark from the command line (the pipeline's stage is
`python -m stages.bench`, which writes results/bench.json and results/bench.md).

    python -m benchmarks.step_time --case bert_sick --device cuda --rules fa kp dtp
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bpfree.benchmark import CASES, benchmark_case


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="mlp_mnist", choices=sorted(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rules", nargs="*", help="default: every rule that can train the case's model")
    parser.add_argument("--out", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args(argv)
    result = benchmark_case(CASES[args.case], torch.device(args.device), args.warmup, args.steps, args.repeats,
                            rules=args.rules, log=print)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps({"device": args.device, "torch": torch.__version__, **result}, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
