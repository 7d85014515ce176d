"""Stage: the gpu queue's command line (plan, pack, unpack, run, land); bpfree.gpu_queue has
the queue itself and what each command does."""
from __future__ import annotations

import argparse

from bpfree.gpu_queue import add_commands, run_command
from stages import entry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.gpu_queue",
                                     description="advance the gpu profile whenever a GPU machine is lent for a few minutes")
    add_commands(parser)
    for line in run_command(parser.parse_args(argv)):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    entry(main)
