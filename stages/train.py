"""Stage: run every (rule, seed) of one experiment for the current profile.

The work (skip, reuse, verify or train each run, write its metrics) is bpfree.runner's, the
options are its TrainRequest's; this shell reads the command line. Under torchrun every rank
trains; only rank 0 speaks and writes results.
"""
from __future__ import annotations

import argparse

from bpfree.distributed import leader_process
from bpfree.runner import TrainRequest, train_experiment
from stages import entry, log as _log

LEADER = leader_process()


def log(msg: str) -> None:
    if LEADER:
        _log(msg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.train")
    TrainRequest.add_arguments(parser)
    return parser


def main(argv: list[str]) -> int:
    train_experiment(TrainRequest.from_arguments(build_parser().parse_args(argv)), log, leader=LEADER)
    return 0


if __name__ == "__main__":
    entry(main)
