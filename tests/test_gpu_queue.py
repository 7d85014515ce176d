"""The gpu queue end to end on CPU (smoke profile): plan in priority order, data in parts,
run within a budget, land, and the next window starts where the last one ended."""
import json
import os

import pytest
import yaml

from conftest import REPO


@pytest.fixture
def queue_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # stages/ is not an installed package
    import bpfree.gpu_queue as q
    return q


@pytest.fixture
def tiny_checkout(mnist_dir, tmp_path, monkeypatch):
    """A working directory like a checkout: tiny params, the prepared MNIST, stages importable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "data" / "prepared").mkdir(parents=True)
    (tmp_path / "data" / "prepared" / "mnist").symlink_to(mnist_dir)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    exp = params["experiments"]["A2_mnist_mlp"]
    exp["rules"] = {"bp": {"lr": 0.2}, "fa": {"lr": 0.2}}
    exp["model"]["options"]["width"] = 16
    params.update(datasets=["mnist"], experiments={"A2_mnist_mlp": exp}, profiles={"smoke": {"A2_mnist_mlp": {
        "epochs": 1, "seeds": [1111], "train_subset": 128, "test_subset": 64, "threads": 1, "device": "cpu"}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_the_queue_runs_what_fits_lands_it_and_resumes_where_it_ended(queue_module, tiny_checkout):
    q = queue_module
    queue = [{"experiment": "A2_mnist_mlp", "rules": ["fa"], "minutes": 0.01, "why": "first"},
             {"experiment": "A2_mnist_mlp", "minutes": 0.01, "why": "then the rest"}]
    plan = q.pending("smoke", queue)
    assert [j["run_id"] for j in plan] == ["fa_seed1111", "bp_seed1111"] and all(j["data"] for j in plan)
    assert q.run_queue(0.1, tiny_checkout / "out", "smoke", queue) == []  # nothing fits 0.1 s
    ran = q.run_queue(600, tiny_checkout / "out", "smoke", queue)
    assert [(r["run_id"], r["status"]) for r in ran] == [("fa_seed1111", "trained"), ("bp_seed1111", "trained")]
    metrics = json.loads((tiny_checkout / "out/results/smoke/runs/A2_mnist_mlp/fa_seed1111/metrics.json").read_text())
    assert {"config_hash", "code_hash", "seed", "environment", "git", "data"} <= set(metrics)
    log = json.loads((tiny_checkout / "out/gpu_queue_log.json").read_text())
    assert log["pending_at_start"] == 2 and len(log["runs"]) == 2
    assert not (tiny_checkout / "results").exists()  # nothing lands until asked
    landed, left = q.land(tiny_checkout / "out", "smoke")
    assert sorted(landed) == ["A2_mnist_mlp/bp_seed1111", "A2_mnist_mlp/fa_seed1111"] and left == []
    assert q.pending("smoke", queue) == []  # the next window starts after what landed


def test_a_returned_run_the_params_no_longer_define_is_not_landed(queue_module, tiny_checkout):
    q = queue_module
    queue = [{"experiment": "A2_mnist_mlp", "rules": ["bp"], "minutes": 0.01}]
    q.run_queue(600, tiny_checkout / "out", "smoke", queue)
    params = yaml.safe_load((tiny_checkout / "params.yaml").read_text())
    params["experiments"]["A2_mnist_mlp"]["rules"]["bp"]["lr"] = 0.1  # the protocol moved on
    (tiny_checkout / "params.yaml").write_text(yaml.safe_dump(params))
    assert q.land(tiny_checkout / "out", "smoke") == ([], ["A2_mnist_mlp/bp_seed1111"])


def test_data_travels_in_checked_parts_and_joins_only_when_complete(queue_module, tmp_path):
    from bpfree.data import DataError
    q = queue_module
    source = tmp_path / "here" / "toy"
    source.mkdir(parents=True)
    (source / "manifest.json").write_text('{"dataset": "toy"}')
    (source / "tensors.bin").write_bytes(os.urandom(300_000))
    parts = tmp_path / "parts"
    manifest = q.pack("toy", parts, part_mib=0.1, prepared=tmp_path / "here")
    assert len(manifest["parts"]) == 3 and all(p["bytes"] <= 0.1 * (1 << 20) for p in manifest["parts"])
    there = tmp_path / "there"
    held = parts / manifest["parts"][1]["file"]
    data = held.read_bytes()
    held.unlink()  # a later window brings it
    assert q.unpack(parts, there) == {"toy": [manifest["parts"][1]["file"]]} and not (there / "toy").exists()
    held.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(DataError, match="sha256 differs"):
        q.unpack(parts, there)
    held.write_bytes(data)
    assert q.unpack(parts, there) == {}
    assert (there / "toy" / "tensors.bin").read_bytes() == (source / "tensors.bin").read_bytes()
    assert q.unpack(parts, there) == {}  # joined once; later windows leave it alone


def test_the_priority_list_names_experiments_of_the_params(queue_module, tmp_path):
    q = queue_module
    entries = q.load_queue()
    assert entries[0]["experiment"] == "C2_mnist_depth" and all(e.get("why") for e in entries)
    bad = tmp_path / "queue.yaml"
    bad.write_text("- {experiment: C2_mnist_depth, minute: 2}\n")
    from bpfree.config import ConfigError
    with pytest.raises(ConfigError, match="unknown keys"):
        q.load_queue(bad)
