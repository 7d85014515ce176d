"""Faults and side effects users meet outside the happy path (issue 25)."""
import os
import stat

import pytest

from bpfree.provenance import atomic_torch_save, atomic_write_json, atomic_write_text


def test_results_are_written_with_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp's 0600 would leave root-owned unreadable files in a user's results/ after the
    README's Docker command; atomic writes end with 0666 minus the umask, as open() does."""
    old = os.umask(0o022)
    try:
        paths = [atomic_write_json(tmp_path / "metrics.json", {"a": 1}),
                 atomic_write_text(tmp_path / "table.md", "x\n"),
                 atomic_torch_save(tmp_path / "run.pt", {"w": 1})]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "run.pt", "table.md"]  # no temp files left


def test_a_truncated_checkpoint_is_one_line_and_evaluation_goes_on(mnist, mnist_dir, tmp_path, monkeypatch):
    """evaluate re-checks every checkpoint: a truncated one is reported (and listed with the
    mismatches), not a traceback that leaves no summary."""
    import bpfree.summary as evaluate
    from bpfree.layout import Layout
    from bpfree.training import CheckpointError, device_splits, load_checkpoint_model, train_run
    from tests.test_training import mlp_run
    run = mlp_run(epochs=1)
    ckpt = tmp_path / "checkpoints" / "smoke" / "X" / "bp_seed0.pt"
    ckpt.parent.mkdir(parents=True)
    metrics = train_run(run, mnist, "cpu", checkpoint_path=ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:500])  # a copy cut short
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_model(ckpt, run, device_splits(mnist, run, "cpu"), "cpu")
    assert "\n" not in str(info.value) and "unreadable" in str(info.value)
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / run["dataset"]).symlink_to(mnist_dir)
    monkeypatch.setattr(evaluate, "LAYOUT", Layout.under(tmp_path))
    logged = []
    check = evaluate.recheck({**metrics, "profile": "smoke", "experiment": "X", "run_id": "bp_seed0",
                              "config_hash": "h"}, run, {}, log=logged.append)
    assert len(logged) == 1 and logged[0].startswith("warning:")
    assert check["checked"] is False and check["unreadable"] and "unreadable" in check["reason"]


def test_prepared_data_gets_the_umask_mode(mnist_dir):
    """safetensors writes 0600 like mkstemp: prepared tensors get the mode open() would give,
    so a Docker run as root leaves files the user can read."""
    from bpfree.provenance import default_file_mode
    for name in ("tensors.safetensors", "manifest.json"):
        assert stat.S_IMODE(os.stat(mnist_dir / name).st_mode) == default_file_mode(), name
