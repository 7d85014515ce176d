"""Data-parallel training (torchrun / DDP) equals one process with the same global batch.

Two CPU processes with the gloo backend, as torchrun would start them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment), train the same run; rank 0's final weights must
equal a single-process run's, for BP, FA and KP (KP's B is a Parameter DDP averages too).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from bpfree.distributed import loss_weight, shard, Ranks
from bpfree.training import train_run
from test_training import mlp_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, data_dir, run, out):
    import torch.distributed as dist
    from bpfree.data import load_prepared
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    metrics = train_run(run, load_prepared(data_dir, "cpu"), "cpu", checkpoint_path=out)
    if rank == 0:
        torch.save({"metrics": {k: metrics[k] for k in ("final_test_acc", "history", "distributed")}},
                   str(out) + ".metrics")
    dist.destroy_process_group()


@pytest.mark.parametrize("rule", ["bp", "fa", "kp"])
def test_two_gloo_ranks_equal_one_process(rule, mnist, mnist_dir, tmp_path):
    # 101 training examples at batch 32: the last batch (5) is split 3 + 2 and weighted; momentum SGD
    run = mlp_run(rule={"name": rule, "options": {}}, train_subset=165, val_size=64, test_subset=100,
                  epochs=2, selection="final")
    single = train_run(run, mnist, "cpu", checkpoint_path=tmp_path / "single.pt")
    out = tmp_path / "ddp.pt"
    mp.spawn(_rank_main, args=(2, _free_port(), str(mnist_dir), run, out), nprocs=2, join=True)
    ddp_state = torch.load(out, weights_only=True)["state_dict"]
    single_state = torch.load(tmp_path / "single.pt", weights_only=True)["state_dict"]
    assert ddp_state.keys() == single_state.keys()
    for key in single_state:
        torch.testing.assert_close(ddp_state[key], single_state[key], rtol=1e-5, atol=1e-6, msg=key)
    ddp = torch.load(str(out) + ".metrics", weights_only=False)["metrics"]
    assert ddp["distributed"]["world_size"] == 2
    assert ddp["final_test_acc"] == single["final_test_acc"]
    for a, b in zip(ddp["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"]


def test_shards_partition_a_batch_and_weights_give_the_global_mean():
    ranks = [Ranks(r, 3, r) for r in range(3)]
    index = torch.arange(10)
    shards = [shard(index, r) for r in ranks]
    assert sorted(torch.cat(shards).tolist()) == list(range(10))
    # DDP averages the ranks' weighted means: sum_r (w_r * mean_r) / world == global mean
    values = torch.randn(10)
    weighted = [(loss_weight(len(s), 10, r) or 1.0) * values[s].mean() for s, r in zip(shards, ranks)]
    assert (sum(weighted) / 3).item() == pytest.approx(values.mean().item(), rel=1e-6)
    assert loss_weight(4, 12, ranks[0]) is None and shard(index, None) is index


def _rule_state_main(rank, world, port, rule, out_dir):
    """A few DDP steps of `rule` on this rank's shard; save the rule state that must agree."""
    import torch.distributed as dist
    import torch.nn.functional as F  # noqa: F401
    from bpfree import distributed
    from bpfree.models import build_model
    from bpfree.rules import apply_rule
    from bpfree.loop import optimisation_step
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ranks = distributed.from_environment()
    torch.manual_seed(0)
    model = build_model("mlp", 10, in_features=784, widths=[32, 16])
    handle = apply_rule(model, rule, **({"workers": 4} if rule.startswith("lfnn") else {}))
    net = distributed.wrap(model, ranks, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 784, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    torch.manual_seed(100 + rank)  # ranks' private random streams differ on purpose
    for step in range(3):
        idx = distributed.shard(torch.arange(step * 8, step * 8 + 8), ranks)
        optimisation_step(net, handle, optimizer, x[idx], y[idx])
    state = {"weights": {k: v.clone() for k, v in model.state_dict().items()}}
    if rule.startswith("lfnn"):
        state["leaders"] = [handle.rule.leader_selection(layer)["leaders"].clone()
                            for layer in handle.layers[:-1]]
    torch.save(state, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("rule", ["wm", "lfnn", "lfnn_l", "dfa"])
def test_rule_state_stays_identical_across_ranks(rule, tmp_path):
    """WM's mirror noise and LFNN's leader choice would differ per rank without agreement."""
    mp.spawn(_rule_state_main, args=(2, _free_port(), rule, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for key in a["weights"]:  # model weights and the rule's buffers (B of WM and DFA)
        torch.testing.assert_close(a["weights"][key], b["weights"][key], rtol=0, atol=0, msg=key)
    for leaders_a, leaders_b in zip(a.get("leaders", []), b.get("leaders", [])):
        assert torch.equal(leaders_a, leaders_b)
