"""Stage: raw data from BPFREE_DATA_DIR -> data/prepared/<dataset>/ (tensors + manifest).

Why a separate stage: decoding and checksumming raw files once, then caching the tensors
in DVC, keeps every train stage's start-up to a single safetensors read.
"""
from __future__ import annotations

import argparse

from pathlib import Path

from stages import MISSING_FILE, PREPARED, entry, log


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.prepare")
    parser.add_argument("dataset")
    parser.add_argument("--out", default=None, help="default: data/prepared/<dataset>")
    parser.add_argument("--optional", action="store_true",
                        help="absent raw files are recorded (MISSING.json), not an error; the "
                             "experiments that need them then show NOT RUN with the reason")
    args = parser.parse_args(argv)

    from bpfree.config import ConfigError, load_params
    from bpfree.data import list_datasets, prepare_pinned, resolve_data_dir

    params = load_params()  # a bad params.yaml should fail here, before minutes of training
    if args.dataset not in list_datasets():
        raise ConfigError("dataset", args.dataset, "unknown dataset", list_datasets())
    out = args.out or str(PREPARED / args.dataset)
    raw = resolve_data_dir()
    manifest = prepare_pinned(args.dataset, out, raw, params["data_variants"].get(args.dataset), args.optional)
    if "missing" in manifest:
        log(f"{args.dataset}: not available ({Path(out) / MISSING_FILE}); its experiments show NOT RUN")
    else:
        log(f"prepared {args.dataset} (variant {manifest.get('variant')}) from {raw} -> {out}")
    return 0


if __name__ == "__main__":
    entry(main)
