"""Data errors users can act on.

Every failure to find or trust raw data surfaces as one of these, with a message that says
what to do, instead of a torch/urllib/pickle traceback from deep inside a download.
"""
from __future__ import annotations


class DataError(Exception):
    """Raw or prepared data cannot be used as it is."""


class MissingDataError(DataError):
    """Raw files are absent and could not be downloaded."""


class ChecksumError(DataError):
    """A raw file's hash matches no release pinned in bpfree/data/checksums.json.

    The first offending file is exposed as attributes so callers and tests need not parse
    the message; ``mismatches`` holds every offending file.
    """

    def __init__(self, message: str, mismatches: list[dict]):
        super().__init__(message)
        self.mismatches = mismatches
        first = mismatches[0] if mismatches else {}
        self.path = first.get("path")
        self.actual_sha256 = first.get("actual_sha256")
        self.expected = first.get("expected", [])
