"""Class-incremental task sequences (Split-MNIST) for any rule: the forgetting benchmark.

Protocol (BackMAN, claims.md C1): a seeded class permutation cut into tasks of two classes,
ONE shared output head (labels are the position within the task's pair), each task's
training images split 80/20 into train/val, a fresh optimiser and scheduler per task, and
after every task the test accuracy on every task. Forgetting of task t is its accuracy at
the end minus its accuracy right after it was learnt. The task order is drawn from the
run seed, so each repeat sees another order and every rule the same one.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from bpfree.data import split_mnist_tasks, task_subset, train_val_split
from bpfree.models import build_model
from bpfree.provenance import environment_info, git_info
from bpfree.rules import apply_rule
from bpfree.training import (PER_BATCH_SCHEDULES, STATUS_DIVERGED, STATUS_OK,
                             DeviceSplits, _json_safe, augment_batch, build_optimizer, build_scheduler,
                             data_hash, evaluate_split, exploded, normalisation, optimisation_step,
                             parameter_groups, resize_images, seed_everything, set_determinism)

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


def task_generators(run: dict, seed: int, device) -> tuple[torch.Generator, torch.Generator | None]:
    """Batch-order and augmentation generators, drawn once per run so tasks share the streams."""
    crop = int(run["preprocess"].get("crop_padding", 0) or 0)
    flip = bool(run["preprocess"].get("flip", False))
    augment_gen = torch.Generator(device=device).manual_seed(seed + 1) if crop or flip else None
    return torch.Generator().manual_seed(seed), augment_gen


def train_task(model, handle, images: DeviceSplits, run: dict, order_gen, augment_gen, *, task: int,
               epochs: int | None = None) -> tuple[list[dict], dict | None]:
    """Learn one task with a fresh optimiser and scheduler; returns (history, divergence or None)."""
    optimizer = build_optimizer(parameter_groups(model, run["optimizer"]), run["optimizer"])  # fresh per task
    crop = int(run["preprocess"].get("crop_padding", 0) or 0)
    flip = bool(run["preprocess"].get("flip", False))
    n, bs = len(images.y_train), int(run["batch_size"])
    epochs = int(run["epochs"] if epochs is None else epochs)
    scheduler = build_scheduler(optimizer, run["schedule"], (n + bs - 1) // bs, epochs)
    per_batch = run["schedule"]["name"] in PER_BATCH_SCHEDULES
    history, first_loss = [], None
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=order_gen).to(images.y_train.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=images.y_train.device)
        lr = optimizer.param_groups[0]["lr"]
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            xb, yb = images.x_train[idx], images.y_train[idx]
            if augment_gen is not None:
                xb = augment_batch(xb, crop, flip, augment_gen)
            loss, _ = optimisation_step(model, handle, optimizer, images.prepare(xb), yb,
                                        run["optimizer"].get("clip_grad_norm"))
            if per_batch:
                scheduler.step()
            loss_sum += loss.detach().double() * len(idx)
        train_loss = (loss_sum / n).item()
        first_loss = train_loss if first_loss is None else first_loss
        if exploded(train_loss, first_loss):
            return history, {"task": task, "epoch": epoch, "train_loss": train_loss}
        if scheduler is not None and not per_batch:
            scheduler.step()
        if epoch == epochs:
            val_acc, _ = evaluate_split(model, images, images.x_val, images.y_val)
            history.append({"task": task, "epoch": epoch, "lr": lr, "train_loss": train_loss,
                            "val_acc": val_acc})
    return history, None


def train_continual(run: dict, data, device, *, log=None) -> dict:
    """Train one (rule, seed) run through the task sequence; returns its metrics dict."""
    wall0 = time.perf_counter()
    device = torch.device(device)
    determinism = set_determinism(run.get("threads"), run.get("deterministic", True))
    seed = int(run["seed"])
    spec = run["continual"]
    tasks = split_mnist_tasks(seed, num_classes=int(data.num_classes), num_tasks=spec["tasks"]) \
        if spec["classes_per_task"] == 2 else None
    if tasks is None:
        raise ValueError("only tasks of 2 classes are implemented (Split-MNIST)")
    resize = run["preprocess"].get("resize")
    per_task = [task_images(data, classes, seed, device, resize) for classes in tasks]
    seed_everything(seed)
    model = build_model(run["model"]["name"], num_classes=spec["classes_per_task"],
                        **run["model"]["options"]).to(device)
    handle = apply_rule(model, run["rule"]["name"], **run["rule"]["options"])
    order_gen, augment_gen = task_generators(run, seed, device)
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
    manifest = getattr(data, "manifest", {}) or {}
    return _json_safe({
        "status": status, "diverged_epoch": diverged, "history": history,
        "tasks": [list(t) for t in tasks], "task_accuracy": matrix, "scalars": scalars,
        "selection": "final", "selected_epoch": None, "selected_test_acc": final,
        "final_test_acc": final, "best_test_epoch": None, "best_test_acc_test_selected": None,
        "epochs_completed": len(history), "curves": None, "train_data_draw": None,
        "sizes": {"tasks": [{"train": len(t.y_train), "val": len(t.y_val), "test": len(t.y_test)}
                            for t in per_task]},
        "mean_step_ms": None, "wall_time_s": time.perf_counter() - wall0,
        "converted_layers": counts, "diagnostics": [], "checkpoint": None, "seed": seed,
        "data": {"dataset": run["dataset"], "variant": manifest.get("variant"), "hash": data_hash(manifest)},
        "environment": environment_info(device), "determinism": determinism, "git": git_info(), "config": run,
    })
