"""Seeded subsets and tasks built from prepared tensors.

Each function takes an explicit seed and draws only from its own torch.Generator, so the
same seed gives the same subset on any machine and no caller's global RNG state is used
or disturbed (training seeds stay independent of data seeds). Index tensors are drawn on
the CPU and moved to the data's device, so results do not depend on the device either.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def _generator(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return torch.Generator(device="cpu").manual_seed(seed)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)} labels")


def train_val_split(n: int, val_size: int | float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out a validation set from the official train split; indices come back sorted.

    val_size is a count (int) or a fraction of n (float, rounded to the nearest count).
    """
    if isinstance(val_size, bool):
        raise TypeError("val_size must be an int count or a float fraction, not bool")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"val_size fraction must be in [0, 1), got {val_size}")
        val_count = round(val_size * n)
    else:
        val_count = int(val_size)
    if not 0 <= val_count < n:
        raise ValueError(f"val_size {val_size} leaves no training samples out of {n}")
    order = torch.randperm(n, generator=_generator(seed))
    return order[val_count:].sort().values, order[:val_count].sort().values


def noisy_subset(x: torch.Tensor, y: torch.Tensor, n: int, flip_fraction: float,
                 num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n random samples with exactly round(flip_fraction * n) labels moved to another class.

    The wrong class is uniform over the other num_classes - 1 classes (label plus a random
    offset in 1..num_classes-1, modulo num_classes), so a flipped label never stays correct.
    Returns (x_sub, y_noisy, flipped_mask); samples keep their dataset order.
    """
    _check_pair(x, y)
    if not 0 < n <= len(y):
        raise ValueError(f"n must be in 1..{len(y)}, got {n}")
    if not 0.0 <= flip_fraction <= 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1], got {flip_fraction}")
    if num_classes < 2:
        raise ValueError("flipping labels needs at least 2 classes")
    generator = _generator(seed)
    chosen = torch.randperm(len(y), generator=generator)[:n].sort().values
    flip_count = round(flip_fraction * n)
    flipped_positions = torch.randperm(n, generator=generator)[:flip_count]
    offsets = torch.randint(1, num_classes, (flip_count,), generator=generator)

    chosen = chosen.to(y.device)
    y_noisy = y[chosen].clone().long()
    flipped_positions, offsets = flipped_positions.to(y.device), offsets.to(y.device)
    y_noisy[flipped_positions] = (y_noisy[flipped_positions] + offsets) % num_classes
    flipped_mask = torch.zeros(n, dtype=torch.bool, device=y.device)
    flipped_mask[flipped_positions] = True
    return x[chosen.to(x.device)], y_noisy, flipped_mask


def split_mnist_tasks(seed: int, num_classes: int = 10, num_tasks: int = 5) -> list[tuple[int, int]]:
    """Continual-learning task order: a seeded class permutation cut into consecutive pairs."""
    if num_tasks < 1 or 2 * num_tasks > num_classes:
        raise ValueError(f"{num_tasks} tasks of 2 classes need at least {2 * num_tasks} classes, "
                         f"have {num_classes}")
    order = torch.randperm(num_classes, generator=_generator(seed)).tolist()
    return [(order[2 * task], order[2 * task + 1]) for task in range(num_tasks)]


def task_subset(x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples of the task's classes, labelled by position in ``classes`` (pairs -> 0/1).

    Positional labels let every task share one 2-output head, the usual Split-MNIST setup.
    """
    _check_pair(x, y)
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct and non-empty, got {classes}")
    wanted = torch.tensor(classes, device=y.device)
    mask = torch.isin(y, wanted)
    y_task = (y[mask].unsqueeze(1) == wanted).long().argmax(dim=1)
    return x[mask.to(x.device)], y_task


def k_class_subset(x: torch.Tensor, y: torch.Tensor, k: int, num_classes: int,
                   seed: int, per_class: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """k seeded random classes; labels remapped to 0..k-1 in sorted class order.

    Sorted order makes the remapping readable from ``classes`` alone: label i is classes[i].
    ``per_class`` keeps that many seeded random examples of each class (in their original
    order), so a k-class subset of a set with many images per class (CIFAR-10: 5000) can
    match the per-class size of the set it stands in for (CIFAR-100: 500).
    """
    _check_pair(x, y)
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in 1..{num_classes}, got {k}")
    gen = _generator(seed)
    classes = sorted(torch.randperm(num_classes, generator=gen)[:k].tolist())
    x_sub, y_remapped = task_subset(x, y, classes)
    if per_class is not None:
        keep = []
        for label in range(k):
            members = (y_remapped == label).nonzero().flatten()
            if len(members) < per_class:
                raise ValueError(f"class {classes[label]} has {len(members)} examples, fewer than per_class {per_class}")
            keep.append(members[torch.randperm(len(members), generator=gen)[:per_class]])
        chosen = torch.cat(keep).sort().values
        x_sub, y_remapped = x_sub[chosen.to(x_sub.device)], y_remapped[chosen]
    return x_sub, y_remapped, classes
