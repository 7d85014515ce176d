"""Transfer with sign preservation (LFP paper, claims.md E5): pre-train, swap the head, fine-tune.

Protocol: the run seed fixes one pre-training (gradient descent on the source classes), so
every fine-tuning rule of a seed starts from the same weights; the output layer is replaced
by a freshly initialised one for the target classes; the rule under test then fine-tunes the
whole net. Reported: target test accuracy, source test accuracy before fine-tuning, and the
fraction of pre-trained weights (the head excluded: it is new) whose sign changed. LFP's
update is |w| times its feedback, which shrinks small weights rather than pushing them through
zero, so the paper expects far fewer sign flips under LFP than under gradient descent.
"""
from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from bpfree.continual import task_generators, task_images, train_task
from bpfree.models import build_model
from bpfree.provenance import environment_info, git_info
from bpfree.pruning import sign_flip_fraction
from bpfree.rules import apply_rule
from bpfree.training import (STATUS_DIVERGED, STATUS_OK, DeviceImages, _json_safe, data_hash,
                             evaluate_split, seed_everything, set_determinism)


def limit_images(images: DeviceImages, train: int | None, test: int | None, seed: int) -> DeviceImages:
    """A profile's train_subset / test_subset, per task: a seeded draw of training images."""
    keep = slice(None)
    if train is not None and train < len(images.y_train):
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(images.y_train), generator=gen)[:train].sort().values.to(images.y_train.device)
    return dataclasses.replace(
        images, x_train=images.x_train[keep], y_train=images.y_train[keep],
        x_test=images.x_test[:test], y_test=images.y_test[:test])


def output_layer_name(model: nn.Module) -> str:
    """The last Linear module: the classifier head that transfer replaces."""
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError("transfer needs a model whose output layer is an nn.Linear")
    return names[-1]


def replace_output_layer(model: nn.Module, num_classes: int, seed: int) -> str:
    """Swap the head for a fresh Linear drawn from `seed`, on the old head's device; returns its name."""
    name = output_layer_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    setattr(parent, attr, new.to(old.weight.device))
    return name


def train_transfer(run: dict, data, device, *, log=None) -> dict:
    """Pre-train with `source_rule`, replace the head, fine-tune with the run's rule."""
    wall0 = time.perf_counter()
    device = torch.device(device)
    set_determinism(run.get("threads"))
    seed = int(run["seed"])
    spec = run["transfer"]
    source, target = (limit_images(task_images(data, spec[key], seed, device, run["preprocess"].get("resize")), run.get("train_subset"),
                                   run.get("test_subset"), seed)
                      for key in ("source_classes", "target_classes"))
    seed_everything(seed)
    model = build_model(run["model"]["name"], num_classes=len(spec["source_classes"]),
                        **run["model"]["options"]).to(device)
    order_gen, augment_gen = task_generators(run, seed, device)

    pre = apply_rule(model, spec.get("source_rule", "bp"))
    history, diverged = train_task(model, pre, source, run, order_gen, augment_gen, task=1,
                                   epochs=int(spec["source_epochs"]))
    pre.remove()
    source_acc = evaluate_split(model, source, source.x_test, source.y_test)[0] if diverged is None else None
    if log and source_acc is not None:
        log(f"  pre-trained on {spec['source_classes']}: test {source_acc:.2f}%")
    head = replace_output_layer(model, len(spec["target_classes"]), seed + 2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(head + ".")}

    final, counts, scalars = None, {}, {}
    if diverged is None:
        handle = apply_rule(model, run["rule"]["name"], **run["rule"]["options"])
        entries, diverged = train_task(model, handle, target, run, order_gen, augment_gen, task=2)
        history += entries
        counts = dict(handle.counts)
        handle.remove()
    status = STATUS_OK if diverged is None else STATUS_DIVERGED
    if status == STATUS_OK:
        final = evaluate_split(model, target, target.x_test, target.y_test)[0]
        after = {k: v.detach() for k, v in model.state_dict().items() if k in before}
        scalars = {"source_test_acc_pct": source_acc,
                   "sign_flip_pct": 100.0 * sign_flip_fraction(before, after)}
        if log:
            log(f"  fine-tuned on {spec['target_classes']}: test {final:.2f}%, "
                f"{scalars['sign_flip_pct']:.2f}% of pre-trained weights flipped sign")
    manifest = getattr(data, "manifest", {}) or {}
    return _json_safe({
        "status": status, "diverged_epoch": diverged, "history": history,
        "transfer": {"source_classes": list(spec["source_classes"]),
                     "target_classes": list(spec["target_classes"]), "replaced_head": head},
        "scalars": scalars, "selection": "final", "selected_epoch": None,
        "selected_test_acc": final, "final_test_acc": final, "best_test_epoch": None,
        "best_test_acc_test_selected": None, "epochs_completed": len(history), "curves": None,
        "train_data_draw": None,
        "sizes": {name: {"train": len(t.y_train), "val": len(t.y_val), "test": len(t.y_test)}
                  for name, t in (("source", source), ("target", target))},
        "mean_step_ms": None, "wall_time_s": time.perf_counter() - wall0,
        "converted_layers": counts, "diagnostics": [], "checkpoint": None, "seed": seed,
        "data": {"dataset": run["dataset"], "variant": manifest.get("variant"), "hash": data_hash(manifest)},
        "environment": environment_info(device), "git": git_info(), "config": run,
    })
