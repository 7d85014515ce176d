"""Stage: learning-rate search on the validation split (bpfree.tuning has the search).

    python -m stages.tune A1_mnist_lenet --profile gpu [--rules fa dfa]
"""
from __future__ import annotations

import argparse

from bpfree.tuning import tune_experiment
from stages import entry, log


def main(argv: list[str]) -> int:
    from bpfree.config import DEFAULT_PROFILE
    parser = argparse.ArgumentParser(prog="python -m stages.tune")
    parser.add_argument("experiment")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    parser.add_argument("--rules", nargs="*", help="only these rules (to shard over processes)")
    args = parser.parse_args(argv)
    tune_experiment(args.experiment, args.profile or DEFAULT_PROFILE, args.rules, log)
    return 0


if __name__ == "__main__":
    entry(main)
