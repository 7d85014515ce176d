"""Prepared datasets: the byte-stable artefacts that experiments (and DVC) depend on.

A prepared folder holds the tensors (images) or jsonl files (text) plus manifest.json. The
manifest is written last and records the sha256 of every output, so a folder whose manifest
exists is complete, and loading can prove the outputs are the ones the manifest describes.
Outputs carry no timestamps or absolute paths: the same raw release gives identical bytes on
any machine, which is what lets DVC and result files cite a data hash.
"""
from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bpfree.data.checksums import sha256_file, verify_raw_files
from bpfree.data.errors import DataError
from bpfree.data.sources import ImageArrays, TextSplits, get_source, locate_raw
from bpfree.data.tokenization import TOKENIZER_NAME, load_tokenizer, train_tokenizer
from bpfree.provenance import default_file_mode

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSORS_NAME = "tensors.safetensors"
PREPARED_DIR_ENV = "BPFREE_PREPARED_DIR"
DEFAULT_PREPARED_DIR = "data/prepared"
_TENSOR_KEYS = ("x_train", "y_train", "x_test", "y_test")


def resolve_prepared_dir(name: str) -> Path:
    """Default home of a prepared set: $BPFREE_PREPARED_DIR/<name> (data/prepared/<name>)."""
    get_source(name)
    return Path(os.environ.get(PREPARED_DIR_ENV, DEFAULT_PREPARED_DIR)) / name


# ---------------------------------------------------------------- atomic writes


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Readers (and a crashed run) never see half a file: write beside it, then rename."""
    # A unique name rather than mkstemp, whose 0600 mode would survive the rename.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        # safetensors (like mkstemp) creates 0600; prepared data is shared (a Docker run as
        # root writes into the user's checkout): the mode a plain open() would give.
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text(path: Path, text: str) -> None:
    _write_atomically(path, lambda tmp: tmp.write_bytes(text.encode("utf-8")))


def _json_text(payload: dict) -> str:
    return json.dumps(payload, sort_keys=True, indent=2) + "\n"


# ---------------------------------------------------------------- statistics


def channel_mean_std(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean/std on the [0, 1] scale, from exact 256-bin histograms.

    Histograms make the result independent of summation order and need no float copy of
    the images (CIFAR as float64 would take 1.2 GB). std is the population std, the
    convention behind the usual CIFAR-10 constants (0.2470, 0.2435, 0.2616).
    """
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for channel in range(x.shape[1]):
        counts = np.bincount(x[:, channel].reshape(-1), minlength=256).astype(np.float64)
        total = counts.sum()
        mean = float((counts * levels).sum() / total)
        variance = float((counts * (levels - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(variance ** 0.5)
    return means, stds


def _class_counts(labels: np.ndarray | list[int], num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}")


# ---------------------------------------------------------------- prepare


def prepare_dataset(name: str, out_dir: Path | str, raw_dir: Path | str | None = None,
                    *, allow_unpinned: bool = False) -> dict:
    """Verify the raw release, write the prepared outputs into out_dir, return the manifest.

    raw_dir defaults to resolve_data_dir() ($BPFREE_DATA_DIR or data/raw). allow_unpinned
    accepts a raw release with no matching pin and records it as variant "unpinned".
    """
    source = get_source(name)
    raw_files = locate_raw(name, raw_dir)
    verified = verify_raw_files(name, raw_files, allow_unpinned=allow_unpinned)
    if source.pickled:  # unpickle only the bytes the check above verified
        data = source.read(raw_files, {key: entry["sha256"] for key, entry in verified.files.items()})
    else:
        data = source.read(raw_files)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Drop the old manifest first: if we die mid-way, the folder reads as unprepared.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    manifest = {
        "dataset": name,
        "description": source.description,
        "format_version": FORMAT_VERSION,
        "kind": source.kind,
        "raw_files": verified.files,
        "variant": verified.variant,
    }
    if isinstance(data, ImageArrays):
        manifest.update(_write_images(data, out_dir))
    else:
        manifest.update(_write_text_splits(data, out_dir))
    _write_text(out_dir / MANIFEST_NAME, _json_text(manifest))
    return manifest


def prepare_pinned(name: str, out_dir: Path | str, raw_dir: Path, expected_variant: str | None,
                   optional: bool = False) -> dict:
    """The prepare stage's work: prepare_dataset, once the raw files are shown to be the
    release params.yaml pins (another release stops here, with what to do). With `optional`,
    absent raw files are recorded in out_dir/MISSING.json ({"dataset", "message"}) instead
    of raising, so the experiments needing them show NOT RUN; returns {"missing": message}
    then, else the manifest."""
    from bpfree.data.errors import MissingDataError
    from bpfree.layout import MISSING_FILE
    from bpfree.provenance import atomic_write_json
    try:
        found = verify_raw_files(name, locate_raw(name, raw_dir)).variant
        if expected_variant is not None and found != expected_variant:
            raise DataError(f"the raw {name} files in {raw_dir} are release {found!r}, but params.yaml's "
                            f"data_variants.{name} is {expected_variant!r}: set it to {found!r} (DVC then re-runs "
                            f"everything prepared from it) or point BPFREE_DATA_DIR at the {expected_variant!r} files")
        return prepare_dataset(name, out_dir, raw_dir=raw_dir)
    except MissingDataError as exc:
        if not optional:
            raise
        # The recorded message names the data directory by its variable, not this machine's
        # path: MISSING.json is a DVC output, and dvc.lock must not differ between machines.
        message = str(exc).replace(f" (from BPFREE_DATA_DIR={raw_dir})", "")
        message = message.replace(str(raw_dir.resolve()), "$BPFREE_DATA_DIR").replace(str(raw_dir), "$BPFREE_DATA_DIR")
        atomic_write_json(Path(out_dir) / MISSING_FILE, {"dataset": name, "message": message})
        return {"missing": message}


def _write_images(data: ImageArrays, out_dir: Path) -> dict:
    num_classes = len(data.class_names)
    splits = {}
    for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(y):
            raise DataError(f"{split}: expected uint8 [N,C,H,W] images with N labels, got "
                            f"{x.dtype} {x.shape} and {y.shape} labels")
        _check_labels(y, num_classes, split)
        splits[split] = {"class_counts": _class_counts(y, num_classes), "count": int(len(y)),
                         "shape": list(x.shape)}
    tensors = {
        "x_train": torch.from_numpy(np.ascontiguousarray(data.x_train)),
        "y_train": torch.from_numpy(np.ascontiguousarray(data.y_train, dtype=np.int64)),
        "x_test": torch.from_numpy(np.ascontiguousarray(data.x_test)),
        "y_test": torch.from_numpy(np.ascontiguousarray(data.y_test, dtype=np.int64)),
    }
    tensors_path = out_dir / TENSORS_NAME
    _write_atomically(tensors_path, lambda tmp: save_file(tensors, str(tmp)))
    mean, std = channel_mean_std(data.x_train)
    return {
        "class_names": list(data.class_names),
        "mean": mean,
        "num_classes": num_classes,
        "outputs": {TENSORS_NAME: sha256_file(tensors_path)},
        "splits": splits,
        "std": std,
    }


def _write_text_splits(data: TextSplits, out_dir: Path) -> dict:
    num_classes = len(data.class_names)
    splits, outputs = {}, {}
    for split, examples in data.splits.items():
        labels = np.asarray([example["label"] for example in examples], dtype=np.int64)
        _check_labels(labels, num_classes, split)
        file_name = f"{split}.jsonl"
        text = "".join(json.dumps(example, sort_keys=True, ensure_ascii=False) + "\n"
                       for example in examples)
        _write_text(out_dir / file_name, text)
        outputs[file_name] = sha256_file(out_dir / file_name)
        splits[split] = {"class_counts": _class_counts(labels, num_classes),
                         "count": len(examples), "file": file_name}
    # Fitted on the training split only, so nothing about the test split leaks into it.
    tokenizer = train_tokenizer(example[field] for example in data.splits["train"]
                                for field in data.text_fields)
    _write_text(out_dir / TOKENIZER_NAME, tokenizer.to_str())
    outputs[TOKENIZER_NAME] = sha256_file(out_dir / TOKENIZER_NAME)
    return {
        "class_names": list(data.class_names),
        "tokenizer": {"file": TOKENIZER_NAME, "kind": "bpe", "trained_on": "train",
                      "vocab_size": tokenizer.get_vocab_size()},
        "label_mapping": {name: index for index, name in enumerate(data.class_names)},
        "num_classes": num_classes,
        "outputs": outputs,
        "splits": splits,
        "text_fields": list(data.text_fields),
    }


# ---------------------------------------------------------------- load


@dataclass
class PreparedImages:
    """Tensors already on the requested device: uint8 images, int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    manifest: dict
    num_classes: int
    mean: tuple[float, ...]  # per channel, [0, 1] scale, from the training images
    std: tuple[float, ...]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def variant(self) -> str:
        return self.manifest["variant"]


@dataclass
class PreparedText:
    splits: dict[str, list[dict]]
    manifest: dict
    num_classes: int
    class_names: list[str]
    tokenizer: object  # a tokenizers.Tokenizer fitted on the training split

    @property
    def text_fields(self) -> list[str]:
        return list(self.manifest["text_fields"])


def read_manifest(out_dir: Path | str) -> dict:
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path} does not exist: {out_dir} was never prepared or its preparation "
                        f"did not finish; run bpfree.data.prepare_dataset(name, {str(out_dir)!r})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); prepare the dataset again") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.get('format_version')!r}, this code "
                        f"reads {FORMAT_VERSION}; prepare the dataset again")
    return manifest


def _verify_outputs(out_dir: Path, manifest: dict) -> None:
    for file_name, expected in sorted(manifest["outputs"].items()):
        path = out_dir / file_name
        if not path.is_file():
            raise DataError(f"{path} is missing although {MANIFEST_NAME} lists it; prepare again")
        actual = sha256_file(path)
        if actual != expected:
            raise DataError(f"{path} does not match {MANIFEST_NAME}: sha256 {actual}, manifest "
                            f"says {expected}; the file is corrupt or from another preparation, "
                            f"prepare again")


def load_prepared(out_dir: Path | str, device: torch.device | str = "cpu",
                  *, verify: bool = True) -> PreparedImages:
    """Load a prepared image set; verify=False skips re-hashing (the shapes are still checked)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.get("kind") != "images":
        raise DataError(f"{out_dir} holds the {manifest.get('kind')} set {manifest.get('dataset')!r}; "
                        f"use load_prepared_text for it")
    if verify:
        _verify_outputs(out_dir, manifest)
    try:
        tensors = load_file(str(out_dir / TENSORS_NAME), device=str(device))
    except (SafetensorError, OSError) as error:
        raise DataError(f"cannot read {out_dir / TENSORS_NAME} ({error}); prepare again") from None
    for split in ("train", "test"):
        shape = manifest["splits"][split]["shape"]
        x, y = tensors.get(f"x_{split}"), tensors.get(f"y_{split}")
        if x is None or y is None or list(x.shape) != shape or list(y.shape) != shape[:1]:
            raise DataError(f"{out_dir / TENSORS_NAME} does not hold the {split} tensors of shape "
                            f"{shape} that {MANIFEST_NAME} describes; prepare again")
    return PreparedImages(
        **{key: tensors[key] for key in _TENSOR_KEYS},
        manifest=manifest,
        num_classes=int(manifest["num_classes"]),
        mean=tuple(manifest["mean"]),
        std=tuple(manifest["std"]),
    )


def load_prepared_text(out_dir: Path | str, *, verify: bool = True) -> PreparedText:
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest.get("kind") != "text":
        raise DataError(f"{out_dir} holds the {manifest.get('kind')} set {manifest.get('dataset')!r}; "
                        f"use load_prepared for it")
    if verify:
        _verify_outputs(out_dir, manifest)
    splits = {}
    for split, info in manifest["splits"].items():
        path = out_dir / info["file"]
        try:
            # split("\n"), not splitlines(): sentences may hold U+2028 and friends.
            lines = path.read_text(encoding="utf-8").split("\n")
            splits[split] = [json.loads(line) for line in lines if line]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read {path} ({error}); prepare again") from None
        if len(splits[split]) != info["count"]:
            raise DataError(f"{path} has {len(splits[split])} examples, manifest says "
                            f"{info['count']}; prepare again")
    if "tokenizer" not in manifest:
        raise DataError(f"{out_dir} was prepared without a tokenizer (an older preparation); prepare again")
    return PreparedText(splits=splits, manifest=manifest,
                        num_classes=int(manifest["num_classes"]),
                        class_names=list(manifest["class_names"]),
                        tokenizer=load_tokenizer(out_dir / manifest["tokenizer"]["file"]))


def load_prepared_data(out_dir: Path | str, device: torch.device | str = "cpu",
                       *, verify: bool = True) -> PreparedImages | PreparedText:
    """Images or text, whichever the folder holds (the trainer handles both)."""
    if read_manifest(out_dir).get("kind") == "text":
        return load_prepared_text(out_dir, verify=verify)
    return load_prepared(out_dir, device, verify=verify)
