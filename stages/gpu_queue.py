"""Stage: the gpu queue's command line (plan, pack, unpack, run, land); bpfree.gpu_queue has
the queue itself and what each command does."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from bpfree.gpu_queue import PARTS, land, pack, pending, run_queue, unpack
from stages import entry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.gpu_queue", description="advance the gpu profile whenever a GPU machine is lent for a few minutes")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="the pending runs, most valuable first")
    p.add_argument("--profile", default="gpu")
    p = sub.add_parser("pack", help="split prepared datasets into parts of at most --part-mib MiB")
    p.add_argument("datasets", nargs="+")
    p.add_argument("--part-mib", type=float, default=60.0)
    p.add_argument("--out", default=str(PARTS))
    p = sub.add_parser("unpack", help="join the datasets whose parts have all arrived")
    p.add_argument("--parts", default=str(PARTS))
    p = sub.add_parser("run", help="train the top pending runs that fit --budget-s, copying each to --out")
    p.add_argument("--budget-s", type=float, required=True)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--profile", default="gpu")
    p = sub.add_parser("land", help="copy returned runs the current params define into results/")
    p.add_argument("returned")
    p.add_argument("--profile", default="gpu")
    args = parser.parse_args(argv)
    if args.command == "plan":
        jobs = pending(args.profile)
        for j in jobs:
            flag = "" if j["data"] else f"  [needs data/prepared/{j['dataset']}]"
            print(f"{j['experiment']}/{j['run_id']}  ~{j['minutes']:g} min  {j['why']}{flag}")
        print(f"{len(jobs)} pending gpu runs, ~{sum(j['minutes'] for j in jobs) / 60:.1f} h on one H100")
    elif args.command == "pack":
        for dataset in args.datasets:
            m = pack(dataset, Path(args.out), args.part_mib)
            print(f"{dataset}: {len(m['parts'])} part(s) under {args.out}")
    elif args.command == "unpack":
        for dataset, absent in unpack(Path(args.parts)).items():
            print(f"{dataset}: waiting for {', '.join(absent)}")
    elif args.command == "run":
        for r in run_queue(args.budget_s, Path(args.out), args.profile):
            print(f"{r['experiment']}/{r['run_id']}: {r['status']}")
    else:
        landed, left = land(Path(args.returned), args.profile)
        print(f"landed {len(landed)} run(s); left {len(left)} the current params do not define: {', '.join(left) or '-'}")
        if landed:
            print(f"next: python -m stages.evaluate --profile {args.profile}, then dvc repro (tables)")
    return 0


if __name__ == "__main__":
    entry(main)
