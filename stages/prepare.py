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
    from bpfree.data import DataError, MissingDataError, list_datasets, prepare_dataset, resolve_data_dir
    from bpfree.data.checksums import verify_raw_files
    from bpfree.data.sources import locate_raw
    from bpfree.provenance import atomic_write_json

    params = load_params()  # a bad params.yaml should fail here, before minutes of training
    if args.dataset not in list_datasets():
        raise ConfigError("dataset", args.dataset, "unknown dataset", list_datasets())
    out = args.out or str(PREPARED / args.dataset)
    raw = resolve_data_dir()
    try:
        expected = params["data_variants"].get(args.dataset)
        found = verify_raw_files(args.dataset, locate_raw(args.dataset, raw)).variant
        if expected is not None and found != expected:
            raise DataError(f"the raw {args.dataset} files in {raw} are release {found!r}, but params.yaml's "
                            f"data_variants.{args.dataset} is {expected!r}: set it to {found!r} (DVC then re-runs "
                            f"everything prepared from it) or point BPFREE_DATA_DIR at the {expected!r} files")
        manifest = prepare_dataset(args.dataset, out, raw_dir=raw)
    except MissingDataError as exc:
        if not args.optional:
            raise
        # The recorded message names the data directory by its variable, not this machine's
        # path: MISSING.json is a DVC output, and dvc.lock must not differ between machines.
        message = str(exc).replace(f" (from BPFREE_DATA_DIR={raw})", "")
        message = message.replace(str(raw.resolve()), "$BPFREE_DATA_DIR").replace(str(raw), "$BPFREE_DATA_DIR")
        atomic_write_json(Path(out) / MISSING_FILE, {"dataset": args.dataset, "message": message})
        log(f"{args.dataset}: not available ({Path(out) / MISSING_FILE}); its experiments show NOT RUN")
        return 0
    log(f"prepared {args.dataset} (variant {manifest.get('variant')}) from {raw} -> {out}")
    return 0


if __name__ == "__main__":
    entry(main)
