"""Class-incremental task sequences (Split-MNIST) for any rule: the forgetting benchmark.

Protocol (BackMAN, claims.md C1): a seeded class permutation cut into tasks of two classes,
ONE shared output head (labels are the position within the task's pair), each task's
training images split 80/20 into train/val, a fresh optimiser and scheduler per task, and
after every task the test accuracy on every task. Forgetting of task t is its accuracy at
the end minus its accuracy right after it was learnt. The task order is drawn from the
run seed, so each repeat sees another order and every rule the same one.
"""
from __future__ import annotations

import statistics
import time

import torch

from bpfree.data import split_mnist_tasks, task_subset, train_val_split
from bpfree.loop import Callback, EpochStats, fit
from bpfree.models import build_model
from bpfree.record import STATUS_DIVERGED, STATUS_OK, RunRecord, final_selection
from bpfree.rules import apply_rule
from bpfree.spec import RunSpec, as_run_spec
from bpfree.training import (DeviceSplits, batch_generators, batches_and_trainee, build_optimizer, evaluate_split,
                             normalisation, parameter_groups, resize_images, seed_everything, set_determinism)

VAL_FRACTION = 0.2


def task_images(data, classes, seed: int, device, resize: int | None = None) -> DeviceSplits:
    """One task's images on the device: its classes only, labels 0..k-1, 80/20 train/val."""
    x_all, y_all = task_subset(torch.arange(len(data.y_train)), data.y_train.cpu(), classes)
    x_test_idx, y_test = task_subset(torch.arange(len(data.y_test)), data.y_test.cpu(), classes)
    tr, va = train_val_split(len(y_all), VAL_FRACTION, seed)
    mean, std = normalisation(data, device)

    def take(x, idx):
        return resize_images(x[idx.to(x.device)].to(device), resize)
    return DeviceSplits(take(data.x_train, x_all[tr]), y_all[tr].to(device),
                        take(data.x_train, x_all[va]), y_all[va].to(device),
                        take(data.x_test, x_test_idx), y_test.to(device), mean, std, True, len(classes),
                        {"classes": list(classes)})


class _LastEpochValidation(Callback):
    """A task's history: its last epoch's validation accuracy (tasks are judged on test after)."""

    def __init__(self, model, images: DeviceSplits, task: int, epochs: int):
        self.model, self.images, self.task, self.epochs = model, images, task, epochs
        self.history: list[dict] = []

    def epoch_end(self, stats: EpochStats) -> None:
        if stats.epoch == self.epochs:
            val_acc, _ = evaluate_split(self.model, self.images, self.images.x_val, self.images.y_val)
            self.history.append({"task": self.task, "epoch": stats.epoch, "lr": stats.lr,
                                 "train_loss": stats.train_loss, "val_acc": val_acc})


def train_task(model, handle, images: DeviceSplits, run: RunSpec, order_gen, augment_gen, *, task: int,
               epochs: int | None = None) -> tuple[list[dict], dict | None]:
    """Learn one task with a fresh optimiser and scheduler; returns (history, divergence or None)."""
    optimizer = build_optimizer(parameter_groups(model, run.optimizer), run.optimizer)  # fresh per task
    epochs = int(run.epochs if epochs is None else epochs)
    batches, trainee = batches_and_trainee(run, images, model, handle, optimizer, (order_gen, augment_gen), epochs)
    validation = _LastEpochValidation(model, images, task, epochs)
    outcome = fit(trainee, batches, epochs, callbacks=[validation])
    if outcome.diverged is not None:
        d = outcome.diverged
        return validation.history, {"task": task, "epoch": d.epoch, "train_loss": d.train_loss}
    return validation.history, None


def train_continual(run: RunSpec | dict, data, device, *, log=None) -> dict:
    """Train one (rule, seed) run through the task sequence; returns its metrics dict."""
    wall0 = time.perf_counter()
    device = torch.device(device)
    run = as_run_spec(run)
    determinism = set_determinism(run.threads, run.deterministic_kernels)
    seed = int(run.seed)
    spec = run.continual
    tasks = split_mnist_tasks(seed, num_classes=int(data.num_classes), num_tasks=spec["tasks"]) \
        if spec["classes_per_task"] == 2 else None
    if tasks is None:
        raise ValueError("only tasks of 2 classes are implemented (Split-MNIST)")
    per_task = [task_images(data, classes, seed, device, run.preprocess.resize) for classes in tasks]
    seed_everything(seed)
    model = build_model(run.model.name, num_classes=spec["classes_per_task"], **run.model.options).to(device)
    handle = apply_rule(model, run.rule.name, **run.rule.options)
    order_gen, augment_gen = batch_generators(run, device)  # once per run: the tasks share the streams
    matrix: list[list[float]] = []  # matrix[i][t]: test accuracy on task t after learning task i
    history, status, diverged = [], STATUS_OK, None
    for task_index, images in enumerate(per_task):
        entries, diverged = train_task(model, handle, images, run, order_gen, augment_gen,
                                       task=task_index + 1)
        history += entries
        if diverged is not None:
            status = STATUS_DIVERGED
            break
        row = [evaluate_split(model, t, t.x_test, t.y_test)[0] for t in per_task]
        matrix.append(row)
        if log:
            log(f"  after task {task_index + 1} {tasks[task_index]}: " +
                " ".join(f"{a:.1f}" for a in row[: task_index + 1]))
    counts = dict(handle.counts)
    handle.remove()
    scalars, final = {}, None
    if status == STATUS_OK:
        last = matrix[-1]
        final = statistics.fmean(last)
        scalars["mean_task_acc_pct"] = final
        for t in range(len(tasks) - 1):
            scalars[f"task_drop_pct/{t + 1}"] = last[t] - matrix[t][t]
    return RunRecord(
        run=run.to_dict(), status=status, diverged_epoch=diverged, history=history, selection=final_selection(final),
        sizes={"tasks": [{"train": len(t.y_train), "val": len(t.y_val), "test": len(t.y_test)} for t in per_task]},
        wall_time_s=time.perf_counter() - wall0, determinism=determinism, converted_layers=counts,
        protocol={"tasks": [list(t) for t in tasks], "task_accuracy": matrix, "scalars": scalars},
    ).to_json(getattr(data, "manifest", {}) or {}, device)
