"""Fetching absent raw data into the data directory, failing fast when offline.

Each function leaves files in the same layout the readers expect (torchvision's for images,
GLUE tsv for text), so a downloaded folder and a hand-copied one go through one code path
and one checksum check. Any failure becomes ``DownloadFailed`` with a one-line reason; the
caller turns it into MissingDataError so users never see a urllib traceback.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterable, Iterator, Mapping
from urllib.parse import urlparse

OFFLINE_ENV = "BPFREE_OFFLINE"
_PROBE_TIMEOUT_S = 3.0
_SOCKET_TIMEOUT_S = 60.0

HF_HUB_HOST = "huggingface.co"
GLUE_HUB_ID = "nyu-mll/glue"
# Unverified from this offline machine: the Hub copy of SICK with the original columns.
SICK_HUB_ID = "RobZamp/sick"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CUB200_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"


class DownloadFailed(Exception):
    """A download could not complete; the message is the short reason shown to users."""


def check_not_disabled() -> None:
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise DownloadFailed(f"downloads disabled by {OFFLINE_ENV}={os.environ[OFFLINE_ENV]}")


def check_online(url_or_host: str) -> None:
    """Fail in milliseconds instead of letting torchvision/HF retry for minutes offline."""
    check_not_disabled()
    parsed = urlparse(url_or_host if "//" in url_or_host else f"https://{url_or_host}")
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=_PROBE_TIMEOUT_S):
            pass
    except OSError as error:
        raise DownloadFailed(f"cannot reach {parsed.hostname}:{port} ({error})") from None


@contextlib.contextmanager
def _bounded_socket_timeout() -> Iterator[None]:
    """urllib inside torchvision has no timeout; a stalled mirror must not hang a stage."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_SOCKET_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _short_reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text[:300]


def download_torchvision(dataset_class_name: str, raw_dir: Path) -> None:
    """torchvision writes MNIST/raw, FashionMNIST/raw, cifar-10-batches-py, ... under root."""
    check_not_disabled()  # before the 1.5 s torchvision import
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, dataset_class_name)
    hosts = getattr(dataset_class, "mirrors", None) or [getattr(dataset_class, "url", "")]
    check_online(hosts[0])
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _bounded_socket_timeout():
            dataset_class(root=str(raw_dir), train=True, download=True)
    except Exception as error:  # torchvision raises RuntimeError/URLError/OSError alike
        raise DownloadFailed(_short_reason(error)) from None


def download_archive(url: str, raw_dir: Path) -> None:
    """For sets torchvision has no class for (Tiny-ImageNet): fetch the zip and extract."""
    check_not_disabled()
    from torchvision.datasets.utils import download_and_extract_archive

    check_online(url)
    raw_dir.mkdir(parents=True, exist_ok=True)
    try:
        with _bounded_socket_timeout():
            download_and_extract_archive(url, download_root=str(raw_dir), remove_finished=True)
    except Exception as error:
        raise DownloadFailed(_short_reason(error)) from None


def load_hub_dataset(hub_id: str, config: str | None, cache_dir: Path) -> Mapping:
    """Hugging Face ``load_dataset``; returns split name -> iterable of row dicts."""
    check_online(HF_HUB_HOST)
    try:
        import datasets

        return datasets.load_dataset(hub_id, config, cache_dir=str(cache_dir))
    except Exception as error:
        raise DownloadFailed(_short_reason(error)) from None


def write_tsv(path: Path, columns: list[str], rows: Iterable[Mapping]) -> None:
    """GLUE-style tsv (no quoting), written atomically so a killed download leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(columns)]
    for row in rows:
        values = [str(row[column]) for column in columns]
        if any("\t" in value or "\n" in value or "\r" in value for value in values):
            raise DownloadFailed(f"a row for {path.name} holds a tab or newline: {values!r}")
        lines.append("\t".join(values))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _rows(split: Iterable[Mapping], **renames: str) -> Iterator[dict]:
    for row in split:
        yield {target: row[source] for target, source in renames.items()}


def export_sst2(hub: Mapping, raw_dir: Path) -> None:
    folder = raw_dir / "glue" / "SST-2"
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        write_tsv(folder / name, ["sentence", "label"],
                  _rows(hub[split], sentence="sentence", label="label"))


def export_rte(hub: Mapping, raw_dir: Path) -> None:
    folder = raw_dir / "glue" / "RTE"
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        write_tsv(folder / name, ["sentence1", "sentence2", "label", "idx"],
                  _rows(hub[split], sentence1="sentence1", sentence2="sentence2",
                        label="label", idx="idx"))


def export_mnli(hub: Mapping, raw_dir: Path) -> None:
    folder = raw_dir / "glue" / "MNLI"
    for split, name in (("train", "train.tsv"),
                        ("validation_matched", "dev_matched.tsv"),
                        ("validation_mismatched", "dev_mismatched.tsv")):
        write_tsv(folder / name, ["sentence1", "sentence2", "gold_label"],
                  _rows(hub[split], sentence1="premise", sentence2="hypothesis",
                        gold_label="label"))


SICK_LABEL_NAMES = ("ENTAILMENT", "NEUTRAL", "CONTRADICTION")
_SICK_SEMEVAL_SET = {"train": "TRAIN", "validation": "TRIAL", "test": "TEST"}


def export_sick(hub: Mapping, raw_dir: Path) -> None:
    """Rebuild SICK.txt's columns from the Hub copy (integer labels in the MNLI order)."""
    def rows() -> Iterator[dict]:
        for split, semeval_set in _SICK_SEMEVAL_SET.items():
            for row in hub[split]:
                yield {
                    "pair_ID": row["id"],
                    "sentence_A": row["sentence_A"],
                    "sentence_B": row["sentence_B"],
                    "entailment_label": SICK_LABEL_NAMES[int(row["label"])],
                    "SemEval_set": semeval_set,
                }

    write_tsv(raw_dir / "SICK" / "SICK.txt",
              ["pair_ID", "sentence_A", "sentence_B", "entailment_label", "SemEval_set"], rows())


def download_from_hub(dataset: str, raw_dir: Path) -> None:
    hub_sources = {
        "sst2": (GLUE_HUB_ID, "sst2", export_sst2),
        "rte": (GLUE_HUB_ID, "rte", export_rte),
        "mnli": (GLUE_HUB_ID, "mnli", export_mnli),
        "sick": (SICK_HUB_ID, None, export_sick),
    }
    hub_id, config, export = hub_sources[dataset]
    hub = load_hub_dataset(hub_id, config, raw_dir / ".hf_cache")
    try:
        export(hub, raw_dir)
    except DownloadFailed:
        raise
    except Exception as error:
        raise DownloadFailed(f"unexpected columns from {hub_id}: {_short_reason(error)}") from None
