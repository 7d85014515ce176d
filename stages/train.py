"""Stage: run every (rule, seed) of one experiment for the current profile.

The work (skip, reuse, verify or train each run, write its metrics) is bpfree.runner's;
this shell reads the command line. Under torchrun every rank trains; only rank 0 speaks
and writes results.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from bpfree.distributed import leader_process
from bpfree.layout import LAYOUT, Layout
from bpfree.runner import TrainRequest, train_experiment
from stages import entry, log as _log

LEADER = leader_process()


def log(msg: str) -> None:
    if LEADER:
        _log(msg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.train")
    parser.add_argument("experiment")
    parser.add_argument("--profile", default=None, help="default: params.yaml's profile")
    parser.add_argument("--rules", nargs="*", help="only these rules (to shard runs over processes)")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds")
    parser.add_argument("--resume-every", type=float, default=30.0, metavar="SECONDS",
                        help="save a run's state after an epoch once this long has passed since the "
                             "last save (0: after every epoch); a killed run continues from it")
    parser.add_argument("--force", action="store_true",
                        help="re-train every run and write its metrics, even where committed metrics "
                             "with the same config and code hash exist")
    parser.add_argument("--reuse", "--keep-finished", action="store_true",
                        default=os.environ.get("BPFREE_REUSE") == "1",
                        help="trust committed metrics whose config hash matches, without re-training "
                             "them on this machine, even if the code changed since (they keep their own "
                             "commit and code hash); for reusing published results or continuing a long "
                             "sweep across commits (also: BPFREE_REUSE=1)")
    parser.add_argument("--results", default=str(LAYOUT.results), help="results root (default: results)")
    parser.add_argument("--checkpoints", default=str(LAYOUT.checkpoints_root),
                        help="checkpoints root (default: checkpoints)")
    return parser


def main(argv: list[str]) -> int:
    from bpfree.config import DEFAULT_PROFILE
    args = build_parser().parse_args(argv)
    layout = Layout(Path(args.results), Path(args.checkpoints), LAYOUT.prepared_root)
    request = TrainRequest(args.experiment, args.profile or DEFAULT_PROFILE, tuple(args.rules or ()),
                           tuple(args.seeds or ()), args.resume_every, args.force, args.reuse, layout)
    train_experiment(request, log, leader=LEADER)
    return 0


if __name__ == "__main__":
    entry(main)
