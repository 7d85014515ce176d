"""Pinning raw files to known releases.

A dataset may exist in several trustworthy releases ("variants"), e.g. the official CIFAR-10
batches and the reconstruction on the shared offline disk. Each variant is a named set of
file hashes in checksums.json; a raw folder is accepted only when ALL its files match ONE
variant, and the variant's name goes into the prepared manifest so results say which data
produced them. sha256 is the pin; an upstream md5 (as published by torchvision) stands in
only where the sha256 of a release is still unknown (``"sha256": null``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from bpfree.data.errors import ChecksumError

PINS_PATH = Path(__file__).with_name("checksums.json")
UNPINNED_VARIANT = "unpinned"
_CHUNK_BYTES = 4 << 20


def file_digests(path: Path) -> dict[str, str]:
    """sha256 and md5 in one chunked pass, so 30 MB batches never sit in memory twice."""
    sha256, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            sha256.update(chunk)
            md5.update(chunk)
    return {"sha256": sha256.hexdigest(), "md5": md5.hexdigest()}


def sha256_file(path: Path) -> str:
    return file_digests(path)["sha256"]


def tree_digests(root: Path) -> dict[str, str]:
    """One pin for a folder of many small files (Tiny-ImageNet's 120k JPEGs).

    Hashes the sorted listing "sha256  relative/path" so renames, additions and content
    changes all change the pin; no md5 exists for such a listing.
    """
    listing = hashlib.sha256()
    paths = sorted(
        p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")
    )
    for path in paths:
        relative = path.relative_to(root).as_posix()
        listing.update(f"{sha256_file(path)}  {relative}\n".encode())
    return {"sha256": listing.hexdigest(), "md5": ""}


def digests_for(path: Path) -> dict[str, str]:
    return tree_digests(path) if path.is_dir() else file_digests(path)


@functools.lru_cache(maxsize=1)
def load_pins() -> dict:
    with open(PINS_PATH, encoding="utf-8") as handle:
        pins = json.load(handle)
    return {name: entry for name, entry in pins.items() if not name.startswith("_")}


@dataclass(frozen=True)
class VerifiedRaw:
    """Outcome of verification, in the shape the manifest records it."""

    variant: str
    files: dict[str, dict[str, str]]  # layout key -> {"sha256": ..., "verified_by": ...}


def _pin_matches(pin: dict, actual: dict[str, str]) -> str | None:
    """Which hash vouched for the file, or None; sha256 wins whenever it is known."""
    if pin.get("sha256"):
        return "sha256" if pin["sha256"] == actual["sha256"] else None
    if pin.get("md5") and actual.get("md5"):
        return "md5" if pin["md5"] == actual["md5"] else None
    return None


def _describe_pins(variants: dict, key: str) -> list[dict]:
    described = []
    for variant_name, variant in sorted(variants.items()):
        pin = variant.get("files", {}).get(key)
        if pin is None:
            continue
        if pin.get("sha256"):
            described.append({"variant": variant_name, "sha256": pin["sha256"]})
        elif pin.get("md5"):
            described.append({"variant": variant_name, "md5": pin["md5"]})
    return described


def verify_raw_files(
    dataset: str, files: dict[str, Path], *, allow_unpinned: bool = False
) -> VerifiedRaw:
    """Accept the raw files only as a whole, known release.

    ``allow_unpinned`` exists for the first person to fetch a new release: it records the
    hashes under variant "unpinned" so they can be reviewed and pasted into checksums.json.
    """
    variants = load_pins().get(dataset, {}).get("variants", {})
    actual = {key: digests_for(path) for key, path in sorted(files.items())}

    for variant_name, variant in sorted(variants.items()):
        pinned = variant.get("files", {})
        if set(pinned) != set(actual):
            continue
        methods = {key: _pin_matches(pinned[key], actual[key]) for key in actual}
        if all(methods.values()):
            return VerifiedRaw(
                variant=variant_name,
                files={
                    key: {"sha256": actual[key]["sha256"], "verified_by": methods[key]}
                    for key in actual
                },
            )

    if allow_unpinned:
        return VerifiedRaw(
            variant=UNPINNED_VARIANT,
            files={
                key: {"sha256": digest["sha256"], "verified_by": UNPINNED_VARIANT}
                for key, digest in actual.items()
            },
        )
    raise _mismatch_error(dataset, files, actual, variants)


def _mismatch_error(
    dataset: str, files: dict[str, Path], actual: dict, variants: dict
) -> ChecksumError:
    mismatches = []
    matched_variants: dict[str, list[str]] = {}
    for key in actual:
        expected = _describe_pins(variants, key)
        matching = [
            name
            for name, variant in sorted(variants.items())
            if key in variant.get("files", {})
            and _pin_matches(variant["files"][key], actual[key])
        ]
        if matching:
            matched_variants[key] = matching
            continue
        mismatches.append(
            {
                "key": key,
                "path": str(Path(files[key]).resolve()),
                "actual_sha256": actual[key]["sha256"],
                "actual_md5": actual[key]["md5"],
                "expected": expected,
            }
        )

    if not mismatches:
        found = ", ".join(f"{k}: {'/'.join(v)}" for k, v in sorted(matched_variants.items()))
        return ChecksumError(
            f"{dataset}: every raw file is known, but they come from different releases "
            f"({found}); a raw folder must hold one release. Replace the folder with a "
            f"complete copy of one variant.",
            [],
        )

    blocks = []
    for item in mismatches:
        if item["expected"]:
            expected_lines = "\n".join(
                f"      {'sha256 ' + e['sha256'] if 'sha256' in e else 'md5 ' + e['md5']}"
                f"  (variant {e['variant']})"
                for e in item["expected"]
            )
        else:
            expected_lines = f"      (no hash pinned yet for {dataset})"
        blocks.append(
            f"  file {item['path']}\n"
            f"    actual sha256 {item['actual_sha256']} (md5 {item['actual_md5'] or '-'})\n"
            f"    expected one of:\n{expected_lines}"
        )
    message = (
        f"Checksum mismatch for {dataset} raw data:\n"
        + "\n".join(blocks)
        + "\nThe file is corrupt, truncated or from a different release. Delete it and let "
        "it download again, or, if it is a new release you trust, add its hashes as a new "
        f"variant under \"{dataset}\" in {PINS_PATH.name} (prepare_dataset(..., "
        "allow_unpinned=True) prints them into the manifest)."
    )
    return ChecksumError(message, mismatches)


def write_pins(pins: dict, path: Path = PINS_PATH) -> None:
    """Keep the pin file diff-friendly: sorted keys, fixed indentation, atomic replace."""
    text = json.dumps(pins, sort_keys=True, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    load_pins.cache_clear()
