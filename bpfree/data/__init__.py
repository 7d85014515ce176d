"""Raw data -> verified, byte-stable prepared data, plus seeded derived subsets.

A leaf package: it imports torch/numpy/safetensors (and torchvision / datasets only to
download), never bpfree.rules, bpfree.models or bpfree.training.
"""
from bpfree.data.checksums import verify_raw_files
from bpfree.data.derived import (
    k_class_subset,
    noisy_subset,
    split_mnist_tasks,
    task_subset,
    train_val_split,
)
from bpfree.data.errors import ChecksumError, DataError, MissingDataError
from bpfree.data.prepared import (
    PreparedImages,
    PreparedText,
    channel_mean_std,
    load_prepared,
    load_prepared_data,
    load_prepared_text,
    prepare_dataset,
    prepare_pinned,
    read_manifest,
    resolve_prepared_dir,
)
from bpfree.data.sources import NLI_CLASSES, list_datasets, locate_raw, resolve_data_dir

__all__ = [
    "ChecksumError",
    "DataError",
    "MissingDataError",
    "NLI_CLASSES",
    "PreparedImages",
    "PreparedText",
    "channel_mean_std",
    "k_class_subset",
    "list_datasets",
    "load_prepared",
    "load_prepared_data",
    "load_prepared_text",
    "locate_raw",
    "noisy_subset",
    "prepare_dataset",
    "prepare_pinned",
    "read_manifest",
    "resolve_data_dir",
    "resolve_prepared_dir",
    "split_mnist_tasks",
    "task_subset",
    "train_val_split",
    "verify_raw_files",
]
