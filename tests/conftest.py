"""Shared test set-up: one torch thread per xdist worker, prepared real MNIST and the repo params."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BPFREE_DATA_DIR", REPO.parent / "shared" / "data"))

# Options the every-rule tests need on their tiny nets: LFNN splits each hidden layer into
# 32 workers by default, which does not divide widths of 4-16 units.
TINY_NET_RULE_OPTIONS = {"lfnn": {"workers": 2}, "lfnn_l": {"workers": 2}}


def tiny_options(rule: str) -> dict:
    return TINY_NET_RULE_OPTIONS.get(rule, {})


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    from bpfree.data import prepare_dataset
    if not (DATA_DIR / "MNIST").exists():
        pytest.skip(f"no MNIST under {DATA_DIR} (set BPFREE_DATA_DIR)")
    out = tmp_path_factory.mktemp("prepared") / "mnist"
    prepare_dataset("mnist", out, raw_dir=DATA_DIR)
    return out


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    """The prepared MNIST tensors on the CPU (tests must not modify them)."""
    from bpfree.data import load_prepared
    return load_prepared(mnist_dir, "cpu")


@pytest.fixture(scope="module")
def params():
    """The repository's params.yaml, validated (tests that mutate params deep-copy it)."""
    from bpfree.config import load_params
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    """Prepared SICK (sentence pairs plus the tokenizer fitted on its training split)."""
    from bpfree.data import load_prepared_text, prepare_dataset
    if not (DATA_DIR / "SICK" / "SICK.txt").exists():
        pytest.skip(f"no SICK under {DATA_DIR} (set BPFREE_DATA_DIR)")
    out = tmp_path_factory.mktemp("prepared") / "sick"
    prepare_dataset("sick", out, raw_dir=DATA_DIR)
    return load_prepared_text(out)
