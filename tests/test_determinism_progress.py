"""The `deterministic` run key, the record of what ran non-deterministically, and progress bars
that stay out of logs."""
import copy
import io
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from bpfree.config import ConfigError, config_hash, run_configs, validate_params
from bpfree.progress import epoch_bar, progress_wanted
from bpfree.training import recording_nondeterministic_ops, set_determinism, train_run
from tests.test_training import mlp_run

REPO = Path(__file__).resolve().parents[1]
BASE = yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def _restore_torch_flags():
    yield
    set_determinism(None, True)  # the trainer's default, for the tests that follow in this worker


def test_deterministic_key_is_validated_and_only_set_when_used():
    params = copy.deepcopy(BASE)
    plain = run_configs(params, "A2_mnist_mlp", "gpu")[0]
    assert "deterministic" not in plain  # existing configs and their hashes are unchanged
    params["profiles"]["gpu"]["A2_mnist_mlp"] = {"device": "cuda", "deterministic": False}
    changed = run_configs(params, "A2_mnist_mlp", "gpu")[0]
    assert changed["deterministic"] is False
    assert config_hash(changed) != config_hash(plain)
    params["profiles"]["gpu"]["A2_mnist_mlp"] = {"deterministic": "yes"}
    with pytest.raises(ConfigError, match=r"profiles.gpu.A2_mnist_mlp.deterministic"):
        validate_params(params)


def test_determinism_settings_are_recorded(mnist):
    on = train_run(mlp_run(epochs=1), mnist, "cpu")["determinism"]
    assert on["deterministic_algorithms"] is True and on["cudnn_benchmark"] is False
    assert on["nondeterministic_ops"] == [] and on["threads"] == 1
    off = train_run(mlp_run(epochs=1, deterministic=False), mnist, "cpu")["determinism"]
    assert off["deterministic_algorithms"] is False and off["cudnn_benchmark"] is True


def test_nondeterministic_ops_are_recorded_and_other_warnings_pass_through():
    ops = []
    with pytest.warns(UserWarning, match="unrelated"):
        with recording_nondeterministic_ops(ops):
            for _ in range(3):
                warnings.warn("scatter_add_cuda_kernel does not have a deterministic implementation, "
                              "but you set 'torch.use_deterministic_algorithms(True, warn_only=True)'")
            warnings.warn("unrelated")
    assert ops == ["scatter_add_cuda_kernel"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="non-deterministic kernels exist only on CUDA")
def test_cuda_nondeterministic_kernel_is_recorded_not_fatal():
    set_determinism(None, True)
    ops = []
    with recording_nondeterministic_ops(ops):
        torch.histc(torch.rand(100, device="cuda"), bins=4)  # no deterministic CUDA kernel
    assert any(op.startswith("histc") for op in ops), ops


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BPFREE_PROGRESS", raising=False)
    assert progress_wanted(_Terminal())
    assert not progress_wanted(io.StringIO())  # a log file or a pipe
    monkeypatch.setenv("CI", "true")
    assert not progress_wanted(_Terminal())
    monkeypatch.delenv("CI")
    monkeypatch.setenv("BPFREE_PROGRESS", "0")
    assert not progress_wanted(_Terminal())


def test_bar_draws_epoch_loss_and_accuracy_on_a_terminal(monkeypatch):
    terminal = _Terminal()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BPFREE_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", terminal)
    bar = epoch_bar(3, "bp_seed0", file=terminal)
    bar.update(1)
    bar.set_postfix(loss="0.5000", train="90.0%", test="88.0%")
    bar.close()
    text = terminal.getvalue()
    assert "bp_seed0" in text and "1/3" in text and "loss=0.5000" in text and "test=88.0%" in text


def test_training_under_ci_writes_no_bar(mnist, capsys, monkeypatch):
    monkeypatch.setenv("CI", "true")
    train_run(mlp_run(epochs=2), mnist, "cpu", progress=True, log=print)
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "epoch 2:" in captured.out
