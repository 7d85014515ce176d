"""Measure the seed spread of A2's first three epochs (test accuracy %, mean training loss).

tests/test_akrout_protocol.py compares our first epochs with Akrout et al.'s committed logs
(experiments/mnist/{bp,fa,wm,kp}-V0/results.json) inside bands built from this spread.
Regenerate (about 10 minutes on one core):

    BPFREE_DATA_DIR=../shared/data python tests/reference/a2_startup_spread.py
"""
import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bpfree.config import load_params, run_configs  # noqa: E402
from bpfree.data import load_prepared  # noqa: E402
from bpfree.provenance import environment_info, git_info  # noqa: E402
from bpfree.training import code_hash, train_run  # noqa: E402

SEEDS, EPOCHS = (1111, 1112, 1113, 1114, 1115, 1116), 3


def main(out=REPO / "tests" / "reference" / "a2_startup_spread.json"):
    data = load_prepared(REPO / "data" / "prepared" / "mnist", "cpu")
    base = [r for r in run_configs(load_params(REPO / "params.yaml"), "A2_mnist_mlp", "cpu") if r["seed"] == 1111]
    runs = {}
    for seed in SEEDS:
        for run in base:
            run = copy.deepcopy(run)
            run.update(seed=seed, epochs=EPOCHS, diagnostics={"every": 0})
            history = train_run(run, data, "cpu")["history"]
            runs.setdefault(run["rule"]["name"], {})[str(seed)] = [
                [h["test_acc"], h["train_loss"]] for h in history]
            print(run["rule"]["name"], seed, runs[run["rule"]["name"]][str(seed)], flush=True)
    record = {"what": "A2_mnist_mlp (cpu profile config), first epochs per seed: [test_acc %, train_loss]",
              "seeds": list(SEEDS), "epochs": EPOCHS, "runs": runs, "git": git_info(),
              "code_hash": code_hash(), "environment": environment_info("cpu")}
    out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
