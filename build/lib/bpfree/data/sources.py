"""Where each dataset's raw files live and how to read them.

Raw files are read in the layouts torchvision and GLUE produce, under one data directory,
so that a normal download, a hand-copied folder and the shared offline disk are the same
case. Readers return plain numpy arrays / row dicts; turning them into prepared outputs is
prepared.py's job.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from bpfree.data import downloads
from bpfree.data.errors import DataError, MissingDataError

DATA_DIR_ENV = "BPFREE_DATA_DIR"
DEFAULT_DATA_DIR = "data/raw"
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# One label order for every NLI set, so SICK can stand in for MNLI: GLUE's MNLI order.
NLI_CLASSES = ("entailment", "neutral", "contradiction")
RTE_CLASSES = ("entailment", "not_entailment")
SST2_CLASSES = ("negative", "positive")


def resolve_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV, DEFAULT_DATA_DIR))


@dataclass(frozen=True)
class ImageArrays:
    """Official train/test split; x is uint8 [N, C, H, W], y int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class TextSplits:
    """split name -> examples; each example has the text fields plus integer ``label``."""

    splits: dict[str, list[dict]]
    class_names: tuple[str, ...]
    text_fields: tuple[str, ...]


@dataclass(frozen=True)
class RawSource:
    name: str
    kind: str  # "images" or "text"
    description: str
    expected: tuple[str, ...]  # paths relative to the data dir; trailing "/" = a folder
    read: Callable[..., ImageArrays | TextSplits]  # (files) or, if pickled, (files, digests)
    download: Callable[[Path], None]
    # Folders that hold the same files by base name (a distro package), tried after raw_dir.
    fallback_dirs: tuple[Path, ...] = field(default=())
    # Pickled files (CIFAR): read(files, digests) unpickles exactly the bytes whose sha256 the
    # release check verified, so a file swapped between the check and the read never unpickles.
    pickled: bool = False

    def locate(self, raw_dir: Path) -> dict[str, Path] | None:
        candidates = [{key: raw_dir / key for key in self.expected}]
        for folder in self.fallback_dirs:
            candidates.append({key: folder / Path(key).name for key in self.expected})
        for files in candidates:
            if all(path.exists() for path in files.values()):
                return files
        return None


# ---------------------------------------------------------------- image readers


def read_idx_gz(path: Path) -> np.ndarray:
    """The MNIST idx format: big-endian magic (dtype code 0x08 = uint8, ndim), dims, data."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of uint8 (bad magic {data[:4].hex()})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} but holds {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def read_mnist_layout(files: dict[str, Path], class_names: tuple[str, ...]) -> ImageArrays:
    by_name = {Path(key).name: path for key, path in files.items()}

    def images(name: str) -> np.ndarray:
        return read_idx_gz(by_name[name])[:, None, :, :]

    def labels(name: str) -> np.ndarray:
        return read_idx_gz(by_name[name]).astype(np.int64)

    return ImageArrays(
        x_train=images("train-images-idx3-ubyte.gz"),
        y_train=labels("train-labels-idx1-ubyte.gz"),
        x_test=images("t10k-images-idx3-ubyte.gz"),
        y_test=labels("t10k-labels-idx1-ubyte.gz"),
        class_names=class_names,
    )


def _load_pickle(path: Path, sha256: str | None = None) -> dict:
    """CIFAR batches are pickles. Read once; with `sha256` (what the release check verified)
    the very bytes that match it are unpickled, never a second read of the file."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise DataError(f"{path} changed after its sha256 was verified; prepare again")
    return pickle.loads(data, encoding="bytes")


def _entry(batch: dict, key: str):
    """Official batches have bytes keys, re-pickled ones str keys; accept both."""
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    raise DataError(f"CIFAR batch lacks key {key!r}; keys are {sorted(map(str, batch))}")


def _decode_names(names) -> tuple[str, ...]:
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def _cifar_arrays(paths: list[Path], label_key: str, digests: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for path, digest in zip(paths, digests):
        batch = _load_pickle(path, digest)
        xs.append(np.asarray(_entry(batch, "data"), dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(_entry(batch, label_key), dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def read_cifar10(files: dict[str, Path], digests: dict[str, str] | None = None) -> ImageArrays:
    root, digests = "cifar-10-batches-py/", digests or {}
    train = [f"{root}data_batch_{i}" for i in range(1, 6)]
    x_train, y_train = _cifar_arrays([files[k] for k in train], "labels", [digests.get(k) for k in train])
    test = f"{root}test_batch"
    x_test, y_test = _cifar_arrays([files[test]], "labels", [digests.get(test)])
    meta = f"{root}batches.meta"
    names = _decode_names(_entry(_load_pickle(files[meta], digests.get(meta)), "label_names"))
    return ImageArrays(x_train, y_train, x_test, y_test, names)


def read_cifar100(files: dict[str, Path], digests: dict[str, str] | None = None) -> ImageArrays:
    """Fine labels (100 classes), as in the papers that report CIFAR-100 accuracy."""
    root, digests = "cifar-100-python/", digests or {}
    train, test, meta = f"{root}train", f"{root}test", f"{root}meta"
    x_train, y_train = _cifar_arrays([files[train]], "fine_labels", [digests.get(train)])
    x_test, y_test = _cifar_arrays([files[test]], "fine_labels", [digests.get(test)])
    names = _decode_names(_entry(_load_pickle(files[meta], digests.get(meta)), "fine_label_names"))
    return ImageArrays(x_train, y_train, x_test, y_test, names)


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:  # a few Tiny-ImageNet images are greyscale
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_tiny_imagenet(files: dict[str, Path]) -> ImageArrays:
    """Classes in sorted wnid order (ImageFolder's); the labelled val split serves as test."""
    root = files["tiny-imagenet-200/"]
    wnids = sorted((root / "wnids.txt").read_text(encoding="utf-8").split())
    class_index = {wnid: i for i, wnid in enumerate(wnids)}
    words = {}
    for line in (root / "words.txt").read_text(encoding="utf-8").splitlines():
        wnid, _, description = line.partition("\t")
        words[wnid] = description.strip()

    train_paths, train_labels = [], []
    for wnid in wnids:
        for path in sorted((root / "train" / wnid / "images").glob("*.JPEG")):
            train_paths.append(path)
            train_labels.append(class_index[wnid])

    test_paths, test_labels = [], []
    for line in (root / "val" / "val_annotations.txt").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        filename, wnid = line.split("\t")[:2]
        test_paths.append(root / "val" / "images" / filename)
        test_labels.append(class_index[wnid])

    def stack(paths: list[Path]) -> np.ndarray:
        if not paths:
            raise DataError(f"no images found under {root}")
        return np.ascontiguousarray(np.stack([_read_rgb(p) for p in paths]).transpose(0, 3, 1, 2))

    return ImageArrays(
        x_train=stack(train_paths),
        y_train=np.asarray(train_labels, dtype=np.int64),
        x_test=stack(test_paths),
        y_test=np.asarray(test_labels, dtype=np.int64),
        class_names=tuple(words.get(wnid, wnid) for wnid in wnids),
    )


CUB_IMAGE_SIZE = 224  # ImageNet evaluation transform, once at prepare time: short side 256, centre 224


def _read_rgb_centre_crop(path: Path, size: int = CUB_IMAGE_SIZE) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = round(size * 256 / 224) / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def read_cub200(files: dict[str, Path]) -> ImageArrays:
    """CUB-200-2011 with its official train/test split; labels 0..199 in classes.txt order.

    Bird photos vary in size, so each is resized (short side 256) and centre-cropped to
    224 x 224 once here, the transfer protocol's input size for ImageNet-pretrained nets.
    """
    root = files["CUB_200_2011/"]

    def table(name: str) -> dict[int, str]:
        rows = {}
        for line in (root / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                key, value = line.split(maxsplit=1)
                rows[int(key)] = value.strip()
        return rows

    paths, labels, is_train = table("images.txt"), table("image_class_labels.txt"), table("train_test_split.txt")
    classes = table("classes.txt")
    if not paths or set(paths) != set(labels) or set(paths) != set(is_train):
        raise DataError(f"{root}: images.txt, image_class_labels.txt and train_test_split.txt "
                        "do not list the same image ids")
    names = tuple(classes[k].split(".", 1)[-1].replace("_", " ") for k in sorted(classes))
    split = {True: ([], []), False: ([], [])}
    for image_id in sorted(paths):
        xs, ys = split[is_train[image_id] == "1"]
        xs.append(_read_rgb_centre_crop(root / "images" / paths[image_id]))
        ys.append(int(labels[image_id]) - 1)

    def stack(xs):
        if not xs:
            raise DataError(f"no images in one split of {root}")
        return np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2))

    return ImageArrays(stack(split[True][0]), np.asarray(split[True][1], dtype=np.int64),
                       stack(split[False][0]), np.asarray(split[False][1], dtype=np.int64), names)

# ---------------------------------------------------------------- text readers


def read_tsv(path: Path) -> list[dict[str, str]]:
    """GLUE tsv: no quoting (RTE sentences contain bare quotes), CRLF tolerated (SICK)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    if not lines:
        raise DataError(f"{path} is empty")
    header = lines[0].split("\t")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        values = line.split("\t")
        if len(values) != len(header):
            raise DataError(f"{path}:{number}: {len(values)} columns, header has {len(header)}")
        rows.append(dict(zip(header, values)))
    return rows


def _column(row: dict, names: tuple[str, ...], path: Path) -> str:
    for name in names:
        if name in row:
            return row[name]
    raise DataError(f"{path} has none of the columns {names}; it has {sorted(row)}")


def parse_label(value: str, class_names: tuple[str, ...], where: str) -> int:
    """Accept both GLUE's label names and the integer ids Hugging Face exports."""
    text = value.strip()
    lowered = [name.lower() for name in class_names]
    if text.lower() in lowered:
        return lowered.index(text.lower())
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise DataError(f"{where}: label {value!r} is none of {class_names} or 0..{len(class_names) - 1}")


_SENTENCE = ("sentence",)
_PREMISE = ("sentence1", "premise", "sentence_A")
_HYPOTHESIS = ("sentence2", "hypothesis", "sentence_B")


def _examples(rows: list[dict], path: Path, split: str, class_names: tuple[str, ...],
              label_columns: tuple[str, ...], pair: bool) -> list[dict]:
    examples = []
    for number, row in enumerate(rows, start=2):
        example = {
            "label": parse_label(_column(row, label_columns, path), class_names, f"{path}:{number}"),
            "split": split,
        }
        if pair:
            example["premise"] = _column(row, _PREMISE, path)
            example["hypothesis"] = _column(row, _HYPOTHESIS, path)
        else:
            example["sentence"] = _column(row, _SENTENCE, path)
        examples.append(example)
    return examples


def read_glue_splits(files: dict[str, Path], split_files: dict[str, str],
                     class_names: tuple[str, ...], label_columns: tuple[str, ...],
                     pair: bool) -> TextSplits:
    splits = {
        split: _examples(read_tsv(files[key]), files[key], split, class_names, label_columns, pair)
        for split, key in split_files.items()
    }
    fields = ("premise", "hypothesis") if pair else ("sentence",)
    return TextSplits(splits=splits, class_names=class_names, text_fields=fields)


SICK_SPLITS = {"TRAIN": "train", "TRIAL": "trial", "TEST": "test"}


def read_sick(files: dict[str, Path]) -> TextSplits:
    """SemEval_set gives the official split; labels use the MNLI order (NLI_CLASSES)."""
    path = files["SICK/SICK.txt"]
    rows = read_tsv(path)
    splits: dict[str, list[dict]] = {name: [] for name in SICK_SPLITS.values()}
    for number, row in enumerate(rows, start=2):
        semeval_set = row["SemEval_set"].strip()
        if semeval_set not in SICK_SPLITS:
            raise DataError(f"{path}:{number}: SemEval_set {semeval_set!r} not in {sorted(SICK_SPLITS)}")
        split = SICK_SPLITS[semeval_set]
        splits[split].append({
            "label": parse_label(row["entailment_label"], NLI_CLASSES, f"{path}:{number}"),
            "premise": row["sentence_A"],
            "hypothesis": row["sentence_B"],
            "split": split,
        })
    return TextSplits(splits=splits, class_names=NLI_CLASSES, text_fields=("premise", "hypothesis"))


# ---------------------------------------------------------------- registry

_SST2 = {"train": "glue/SST-2/train.tsv", "dev": "glue/SST-2/dev.tsv"}
_RTE = {"train": "glue/RTE/train.tsv", "dev": "glue/RTE/dev.tsv"}
_MNLI = {"train": "glue/MNLI/train.tsv", "dev_matched": "glue/MNLI/dev_matched.tsv",
         "dev_mismatched": "glue/MNLI/dev_mismatched.tsv"}

RAW_SOURCES: dict[str, RawSource] = {
    source.name: source
    for source in (
        RawSource(
            "mnist", "images", "MNIST handwritten digits, 60k/10k",
            tuple(f"MNIST/raw/{n}" for n in MNIST_FILES),
            partial(read_mnist_layout, class_names=tuple(str(d) for d in range(10))),
            partial(downloads.download_torchvision, "MNIST"),
        ),
        RawSource(
            "fashion_mnist", "images", "Fashion-MNIST (Zalando), 60k/10k",
            tuple(f"FashionMNIST/raw/{n}" for n in MNIST_FILES),
            partial(read_mnist_layout, class_names=FASHION_MNIST_CLASSES),
            partial(downloads.download_torchvision, "FashionMNIST"),
            fallback_dirs=(DEBIAN_FASHION_MNIST_DIR,),
        ),
        RawSource(
            "cifar10", "images", "CIFAR-10, 50k/10k",
            tuple(f"cifar-10-batches-py/{n}" for n in
                  ("batches.meta", "data_batch_1", "data_batch_2", "data_batch_3",
                   "data_batch_4", "data_batch_5", "test_batch")),
            read_cifar10,
            partial(downloads.download_torchvision, "CIFAR10"),
            pickled=True,
        ),
        RawSource(
            "cifar100", "images", "CIFAR-100 (fine labels), 50k/10k",
            ("cifar-100-python/meta", "cifar-100-python/test", "cifar-100-python/train"),
            read_cifar100,
            partial(downloads.download_torchvision, "CIFAR100"),
            pickled=True,
        ),
        RawSource(
            "tiny_imagenet", "images", "Tiny-ImageNet-200, 100k train / 10k val (as test), 64x64",
            ("tiny-imagenet-200/",),
            read_tiny_imagenet,
            partial(downloads.download_archive, downloads.TINY_IMAGENET_URL),
        ),
        RawSource(
            "cub200", "images", "CUB-200-2011 birds, 5994 train / 5794 test, 224x224 centre crops",
            ("CUB_200_2011/",),
            read_cub200,
            partial(downloads.download_archive, downloads.CUB200_URL),
        ),
        RawSource(
            "sst2", "text", "GLUE SST-2 sentiment, train/dev",
            tuple(_SST2.values()),
            partial(read_glue_splits, split_files=_SST2, class_names=SST2_CLASSES,
                    label_columns=("label",), pair=False),
            partial(downloads.download_from_hub, "sst2"),
        ),
        RawSource(
            "rte", "text", "GLUE RTE entailment, train/dev (unlabelled test not read)",
            tuple(_RTE.values()),
            partial(read_glue_splits, split_files=_RTE, class_names=RTE_CLASSES,
                    label_columns=("label",), pair=True),
            partial(downloads.download_from_hub, "rte"),
        ),
        RawSource(
            "sick", "text", "SICK 3-way entailment, official TRAIN/TRIAL/TEST",
            ("SICK/SICK.txt",),
            read_sick,
            partial(downloads.download_from_hub, "sick"),
        ),
        RawSource(
            "mnli", "text", "GLUE MNLI, train/dev_matched/dev_mismatched",
            tuple(_MNLI.values()),
            partial(read_glue_splits, split_files=_MNLI, class_names=NLI_CLASSES,
                    label_columns=("gold_label", "label"), pair=True),
            partial(downloads.download_from_hub, "mnli"),
        ),
    )
}


def list_datasets() -> list[str]:
    return sorted(RAW_SOURCES)


def get_source(name: str) -> RawSource:
    if name not in RAW_SOURCES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    return RAW_SOURCES[name]


def locate_raw(name: str, raw_dir: Path | str | None = None, *, download: bool = True) -> dict[str, Path]:
    """Find the raw files, downloading once if absent; MissingDataError if that fails."""
    source = get_source(name)
    if raw_dir is not None and Path(raw_dir) != resolve_data_dir():
        raw_dir, origin = Path(raw_dir), "given as raw_dir"
    elif DATA_DIR_ENV in os.environ:
        raw_dir, origin = resolve_data_dir(), f"from {DATA_DIR_ENV}={os.environ[DATA_DIR_ENV]}"
    else:
        raw_dir, origin = resolve_data_dir(), f"{DATA_DIR_ENV} unset, default {DEFAULT_DATA_DIR}"
    files = source.locate(raw_dir)
    if files is not None:
        return files
    reason = "downloading was not attempted (download=False)"
    if download:
        try:
            source.download(raw_dir)
            reason = "the download finished but the expected files are still absent"
        except downloads.DownloadFailed as error:
            reason = f"download failed: {error}"
        files = source.locate(raw_dir)
        if files is not None:
            return files
    raise MissingDataError(_missing_message(source, raw_dir, origin, reason))


def _missing_message(source: RawSource, raw_dir: Path, origin: str, reason: str) -> str:
    absolute = raw_dir.resolve()
    lines = []
    for key in source.expected:
        path = absolute / key
        lines.append(f"  {'present' if path.exists() else 'MISSING'}  {path}")
    also = "".join(f"\n(also looked in {folder}, by file name)" for folder in source.fallback_dirs)
    return (
        f"Raw data for dataset '{source.name}' ({source.description}) not found in "
        f"{absolute} ({origin}). Expected:\n" + "\n".join(lines) + also +
        f"\nThen {reason}.\nPut the files there in this layout, or set {DATA_DIR_ENV} to a "
        f"folder that has them (e.g. ../shared/data)."
    )
