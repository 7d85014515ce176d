"""One optimisation step and the one epoch loop, fit(), that every protocol trains through.

Why one loop: what breaks reproductions in this field is mostly loop detail (the scheduler
stepped per batch, a loss that exploded and was selected anyway, batches drawn from the
global RNG). Written once, those details are the same for the single-task trainer
(bpfree.training), the task sequence (bpfree.continual) and transfer's pre-training and
fine-tuning (bpfree.transfer); what a protocol does between epochs (evaluate, log, measure
alignment, save resume state) is a callback.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from bpfree import distributed
from bpfree.losses import LossFn

PER_BATCH_SCHEDULES = ("onecycle",)
# A run has DIVERGED from the first epoch whose mean training loss is non-finite, exceeds
# DIVERGENCE_FACTOR times its first epoch's, or exceeds LOSS_BOUND nats (every training loss
# here is a cross-entropy: ln 10 = 2.3 at a uniform guess, so 100 nats means the true class
# gets e^-100 on average): selection never reaches past it and the run feeds no table,
# whatever epoch a best-validation pick would land on. A run whose loss rose past
# UNSTABLE_FACTOR times the first epoch's and stayed under both bounds is unstable: counted,
# and flagged. (The A1 DFA and C2 BackMAN runs that motivated the rule reached 5.7e2 to 1e17.)
DIVERGENCE_FACTOR = 100.0
LOSS_BOUND = 100.0
UNSTABLE_FACTOR = 10.0


def exploded(loss: float, first: float | None) -> bool:
    """Whether one epoch's training loss breaks the divergence rule above."""
    return (not math.isfinite(loss) or loss > LOSS_BOUND
            or (first is not None and 0 < first * DIVERGENCE_FACTOR < loss))


def epoch_order(n: int, shuffle: bool, generator: torch.Generator) -> torch.Tensor:
    """The indices an epoch visits: a fresh permutation, or the stored order."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def augment_batch(x: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, batched on x's device.

    Same as torchvision's RandomCrop(size, padding) / RandomHorizontalFlip on raw images
    (the padding is black, before normalisation), without a Python loop over samples.
    """
    n, _, h, w = x.shape
    if crop_padding:
        p = crop_padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=generator.device).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator, device=generator.device).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, generator=generator, device=generator.device).to(x.device) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def predicted_class(out: torch.Tensor) -> torch.Tensor:
    """The class a net's output names: the largest logit, or for a (batch, classes, steps)
    spike train the class with the most spikes."""
    return (out.sum(2) if out.dim() == 3 else out).argmax(1)


def _loss_precision(out: torch.Tensor) -> torch.Tensor:
    """Losses in float32 at least: half-precision logits (autocast) are cast up, float64 ones
    (the parity tests' nets) kept, so a float64 step is float64 throughout."""
    return out if out.dtype == torch.float64 else out.float()


def optimisation_step(model, handle, optimizer, xb, yb, clip=None, before_update=None, autocast=None,
                      loss_weight=None, loss_fn: LossFn = F.cross_entropy):
    """One step of any rule: forward, loss, the rule's backward, its pre- and post-step work.

    before_update(xb, yb) runs after the rule has produced .grad and before the optimiser
    uses it (the full-batch diagnostics measure that exact update). `autocast` (a context
    factory, e.g. bf16 autocast) covers the forward and the losses, not the backward or the
    rule's post-step work, as torch's AMP recipe does. `loss_weight` scales what is
    back-propagated (a data-parallel rank's short shard); `loss_fn` is the batch-mean
    training loss (bpfree.losses). Returns (loss, logits).
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast() if autocast is not None else contextlib.nullcontext():
        out = model(xb)
        loss = loss_fn(_loss_precision(out), yb)
        total = handle.add_local_loss(loss, yb)  # rules with local objectives (LFNN, DTP) add theirs
    (total if loss_weight is None else total * loss_weight).backward()
    handle.before_step()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    if before_update is not None:
        before_update(xb, yb)
    optimizer.step()
    handle.after_step()
    return loss, out


class StepTimer:
    """Per-step wall time; CUDA events on GPU so that asynchronous kernels are counted.

    `keep(epoch, step)` says which steps count (warm-up and diagnostic steps do not)."""

    def __init__(self, device: torch.device, keep: Callable[[int, int], bool] | None = None):
        self.cuda = device.type == "cuda"
        self.keep = keep or (lambda epoch, step: True)
        self.samples: list[float] = []
        self._pending: list = []

    def start(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, token, keep: bool) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            if keep:
                self._pending.append((token, end))
        elif keep:
            self.samples.append((time.perf_counter() - token) * 1e3)

    def flush(self) -> None:
        if self._pending:
            torch.cuda.synchronize()
            self.samples += [a.elapsed_time(b) for a, b in self._pending]
            self._pending = []

    def mean_ms(self) -> float | None:
        self.flush()
        return sum(self.samples) / len(self.samples) if self.samples else None


@dataclass
class Batches:
    """How an epoch walks one training set (a bpfree.training.DeviceSplits): a seeded order,
    optional crop/flip from its own generator, and this rank's shard of each batch.

    When one batch holds the whole set and nothing is augmented, the order is moot: the set
    is prepared once and no permutation is drawn (the full-batch protocols of section B).
    """

    images: object
    batch_size: int
    order_gen: torch.Generator
    augment_gen: torch.Generator | None = None
    crop_padding: int = 0
    flip: bool = False
    shuffle: bool = True
    drop_last: bool = False
    ranks: distributed.Ranks | None = None
    full_batch: bool = field(init=False)

    def __post_init__(self):
        n, bs = len(self.images.y_train), self.batch_size
        self.n = n
        self.steps = n // bs if self.drop_last and n >= bs else (n + bs - 1) // bs
        self.n_used = min(n, self.steps * bs)  # images an epoch trains on
        self.full_batch = bs >= n and self.augment_gen is None
        self._whole = None
        if self.full_batch:
            index = distributed.shard(torch.arange(n, device=self.images.y_train.device), self.ranks)
            self._whole = (self.images.prepare(self.images.x_train[index]), self.images.y_train[index])

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(inputs, labels, global batch size) for each step of one epoch; the epoch's order
        is drawn here, before its first step is timed."""
        if self.full_batch:
            return iter([(self._whole[0], self._whole[1], self.n)])
        return self._walk(epoch_order(self.n, self.shuffle, self.order_gen).to(self.images.y_train.device))

    def _walk(self, perm: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        for i in range(0, self.n_used, self.batch_size):
            global_idx = perm[i:i + self.batch_size]
            idx = distributed.shard(global_idx, self.ranks)
            xb, yb = self.images.x_train[idx], self.images.y_train[idx]
            if self.augment_gen is not None:
                xb = augment_batch(xb, self.crop_padding, self.flip, self.augment_gen)
            yield self.images.prepare(xb), yb, len(global_idx)


@dataclass
class Trainee:
    """What a step updates and how: the net to call (possibly compiled or DDP-wrapped), the
    rule's handle, the optimiser, and the step's options."""

    net: torch.nn.Module
    handle: object
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    per_batch_schedule: bool = False
    clip: float | None = None
    loss_fn: LossFn = F.cross_entropy
    autocast: Callable | None = None


@dataclass
class EpochStats:
    epoch: int
    lr: float  # the lr the epoch started with
    train_loss: float
    train_acc: float  # percent of the images the epoch trained on
    first_loss: float  # the first epoch's training loss: the divergence rule's reference


class Callback:
    """What a protocol does around fit()'s epochs; every hook defaults to nothing."""

    def epoch_start(self, epoch: int) -> None:
        pass

    def before_update(self, epoch: int) -> Callable | None:
        """A function(xb, yb) to run between the rule's .grad and the optimiser step, or None."""
        return None

    def epoch_end(self, stats: EpochStats) -> None:
        pass


@dataclass
class FitOutcome:
    diverged: EpochStats | None  # the epoch whose loss broke the divergence rule
    first_loss: float | None


def fit(trainee: Trainee, batches: Batches, epochs: int, *, first_epoch: int = 1,
        first_loss: float | None = None, callbacks: Sequence[Callback] = (),
        timer: StepTimer | None = None) -> FitOutcome:
    """Train epochs first_epoch..epochs; stop at the first epoch whose loss explodes."""
    t = trainee
    for epoch in range(first_epoch, epochs + 1):
        for cb in callbacks:
            cb.epoch_start(epoch)
        before_update = next((f for f in (cb.before_update(epoch) for cb in callbacks) if f), None)
        device = batches.images.y_train.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        lr = t.optimizer.param_groups[0]["lr"]
        steps = batches.epoch()
        for step in range(batches.steps):
            token = timer.start() if timer is not None else None
            xb, yb, global_count = next(steps)
            loss, out = optimisation_step(t.net, t.handle, t.optimizer, xb, yb, t.clip, before_update, t.autocast,
                                          distributed.loss_weight(len(yb), global_count, batches.ranks), t.loss_fn)
            if t.per_batch_schedule:
                t.scheduler.step()
            loss_sum += loss.detach().double() * len(yb)
            correct += (predicted_class(out.detach()) == yb).sum()
            if timer is not None:
                timer.stop(token, keep=timer.keep(epoch, step))
        distributed.sum_(loss_sum)
        distributed.sum_(correct)
        train_loss = (loss_sum / batches.n_used).item()
        first_loss = train_loss if first_loss is None else first_loss
        stats = EpochStats(epoch, lr, train_loss, 100.0 * correct.item() / batches.n_used, first_loss)
        if exploded(train_loss, first_loss):
            return FitOutcome(stats, first_loss)
        if t.scheduler is not None and not t.per_batch_schedule:
            t.scheduler.step()
        for cb in callbacks:
            cb.epoch_end(stats)
    return FitOutcome(None, first_loss)
