"""bpfree.data on the real offline copies (../shared/data) plus small synthetic layouts.

Real-data tests skip, saying why, when the shared folder is absent; synthetic layouts cover
the code paths whose data is not available offline (CIFAR-100, Tiny-ImageNet, MNLI).
"""
from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

import bpfree.data as data
from bpfree.data import (
    ChecksumError,
    DataError,
    MissingDataError,
    k_class_subset,
    noisy_subset,
    split_mnist_tasks,
    task_subset,
    train_val_split,
)
from bpfree.data import downloads
from bpfree.data.checksums import PINS_PATH

DATA_DIR = Path(
    os.environ.get("BPFREE_DATA_DIR")
    or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
PACKAGE_DIR = Path(data.__file__).parent


def require_raw(*relative: str) -> Path:
    missing = [r for r in relative if not (DATA_DIR / r).exists()]
    if missing:
        pytest.skip(f"real data absent: {', '.join(missing)} not under {DATA_DIR} "
                    f"(set BPFREE_DATA_DIR to the shared data folder)")
    return DATA_DIR


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests must never download, even on a machine that is online."""
    monkeypatch.setenv(downloads.OFFLINE_ENV, "1")


@pytest.fixture(scope="module")
def mnist_prepared(tmp_path_factory) -> tuple[Path, dict]:
    raw = require_raw("MNIST/raw")
    out = tmp_path_factory.mktemp("mnist")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(downloads.OFFLINE_ENV, "1")
        manifest = data.prepare_dataset("mnist", out, raw_dir=raw)
    return out, manifest


def files_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------- registry and pins


def test_registry_lists_every_dataset_and_rejects_unknown_names(tmp_path):
    assert data.list_datasets() == sorted(
        ["mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "cub200",
         "sst2", "rte", "sick", "mnli"])
    with pytest.raises(ValueError) as caught:
        data.prepare_dataset("imagenet", tmp_path)
    assert "imagenet" in str(caught.value)
    assert "mnist" in str(caught.value) and "tiny_imagenet" in str(caught.value)


def test_checksum_file_is_sorted_and_pins_known_releases():
    text = PINS_PATH.read_text(encoding="utf-8")
    pins = json.loads(text)
    assert text == json.dumps(pins, sort_keys=True, indent=2) + "\n"
    cifar = pins["cifar10"]["variants"]
    assert set(cifar) == {"official", "reconstructed-shared"}
    assert cifar["official"]["archives"]["cifar-10-python.tar.gz"]["md5"] == \
        "c58f30108f718f92721af3b95e74349a"
    assert all(pin["sha256"] is None for pin in cifar["official"]["files"].values())
    assert all(len(pin["sha256"]) == 64 for pin in cifar["reconstructed-shared"]["files"].values())


def test_data_package_is_a_leaf():
    forbidden = ("bpfree.rules", "bpfree.models", "bpfree.training")
    for path in PACKAGE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            assert not any(n.startswith(forbidden) for n in names), (path.name, names)


# ---------------------------------------------------------------- real images


def test_mnist_prepare_load_round_trip(mnist_prepared):
    out, manifest = mnist_prepared
    assert manifest["variant"] == "official"
    assert sorted(manifest["raw_files"]) == sorted(
        f"MNIST/raw/{n}" for n in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                   "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    assert all(f["verified_by"] == "sha256" for f in manifest["raw_files"].values())

    loaded = data.load_prepared(out)
    assert loaded.x_train.shape == (60000, 1, 28, 28) and loaded.x_train.dtype == torch.uint8
    assert loaded.x_test.shape == (10000, 1, 28, 28)
    assert loaded.y_train.dtype == torch.int64 and loaded.num_classes == 10
    for split, y, total in (("train", loaded.y_train, 60000), ("test", loaded.y_test, 10000)):
        counts = manifest["splits"][split]["class_counts"]
        assert sum(counts) == total == len(y)
        assert torch.bincount(y, minlength=10).tolist() == counts
    assert manifest["splits"]["test"]["class_counts"][1] == 1135  # the official count of "1"
    assert loaded.mean[0] == pytest.approx(0.1307, abs=1e-4)
    assert loaded.std[0] == pytest.approx(0.3081, abs=1e-4)
    assert loaded.x_train.float().div(255).mean().item() == pytest.approx(loaded.mean[0], abs=1e-5)


def test_prepare_is_byte_stable(mnist_prepared, tmp_path):
    first, _ = mnist_prepared
    data.prepare_dataset("mnist", tmp_path / "again", raw_dir=DATA_DIR)
    assert files_bytes(first) == files_bytes(tmp_path / "again")
    assert sorted(files_bytes(first)) == ["manifest.json", "tensors.safetensors"]


def test_load_prepared_rejects_corrupt_or_incomplete_outputs(mnist_prepared, tmp_path):
    source, _ = mnist_prepared
    copy = tmp_path / "copy"
    shutil.copytree(source, copy, copy_function=shutil.copyfile)
    blob = bytearray((copy / "tensors.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (copy / "tensors.safetensors").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="does not match manifest.json"):
        data.load_prepared(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="never prepared"):
        data.load_prepared(copy)


def test_corrupted_raw_file_raises_checksum_error_naming_file_and_hashes(tmp_path):
    raw = require_raw("MNIST/raw")
    copy = tmp_path / "MNIST" / "raw"
    copy.mkdir(parents=True)
    for path in (raw / "MNIST" / "raw").iterdir():
        shutil.copyfile(path, copy / path.name)  # copyfile: the shared files are read-only
    victim = copy / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 0x01
    victim.write_bytes(bytes(blob))
    pinned = json.loads(PINS_PATH.read_text())["mnist"]["variants"]["official"]["files"]
    expected = pinned["MNIST/raw/t10k-labels-idx1-ubyte.gz"]["sha256"]

    with pytest.raises(ChecksumError) as caught:
        data.prepare_dataset("mnist", tmp_path / "out", raw_dir=tmp_path)
    message = str(caught.value)
    actual = data.checksums.sha256_file(victim)
    assert str(victim.resolve()) in message
    assert expected in message and actual in message
    assert caught.value.actual_sha256 == actual and len(caught.value.mismatches) == 1
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cifar10_records_reconstructed_variant(tmp_path):
    raw = require_raw("cifar-10-batches-py")
    manifest = data.prepare_dataset("cifar10", tmp_path, raw_dir=raw)
    assert manifest["variant"] == "reconstructed-shared"
    assert "cifar-10-batches-py/lossless_mask.npz" not in manifest["raw_files"]
    assert manifest["splits"]["train"]["class_counts"] == [5000] * 10
    assert manifest["splits"]["test"]["shape"] == [10000, 3, 32, 32]
    assert manifest["class_names"][0] == "airplane" and manifest["class_names"][9] == "truck"
    assert manifest["mean"] == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-4)
    assert manifest["std"] == pytest.approx([0.2470, 0.2435, 0.2616], abs=1e-4)
    loaded = data.load_prepared(tmp_path, verify=False)
    assert loaded.variant == "reconstructed-shared" and loaded.x_train.shape == (50000, 3, 32, 32)


def test_fashion_mnist_from_data_dir_or_debian_package(tmp_path):
    source = data.sources.get_source("fashion_mnist")
    if source.locate(DATA_DIR) is None and source.locate(tmp_path / "empty") is None:
        pytest.skip("Fashion-MNIST absent: neither FashionMNIST/raw in the data dir nor the "
                    "Debian package dataset-fashion-mnist is installed")
    manifest = data.prepare_dataset("fashion_mnist", tmp_path / "out", raw_dir=DATA_DIR)
    assert manifest["variant"] in {"official", "debian-package"}
    assert manifest["splits"]["train"]["class_counts"] == [6000] * 10
    assert manifest["class_names"][9] == "Ankle boot"


# ---------------------------------------------------------------- missing data


def test_missing_files_offline_raise_missing_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("BPFREE_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(MissingDataError) as caught:
        data.prepare_dataset("cifar100", tmp_path / "out")
    message = str(caught.value)
    assert "cifar100" in message and "BPFREE_DATA_DIR" in message
    assert str((tmp_path / "nowhere" / "cifar-100-python" / "train").resolve()) in message
    assert "BPFREE_OFFLINE" in message


def test_failed_download_becomes_one_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets

    class UnreachableMnist:
        mirrors = ["https://mirror.invalid/mnist/"]

        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("simulated: network is unreachable")

    monkeypatch.delenv(downloads.OFFLINE_ENV)
    monkeypatch.setattr(downloads, "check_online", lambda host: None)
    monkeypatch.setattr(torchvision.datasets, "MNIST", UnreachableMnist)
    with pytest.raises(MissingDataError) as caught:
        data.prepare_dataset("mnist", tmp_path / "out", raw_dir=tmp_path / "raw")
    message = str(caught.value)
    assert "URLError" in message and "network is unreachable" in message
    assert "BPFREE_DATA_DIR" in message and "train-images-idx3-ubyte.gz" in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_offline_check_is_fast_and_converted(monkeypatch):
    monkeypatch.delenv(downloads.OFFLINE_ENV)
    monkeypatch.setattr(downloads.socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    with pytest.raises(downloads.DownloadFailed, match="cannot reach huggingface.co:443"):
        downloads.check_online(downloads.HF_HUB_HOST)


# ---------------------------------------------------------------- real text


def test_sick_prepare_counts_and_label_mapping(tmp_path, monkeypatch):
    raw = require_raw("SICK/SICK.txt")
    monkeypatch.setenv("BPFREE_DATA_DIR", str(raw))  # exercises resolve_data_dir
    manifest = data.prepare_dataset("sick", tmp_path / "a")
    assert manifest["variant"] == "official-shared"
    assert manifest["label_mapping"] == {"entailment": 0, "neutral": 1, "contradiction": 2}
    totals = np.sum([s["class_counts"] for s in manifest["splits"].values()], axis=0).tolist()
    assert totals == [2821, 5595, 1424]  # README: official label counts
    assert sorted(manifest["splits"]) == ["test", "train", "trial"]
    assert sum(s["count"] for s in manifest["splits"].values()) == 9840

    text = data.load_prepared_text(tmp_path / "a")
    first = text.splits["train"][0]
    assert set(first) == {"premise", "hypothesis", "label", "split"}
    assert first["label"] == 1 and first["split"] == "train"  # pair 1 is NEUTRAL
    data.prepare_dataset("sick", tmp_path / "b")
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")
    with pytest.raises(DataError, match="load_prepared_text"):
        data.load_prepared(tmp_path / "a")


def test_glue_sst2_and_rte_counts(tmp_path):
    raw = require_raw("glue/SST-2/train.tsv", "glue/RTE/train.tsv")
    sst2 = data.prepare_dataset("sst2", tmp_path / "sst2", raw_dir=raw)
    assert {s: v["count"] for s, v in sst2["splits"].items()} == {"train": 67349, "dev": 872}
    assert sst2["splits"]["train"]["class_counts"] == [29780, 37569]
    rte = data.prepare_dataset("rte", tmp_path / "rte", raw_dir=raw)
    assert {s: v["count"] for s, v in rte["splits"].items()} == {"train": 2490, "dev": 277}
    example = data.load_prepared_text(tmp_path / "rte").splits["train"][0]
    assert example["premise"].startswith("No Weapons of Mass Destruction") and example["label"] == 1


# ---------------------------------------------------------------- synthetic layouts


def write_cifar100(root: Path, train: int, test: int) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("train", train), ("test", test)):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"fine_labels": [i % 100 for i in range(count)],
                 b"coarse_labels": [i % 20 for i in range(count)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"fine_label_names": [f"class{i}".encode() for i in range(100)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def test_cifar100_layout_needs_a_pin_unless_allowed(tmp_path):
    write_cifar100(tmp_path / "raw", train=200, test=100)
    with pytest.raises(ChecksumError) as caught:
        data.prepare_dataset("cifar100", tmp_path / "out", raw_dir=tmp_path / "raw")
    assert "variant official" in str(caught.value) and "md5 " in str(caught.value)

    manifest = data.prepare_dataset("cifar100", tmp_path / "out", raw_dir=tmp_path / "raw",
                                    allow_unpinned=True)
    assert manifest["variant"] == "unpinned" and manifest["num_classes"] == 100
    loaded = data.load_prepared(tmp_path / "out")
    assert loaded.x_train.shape == (200, 3, 32, 32) and loaded.y_test.tolist()[:3] == [0, 1, 2]
    assert loaded.class_names[99] == "class99"


def test_tiny_imagenet_layout(tmp_path):
    from PIL import Image

    root = tmp_path / "raw" / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius auratus\nn02\ttabby, tabby cat\n")
    annotations = []
    for c, wnid in enumerate(wnids):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (c * 100, i, 7)).save(images / f"{wnid}_{i}.JPEG")
        Image.new("L", (8, 8), 50).save(root / "val" / "images" / f"val_{c}.JPEG")
        annotations.append(f"val_{c}.JPEG\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")

    manifest = data.prepare_dataset("tiny_imagenet", tmp_path / "out", raw_dir=tmp_path / "raw",
                                    allow_unpinned=True)
    assert manifest["class_names"] == ["goldfish, Carassius auratus", "tabby, tabby cat"]
    assert manifest["splits"]["train"]["shape"] == [6, 3, 8, 8]
    loaded = data.load_prepared(tmp_path / "out")
    assert loaded.y_train.tolist() == [0, 0, 0, 1, 1, 1] and loaded.y_test.tolist() == [1, 0]
    assert loaded.x_test.shape == (2, 3, 8, 8)  # greyscale val images come back as RGB


def test_mnli_from_hub_export(tmp_path, monkeypatch):
    def row(i, label):
        return {"premise": f"p{i}", "hypothesis": f"h {i} \"quoted\"", "label": label, "idx": i}

    hub = {"train": [row(0, 0), row(1, 1), row(2, 2), row(3, 2)],
           "validation_matched": [row(4, 1)], "validation_mismatched": [row(5, 0), row(6, 2)]}
    requested = []
    monkeypatch.setattr(downloads, "load_hub_dataset",
                        lambda hub_id, config, cache: requested.append((hub_id, config)) or hub)
    manifest = data.prepare_dataset("mnli", tmp_path / "out", raw_dir=tmp_path / "raw",
                                    allow_unpinned=True)
    assert requested == [("nyu-mll/glue", "mnli")]
    assert (tmp_path / "raw" / "glue" / "MNLI" / "dev_matched.tsv").is_file()
    assert manifest["splits"]["train"]["class_counts"] == [1, 1, 2]
    text = data.load_prepared_text(tmp_path / "out")
    assert text.splits["dev_mismatched"][1] == {
        "premise": "p6", "hypothesis": 'h 6 "quoted"', "label": 2, "split": "dev_mismatched"}


# ---------------------------------------------------------------- derived sets


def test_noisy_subset_flips_exactly_and_deterministically():
    x = torch.arange(1000).float().unsqueeze(1)
    y = torch.arange(1000) % 10
    rng_before = torch.get_rng_state()
    x_sub, y_noisy, flipped = noisy_subset(x, y, n=301, flip_fraction=0.25, num_classes=10, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert len(x_sub) == len(y_noisy) == len(flipped) == 301
    assert int(flipped.sum()) == round(0.25 * 301)
    clean = y[x_sub.squeeze(1).long()]
    assert torch.all(y_noisy[flipped] != clean[flipped])
    assert torch.equal(y_noisy[~flipped], clean[~flipped])
    assert y_noisy.min() >= 0 and y_noisy.max() < 10

    again = noisy_subset(x, y, n=301, flip_fraction=0.25, num_classes=10, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((x_sub, y_noisy, flipped), again))
    other = noisy_subset(x, y, n=301, flip_fraction=0.25, num_classes=10, seed=4)
    assert not torch.equal(other[0], x_sub)
    assert int(noisy_subset(x, y, 50, 1.0, 10, 0)[2].sum()) == 50


def test_split_mnist_tasks_is_a_seeded_permutation():
    tasks = split_mnist_tasks(seed=0)
    assert len(tasks) == 5 and all(len(pair) == 2 for pair in tasks)
    assert sorted(c for pair in tasks for c in pair) == list(range(10))
    assert split_mnist_tasks(seed=0) == tasks
    assert any(split_mnist_tasks(seed=s) != tasks for s in range(1, 5))

    x = torch.arange(100).float().unsqueeze(1)
    y = torch.arange(100) % 10
    first, second = tasks[0]
    x_task, y_task = task_subset(x, y, tasks[0])
    assert len(x_task) == 20 and set(y_task.tolist()) == {0, 1}
    assert torch.equal(y_task == 1, y[x_task.squeeze(1).long()] == second)
    assert torch.all(y[x_task.squeeze(1).long()][y_task == 0] == first)


def test_k_class_subset_remaps_labels_in_sorted_class_order():
    x = torch.arange(200).float().unsqueeze(1)
    y = torch.arange(200) % 10
    x_sub, y_sub, classes = k_class_subset(x, y, k=3, num_classes=10, seed=7)
    assert classes == sorted(classes) and len(set(classes)) == 3
    assert len(x_sub) == 60 and sorted(set(y_sub.tolist())) == [0, 1, 2]
    original = y[x_sub.squeeze(1).long()]
    assert torch.equal(torch.tensor(classes)[y_sub], original)
    assert k_class_subset(x, y, 3, 10, seed=7)[2] == classes


def test_k_class_subset_can_keep_a_fixed_number_per_class_drawn_from_the_seed():
    x = torch.arange(200).float().unsqueeze(1)
    y = torch.arange(200) % 10
    x_all, _, classes = k_class_subset(x, y, k=3, num_classes=10, seed=7)
    x_sub, y_sub, same = k_class_subset(x, y, k=3, num_classes=10, seed=7, per_class=5)
    assert same == classes and torch.bincount(y_sub).tolist() == [5, 5, 5]
    assert set(x_sub.flatten().tolist()) <= set(x_all.flatten().tolist())
    assert torch.equal(x_sub, k_class_subset(x, y, 3, 10, seed=7, per_class=5)[0])
    assert not torch.equal(x_sub, k_class_subset(x, y, 3, 10, seed=8, per_class=5)[0])
    with pytest.raises(ValueError, match="fewer than per_class"):
        k_class_subset(x, y, 3, 10, seed=7, per_class=21)


def test_train_val_split_partitions_deterministically():
    train, val = train_val_split(1000, 0.1, seed=1)
    assert len(val) == 100 and len(train) == 900
    assert sorted(torch.cat([train, val]).tolist()) == list(range(1000))
    assert torch.equal(train_val_split(1000, 100, seed=1)[1], val)
    assert not torch.equal(train_val_split(1000, 100, seed=2)[1], val)
    with pytest.raises(ValueError):
        train_val_split(10, 10, seed=0)


def test_a_raw_folder_must_match_one_whole_variant(tmp_path, monkeypatch):
    from bpfree.data import checksums

    for name, content in (("a1", b"A1"), ("a2", b"A2"), ("b2", b"B2")):
        (tmp_path / name).write_bytes(content)
    sha = {name: checksums.sha256_file(tmp_path / name) for name in ("a1", "a2", "b2")}
    pins = {"toy": {"variants": {
        "A": {"files": {"x/1": {"sha256": sha["a1"]}, "x/2": {"sha256": sha["a2"]}}},
        "B": {"files": {"x/1": {"sha256": sha["a1"]}, "x/2": {"sha256": sha["b2"]}}},
        "C": {"files": {"x/1": {"sha256": None, "md5": "0" * 32}, "x/2": {"sha256": sha["a2"]}}},
    }}}
    monkeypatch.setattr(checksums, "load_pins", lambda: pins)
    verified = checksums.verify_raw_files("toy", {"x/1": tmp_path / "a1", "x/2": tmp_path / "b2"})
    assert verified.variant == "B"
    assert verified.files["x/2"] == {"sha256": sha["b2"], "verified_by": "sha256"}

    pins["toy"]["variants"]["B"]["files"]["x/1"] = {"sha256": sha["b2"]}
    (tmp_path / "b1").write_bytes(b"A1")  # x/1 still matches only A
    with pytest.raises(ChecksumError, match="different releases"):
        checksums.verify_raw_files("toy", {"x/1": tmp_path / "b1", "x/2": tmp_path / "b2"})


# ---------------------------------------------------------------- text encoding

def test_sick_tokenizer_is_fitted_on_train_and_encodes_pairs(tmp_path):
    from bpfree.data.tokenization import PAD_ID, encode_examples, train_tokenizer
    raw = require_raw("SICK/SICK.txt")
    manifest = data.prepare_dataset("sick", tmp_path / "sick", raw_dir=raw)
    assert manifest["tokenizer"]["trained_on"] == "train"
    assert "tokenizer.json" in manifest["outputs"]  # hashed like every prepared file
    text = data.load_prepared_text(tmp_path / "sick")
    # fitted on the training split alone: refitting on it gives the same vocabulary
    refit = train_tokenizer(e[f] for e in text.splits["train"] for f in text.text_fields)
    assert refit.get_vocab() == text.tokenizer.get_vocab()
    examples = text.splits["test"][:5]
    x = encode_examples(text.tokenizer, examples, text.text_fields, max_len=12)
    assert x.shape[:2] == (5, 3) and x.shape[2] <= 12 and x.dtype == torch.long
    ids, segments, mask = x.unbind(1)
    assert (ids[:, 0] == text.tokenizer.token_to_id("[CLS]")).all()
    assert ((mask == 0) == (ids == PAD_ID)).all()
    assert (segments[:, 0] == 0).all() and (segments.max(1).values == 1).all()  # a pair: two segments
    assert ids.shape[1] == 12  # SICK pairs are longer than 12 tokens: truncated, not dropped
    # the chance level the F claims use: SICK TEST's majority class
    counts = manifest["splits"]["test"]["class_counts"]
    assert round(100 * max(counts) / sum(counts), 2) == 56.87


def test_corrupt_tokenizer_is_a_clear_error(tmp_path):
    raw = require_raw("SICK/SICK.txt")
    data.prepare_dataset("sick", tmp_path / "sick", raw_dir=raw)
    (tmp_path / "sick" / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        data.load_prepared_text(tmp_path / "sick")
    with pytest.raises(DataError, match="cannot read the tokenizer"):
        data.load_prepared_text(tmp_path / "sick", verify=False)


def test_a_pickle_swapped_after_its_check_is_never_unpickled(tmp_path):
    """CIFAR batches are unpickled from the bytes whose sha256 the release check verified: a
    file replaced between the check and the read is refused, not loaded."""
    import hashlib
    import pickle

    from bpfree.data.errors import DataError
    from bpfree.data.sources import _load_pickle
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"labels": [1, 2]}))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert _load_pickle(path, digest) == {b"labels": [1, 2]}
    path.write_bytes(pickle.dumps({b"labels": [3]}))
    with pytest.raises(DataError, match="changed after its sha256 was verified"):
        _load_pickle(path, digest)
