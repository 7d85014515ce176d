"""One trainer for every rule, model and dataset.

Why one generic loop: the causes of failed reproductions in this field are mostly loop
details (scheduler stepped per batch, a "validation" split that is the test set, seeds
drawn before seeding). Writing those details once, for every rule, removes them as a
variable: a difference between two rules' numbers is then the rules' difference.

Data stays on the device as tensors; batches are index slices of a seeded randperm drawn
from a dedicated generator, so the batch order depends on the run seed alone.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

# cuBLAS needs this before the first CUDA call to be deterministic; harmless on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch
import torch.nn.functional as F
from torch import nn

from bpfree import distributed
from bpfree.losses import LossFn, loss_function
from bpfree.data import k_class_subset, noisy_subset, task_subset, train_val_split
from bpfree.loop import (PER_BATCH_SCHEDULES, UNSTABLE_FACTOR, Batches, Callback, EpochStats,
                         FitOutcome, StepTimer, Trainee, exploded, fit, predicted_class)
from bpfree.diagnostics import ConservationTracker, alignment_report, step_gradient_angles, weight_feedback_angles
from bpfree.models import build_model, model_options
from bpfree.record import STATUS_DIVERGED, STATUS_OK, RunRecord, data_hash
from bpfree.rules import apply_rule
from bpfree.spec import OptimizerSpec, PreprocessSpec, RunSpec, ScheduleSpec, as_run_spec, or_default

EVAL_BATCH = 1000
WARMUP_STEPS = 5


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile asks for device 'cuda' but no CUDA device is available")
    return torch.device(name)


def set_determinism(threads: int | None, deterministic: bool = True) -> dict:
    """Same seed, same numbers: deterministic kernels, fixed thread count on CPU.

    deterministic=False (the run key `deterministic: false`) trades this for speed on GPU:
    cuDNN autotuning and atomics-based kernels. Ops with no deterministic CUDA kernel (e.g.
    adaptive average pooling's backward) only warn, so a GPU run never stops for one; the
    trainer records which ones ran. Returns the settings, for the run's metrics.
    """
    torch.use_deterministic_algorithms(bool(deterministic), warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    if threads:
        torch.set_num_threads(int(threads))
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "threads": torch.get_num_threads(),
    }


NONDETERMINISTIC_WARNING = "does not have a deterministic implementation"


@contextlib.contextmanager
def recording_nondeterministic_ops(record: list[str]) -> Iterator[None]:
    """Collect the ops torch warned have no deterministic kernel (GPU), pass other warnings on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        try:
            yield
        finally:
            for w in caught:
                text = str(w.message)
                if NONDETERMINISTIC_WARNING in text:
                    op = text.split(NONDETERMINISTIC_WARNING)[0].strip()
                    if op not in record:
                        record.append(op)
            others = [w for w in caught if NONDETERMINISTIC_WARNING not in str(w.message)]
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class DeviceSplits:
    """Train/val/test inputs of one run, already on the device, normalised per batch.

    Inputs are images (uint8) or encoded sentence pairs ((N, 3, T) token, segment and mask
    ids, see bpfree.data.tokenization): the trainer only slices rows, so both go through
    the same loop. `vocab_size` is set for text, whose model needs it.

    Subsets and the validation split are drawn with `data_seed`, not the run seed, so every
    rule and seed of an experiment sees exactly the same images. The validation split is
    always carved from the training set.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    normalize: bool
    num_classes: int
    draw: dict | None = None  # what a derived training set drew (flipped labels, classes)
    vocab_size: int | None = None
    channels_last: bool = False  # batches leave prepare() in NHWC layout (speed.channels_last)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point() and x.dtype != torch.uint8:
            return x  # token ids
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        x = (x - self.mean) / self.std if self.normalize else x
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _as_index(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.long)


def normalisation(data, device, preprocess: PreprocessSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std, shaped (1, C, 1, 1), on the device: the training set's, or
    the constants an authors' transform fixes (preprocess mean / std, e.g. Normalize(0.5, 0.5))."""
    channels = data.x_train.shape[1]
    stats = []
    for key, measured in (("mean", data.mean), ("std", data.std)):
        value = measured if preprocess is None else or_default(getattr(preprocess, key), measured)
        value = torch.as_tensor(value, dtype=torch.float32, device=device).flatten()
        if value.numel() != channels:
            raise ValueError(f"preprocess.{key}: {value.numel()} values for {channels}-channel images")
        stats.append(value.reshape(1, channels, 1, 1))
    return stats[0], stats[1]


def subset_indices(run: RunSpec, n_train: int, n_test: int, unit: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's train_subset / test_subset as sorted index draws from `data_seed` (in that
    order, one generator), or every index; the same for images and text."""
    gen = torch.Generator().manual_seed(int(run.data_seed))
    drawn = []
    for key, total, what in (("train_subset", n_train, "training"), ("test_subset", n_test, "test")):
        size = getattr(run, key)
        if size is None:
            drawn.append(torch.arange(total))
            continue
        if size > total:
            raise ValueError(f"{key} {size} > {total} {what} {unit}")
        drawn.append(torch.randperm(total, generator=gen)[:size].sort().values)
    return drawn[0], drawn[1]


def train_val_indices(n: int, run: RunSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the training pool of the training and the validation examples."""
    if run.val_size > 0:
        tr, va = train_val_split(n, run.val_size, run.data_seed)
        return _as_index(tr), _as_index(va)
    return torch.arange(n), torch.arange(0)


# The split a text set is evaluated on, by preference (MNLI: the matched dev set, as the paper).
TEXT_TEST_SPLITS = ("test", "dev_matched", "dev")


def text_max_len(run: RunSpec) -> int:
    options = run.model.options
    return int(options.get("max_len", model_options(run.model.name).get("max_len", 128)))


def device_text(data, run: RunSpec, device: torch.device) -> DeviceSplits:
    """Encode the run's sentence pairs with the set's own tokenizer, once, onto the device."""
    from bpfree.data.tokenization import encode_examples

    if run.train_data or run.preprocess.resize:
        raise ValueError(f"{run.dataset} is a text set: train_data and resize apply to images only")
    test_split = next((name for name in TEXT_TEST_SPLITS if name in data.splits), None)
    if test_split is None:
        raise ValueError(f"{run.dataset} has no labelled evaluation split ({', '.join(TEXT_TEST_SPLITS)})")
    train, test = data.splits["train"], data.splits[test_split]
    pool, test_idx = subset_indices(run, len(train), len(test), "examples")
    tr, va = train_val_indices(len(pool), run)
    max_len = text_max_len(run)

    def encoded(examples, idx):
        chosen = [examples[i] for i in idx.tolist()]
        x = encode_examples(data.tokenizer, chosen, data.text_fields, max_len).to(device)
        return x, torch.tensor([e["label"] for e in chosen], dtype=torch.long, device=device)

    x_tr, y_tr = encoded(train, pool[tr])
    x_va, y_va = encoded(train, pool[va])
    x_te, y_te = encoded(test, test_idx)
    zero, one = torch.zeros((), device=device), torch.ones((), device=device)
    return DeviceSplits(x_tr, y_tr, x_va, y_va, x_te, y_te, zero, one, False, int(data.num_classes),
                        {"kind": "text", "test_split": test_split, "max_len": max_len},
                        data.tokenizer.get_vocab_size())


def run_model_options(run: RunSpec, splits: DeviceSplits) -> dict:
    """The model's options for this run's data: text models take the tokenizer's vocabulary size."""
    options = dict(run.model.options)
    if splits.vocab_size is not None:
        given = options.setdefault("vocab_size", splits.vocab_size)
        if given != splits.vocab_size:
            raise ValueError(f"model option vocab_size {given} != the {run.dataset} tokenizer's "
                             f"{splits.vocab_size}; leave vocab_size out of the config")
    return options


def device_splits(data, run: RunSpec | dict, device: torch.device) -> DeviceSplits:
    """Cut the run's subsets out of the prepared tensors and resize them once, on device."""
    run = as_run_spec(run)
    if hasattr(data, "tokenizer"):
        return device_text(data, run, device)
    pool, test_idx = subset_indices(run, len(data.y_train), len(data.y_test), "images")

    def take(x, idx):
        return x[idx.to(x.device)].to(device)

    y_pool, y_test, num_classes, draw = take(data.y_train, pool), take(data.y_test, test_idx), int(data.num_classes), None
    spec = run.train_data
    if spec:
        # Drawn from the run's seed: a fresh draw per repeat, the same for every rule.
        if spec["kind"] == "noisy_subset":
            pool, y_pool, flipped = noisy_subset(pool, y_pool.cpu(), spec["size"], spec["flip_fraction"],
                                                 num_classes, spec["seed"])
            y_pool = y_pool.to(device)
            draw = {"kind": "noisy_subset", "seed": spec["seed"], "flipped": int(flipped.sum())}
        else:
            pool, y_pool, classes = k_class_subset(pool, y_pool.cpu(), spec["k"], num_classes, spec["seed"],
                                                   spec.get("per_class"))
            test_idx, y_test = task_subset(test_idx, y_test.cpu(), classes)
            y_pool, y_test, num_classes = y_pool.to(device), y_test.to(device), spec["k"]
            draw = {"kind": "k_class", "seed": spec["seed"], "classes": classes}
    tr, va = train_val_indices(len(pool), run)
    tr_idx, va_idx = pool[tr], pool[va]
    y_tr, y_va = y_pool[tr.to(y_pool.device)], y_pool[va.to(y_pool.device)]

    x_tr, x_va, x_te = take(data.x_train, tr_idx), take(data.x_train, va_idx), take(data.x_test, test_idx)
    x_tr, x_va, x_te = (resize_images(x, run.preprocess.resize) for x in (x_tr, x_va, x_te))
    mean, std = normalisation(data, device, run.preprocess)
    return DeviceSplits(x_tr, y_tr, x_va, y_va, x_te, y_test, mean, std, bool(run.preprocess.normalize),
                        num_classes, draw)


def resize_images(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Bilinear resize once, in float [0, 1]; per-batch work is then only the normalisation."""
    if not size or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    return F.interpolate(x.float().div(255.0), size=(size, size), mode="bilinear", align_corners=False)


def check_batch_size(run: RunSpec, n_train: int) -> None:
    """A batch larger than the training set would silently train full-batch: refuse it, one line."""
    from bpfree.config import ConfigError
    bs = int(run.batch_size)
    if bs > n_train:
        raise ConfigError("batch_size", bs, f"exceeds the {n_train} training images of run "
                          f"{run.name}; for full-batch training set "
                          f"batch_size: {n_train} (in the profile, for a profile's subset)")


def preflight(runs: list[RunSpec], data, device) -> None:
    """Every run's batch size, model and rule options checked before the first run trains.

    A sweep's bad point (a negative width, an LFNN delta above 1) or a batch larger than the
    training set would otherwise fail, or silently change the protocol, only when reached,
    after earlier points trained. Raises ConfigError naming the run. Models are built on the
    CPU once per distinct (model, rule) configuration.
    """
    from bpfree.config import ConfigError
    sizes, built = {}, set()
    for run in map(as_run_spec, runs):
        if run.protocol != "single":
            continue  # their task sets are cut per task (continual.task_images)
        key = repr((run.train_subset, run.test_subset, run.val_size, run.data_seed, run.train_data,
                    run.preprocess.resize, run.seed))
        if key not in sizes:
            images = device_splits(data, run, device)
            sizes[key] = (len(images.y_train), images)
            del images
        n_train, images = sizes[key]
        sizes[key] = (n_train, types.SimpleNamespace(num_classes=images.num_classes, vocab_size=images.vocab_size))
        check_batch_size(run, n_train)
        spec = repr((run.model, run.rule))
        if spec in built:
            continue
        built.add(spec)
        options = dict(run.model.options)
        try:
            options = run_model_options(run, sizes[key][1])
            model = build_model(run.model.name, num_classes=sizes[key][1].num_classes, **options)
            apply_rule(model, run.rule.name, **run.rule.options).remove()
        except (ValueError, TypeError, RuntimeError) as error:
            where = f"run {run.name}: model {run.model.name} {options}, rule {run.rule.name}"
            raise ConfigError(where, run.rule.options or options,
                              str(error).splitlines()[0] if str(error) else type(error).__name__) from None


def parameter_groups(model: nn.Module, cfg: OptimizerSpec | dict):
    """The model's parameters, biases in a group of their own when `bias_lr_scale` is set.

    Akrout et al.'s reference code steps weights by lr/batch x the batch sum of their
    gradients but biases by lr/batch x the batch mean (fcnn/FCNN_BP.py:140-143, 185): a
    bias learning rate 1/batch of the weights'. The weights' group comes first, so
    param_groups[0]["lr"] stays the run's lr.
    """
    cfg = OptimizerSpec.of(cfg, "optimizer")
    if cfg.bias_scale == 1:
        return list(model.parameters())
    named = list(model.named_parameters())
    rest = [p for name, p in named if not name.endswith("bias")]
    biases = [p for name, p in named if name.endswith("bias")]
    return [{"params": rest}, {"params": biases, "lr": cfg.lr * cfg.bias_scale}]


def build_optimizer(params, cfg: OptimizerSpec | dict) -> torch.optim.Optimizer:
    """SGD (no momentum, decay or Nesterov unless set) or Adam with torch's default betas."""
    cfg = OptimizerSpec.of(cfg, "optimizer")
    decay = or_default(cfg.weight_decay, 0.0)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=or_default(cfg.momentum, 0.0), weight_decay=decay,
                               nesterov=or_default(cfg.nesterov, False))
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def build_scheduler(optimizer, cfg: ScheduleSpec | dict, steps_per_epoch: int = 1, epochs: int = 1):
    """Stepped once per EPOCH by the trainer (stepping per batch is a classic reproduction
    bug), except OneCycle, which is defined per batch (PER_BATCH_SCHEDULES) and stepped so.
    An unset gamma is 0.1, an unset OneCycle peak the optimiser's lr, its warm-up 30 %."""
    cfg = ScheduleSpec.of(cfg, "schedule")
    gamma = or_default(cfg.gamma, 0.1)
    if cfg.name == "onecycle":
        max_lr = or_default(cfg.max_lr, optimizer.param_groups[0]["lr"])
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, epochs=epochs,
                                                   steps_per_epoch=steps_per_epoch,
                                                   pct_start=or_default(cfg.pct_start, 0.3))
    if cfg.name == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=gamma)
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=gamma)
    return None


def evaluate_split(model: nn.Module, images: DeviceSplits, x: torch.Tensor,
                   y: torch.Tensor, loss_fn: LossFn | None = F.cross_entropy) -> tuple[float | None, float | None]:
    """(top-1 accuracy in percent, mean loss); (None, None) for an empty split; loss None
    when loss_fn is None (accuracy alone: no loss that might not fit the net's output)."""
    if len(y) == 0:
        return None, None
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=y.device)
    for i in range(0, len(y), EVAL_BATCH):
        out = model(images.prepare(x[i:i + EVAL_BATCH]))
        correct += (predicted_class(out) == y[i:i + EVAL_BATCH]).sum()
        yb = y[i:i + EVAL_BATCH]
        if loss_fn is not None:
            loss_sum += loss_fn(out.float(), yb).double() * len(yb)
    model.train(was_training)
    return 100.0 * correct.item() / len(y), None if loss_fn is None else loss_sum.item() / len(y)


def accuracy(model: nn.Module, images: DeviceSplits, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Top-1 accuracy in percent; None for an empty split."""
    return evaluate_split(model, images, x, y, loss_fn=None)[0]


# torch.compile's backend; tests set BPFREE_COMPILE_BACKEND=aot_eager (no C++ toolchain needed).
COMPILE_BACKEND = os.environ.get("BPFREE_COMPILE_BACKEND", "inductor")


def speed_setup(model: nn.Module, images: DeviceSplits, speed: dict, device: torch.device, ranks=None):
    """(module to call, autocast factory or None) for a run's `speed` settings and ranks.

    The rule stays applied to `model` itself; DDP and torch.compile wrap it, so checkpoints,
    diagnostics and the rule's hooks all see the plain module.
    """
    if speed.get("channels_last"):
        model.to(memory_format=torch.channels_last)
        images.channels_last = True
    net = distributed.wrap(model, ranks, device)
    net = torch.compile(net, backend=COMPILE_BACKEND) if speed.get("compile") else net
    autocast = None
    if speed.get("precision", "fp32") == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    return net, autocast


def loss_instability(epochs: list[int], losses: list[float | None]) -> dict:
    """{diverged_epoch, unstable_epoch, peak_ratio} of a run's recorded training losses, per
    the rule above; the reference is the first recorded epoch's loss."""
    out = {"diverged_epoch": None, "unstable_epoch": None, "peak_ratio": None, "loss": None}
    first = next((v for v in losses if v is not None), None)
    peak = 0.0
    for epoch, loss in zip(epochs, losses):
        if loss is None:
            continue
        if exploded(loss, first):
            out["diverged_epoch"], out["loss"] = epoch, loss
            out["peak_ratio"] = loss / first if math.isfinite(loss) and first else None
            return out
        if first > 0:
            peak = max(peak, loss / first)
            if out["unstable_epoch"] is None and loss > UNSTABLE_FACTOR * first:
                out["unstable_epoch"] = epoch
    out["peak_ratio"] = peak if first else None
    return out


def _select(history: list[dict], selection: str) -> dict:
    """Which epoch's test accuracy is reported, plus the two alternatives, clearly labelled."""
    if not history:
        return {"selected_epoch": None, "selected_test_acc": None, "final_test_acc": None,
                "best_test_epoch": None, "best_test_acc_test_selected": None}
    final = history[-1]
    if selection == "best_val":
        chosen = max(history, key=lambda h: (h["val_acc"], -h["epoch"]))  # earliest best
    else:
        chosen = final
    best_test = max(history, key=lambda h: (h["test_acc"], -h["epoch"]))
    return {
        "selection": selection,
        "selected_epoch": chosen["epoch"],
        "selected_test_acc": chosen["test_acc"],
        "final_test_acc": final["test_acc"],
        # biotorch picked the best epoch ON THE TEST SET; kept only for comparison with it.
        "best_test_epoch": best_test["epoch"],
        "best_test_acc_test_selected": best_test["test_acc"],
    }


class ResumeState:
    """The state of a run after its last finished epoch, in one atomically written file.

    Why all of it: a run killed mid-epoch and restarted from here must end with exactly the
    numbers of an uninterrupted run, so everything the remaining epochs read is saved, the
    random streams included (batch order, augmentation, dropout, the rule's own draws).
    A file written for another config, data or code is ignored, never continued.
    Loading uses weights_only=True: tensors and plain containers only, no code runs.
    """

    KEYS = ("epoch", "resumed_at", "elapsed_s", "model", "optimizer", "scheduler", "rule", "conservation",
            "rng", "history", "diagnostics", "step_ms")

    def __init__(self, path, fingerprint: str, every_s: float = 0.0, epochs: int | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.every_s = float(every_s)
        self.epochs = epochs
        self._last = time.perf_counter()

    def load(self) -> tuple[dict | None, str | None]:
        """(state, None), or (None, why the file was not continued); (None, None) if absent.

        A file that matches the run but cannot be continued (missing parts, an epoch the run
        does not have, history beyond its epoch) is deleted, so a retry does not meet it again.
        """
        if not self.path.is_file():
            return None, None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - an unreadable file costs only the epochs it held
            self.path.unlink(missing_ok=True)
            return None, f"unreadable ({type(error).__name__}), deleted, starting afresh"
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            return None, "written for another config, data or code, starting afresh"
        problem = self._problem(state)
        if problem:
            self.path.unlink(missing_ok=True)
            return None, f"{problem}, deleted, starting afresh"
        return state, None

    def _problem(self, state: dict) -> str | None:
        missing = [k for k in self.KEYS if k not in state]
        if missing:
            return f"lacks {', '.join(missing)}"
        epoch = state["epoch"]
        if not isinstance(epoch, int) or epoch < 1 or (self.epochs is not None and epoch >= self.epochs):
            return f"saved after epoch {epoch!r}, which this {self.epochs}-epoch run cannot continue from"
        history = state["history"]
        if not isinstance(history, list) or any(not isinstance(h, dict) or h.get("epoch", 0) > epoch
                                                for h in history):
            return f"its history does not end by epoch {epoch}"
        return None

    def due(self) -> bool:
        return time.perf_counter() - self._last >= self.every_s

    def save(self, state: dict) -> None:
        from bpfree.provenance import atomic_torch_save
        atomic_torch_save(self.path, {"fingerprint": self.fingerprint, **state})
        self._last = time.perf_counter()


def run_fingerprint(run: RunSpec, manifest: dict) -> str:
    """Config, data and code of a run: what a resume file must match to be continued (the
    same two hashes that decide whether a finished run's metrics.json is reused)."""
    from bpfree.config import config_hash
    return f"{config_hash(run.hash_payload(), data_hash(manifest))}-{code_hash()}"


def _load_model_state(model: nn.Module, state: dict, device: torch.device) -> None:
    """load_state_dict, creating first the buffers a rule makes on its first forward (DFA's B)."""
    for key in state.keys() - model.state_dict().keys():
        owner, _, name = key.rpartition(".")
        model.get_submodule(owner).register_buffer(name, state[key].to(device))
    model.load_state_dict(state)


def _rng_snapshot(device: torch.device, generators: dict[str, torch.Generator | None]) -> dict:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    states.update({name: g.get_state() for name, g in generators.items() if g is not None})
    return states


def _rng_restore(device: torch.device, generators: dict[str, torch.Generator | None], states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)
    for name, g in generators.items():
        if g is not None:
            g.set_state(states[name])


def train_run(run: RunSpec | dict, data, device, *, checkpoint_path: str | os.PathLike | None = None,
              resume_path: str | os.PathLike | None = None, resume_every_s: float = 0.0,
              log: Callable[[str], None] | None = None, progress: bool = False) -> dict:
    """Train one (experiment, rule, seed) run and return its metrics dict.

    A non-finite training loss ends the run with status DIVERGED instead of raising, so the
    rest of the pipeline (other rules, other seeds, tables) still runs. With `resume_path`,
    the state after each epoch (at most every `resume_every_s` seconds) is saved there and
    a matching file is continued (ResumeState); the caller deletes it once the metrics are
    safe. `progress` shows an epoch bar (bpfree.progress decides whether it is visible).
    """
    nondeterministic_ops: list[str] = []
    run = as_run_spec(run)
    with recording_nondeterministic_ops(nondeterministic_ops):
        metrics = _train_run(run, data, device, checkpoint_path, resume_path, resume_every_s, log, progress)
    metrics["determinism"]["nondeterministic_ops"] = nondeterministic_ops
    return metrics


@dataclass
class SingleTask:
    """One single-task run, built: what its callbacks and its record share."""

    run: RunSpec
    device: torch.device
    ranks: distributed.Ranks | None
    determinism: dict
    images: DeviceSplits
    model: nn.Module
    trainee: Trainee
    batches: Batches
    generators: dict

    @property
    def epochs(self) -> int:
        return int(self.run.epochs)


def build_single_task(run: RunSpec, data, device) -> SingleTask:
    """Seed, model, rule, optimiser, schedule and batch walk of a run, in the order that fixes
    its random draws (the model and the rule both draw, so they come after seeding)."""
    device = torch.device(device) if not isinstance(device, torch.device) else device
    ranks = distributed.from_environment()  # torchrun: this process is one data-parallel rank
    if ranks is not None and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
    determinism = set_determinism(run.threads, run.deterministic_kernels)
    seed = int(run.seed)
    images = device_splits(data, run, device)
    check_batch_size(run, len(images.y_train))
    seed_everything(seed)
    model = build_model(run.model.name, num_classes=images.num_classes, **run_model_options(run, images)).to(device)
    handle = apply_rule(model, run.rule.name, **run.rule.options)
    optimizer = build_optimizer(parameter_groups(model, run.optimizer), run.optimizer)  # after KP adds B
    net, autocast = speed_setup(model, images, run.speed_settings, device, ranks)
    if ranks is not None and int(run.batch_size) % ranks.world:
        raise ValueError(f"batch_size {run.batch_size} is not divisible by the {ranks.world} data-parallel ranks")
    generators = batch_generators(run, device)
    batches, trainee = batches_and_trainee(run, images, net, handle, optimizer, generators, int(run.epochs),
                                           autocast, ranks)
    return SingleTask(run, device, ranks, determinism, images, model, trainee, batches,
                      {"order": generators[0], "augment": generators[1]})


def batch_generators(run: RunSpec, device) -> tuple[torch.Generator, torch.Generator | None]:
    """The batch-order and augmentation streams, from the run seed alone (augmentation only
    when the run augments): what the model and the rule draw never shifts the batches."""
    seed = int(run.seed)
    augment = torch.Generator(device=device).manual_seed(seed + 1) if run.preprocess.augments else None
    return torch.Generator().manual_seed(seed), augment


def batches_and_trainee(run: RunSpec, images: DeviceSplits, net: nn.Module, handle, optimizer, generators,
                        epochs: int, autocast=None, ranks=None) -> tuple[Batches, Trainee]:
    """One training set's batch walk, and what a step updates with the run's schedule,
    clipping and loss (a single task, and each task of a sequence)."""
    batches = Batches(images, int(run.batch_size), *generators, run.preprocess.crop, bool(run.preprocess.flip),
                      *run.batch_order, ranks)
    scheduler = build_scheduler(optimizer, run.schedule, batches.steps, epochs)
    trainee = Trainee(net, handle, optimizer, scheduler, run.schedule.name in PER_BATCH_SCHEDULES,
                      run.optimizer.clip, loss_function(run.loss_name), autocast)
    return batches, trainee


class Diagnostics(Callback):
    """Alignment (and conservation) diagnostics every `every` epochs on a fixed batch.

    In full-batch protocols the update-gradient angle is that of the epoch's one real step
    (measured between the rule's .grad and the optimiser step); otherwise of a probe step
    on the batch that leaves the net and the random streams as they were."""

    def __init__(self, task: SingleTask):
        cfg = task.run.diagnostics
        self.every = int(cfg.every or 0)
        self.task, self.records, self.step_angles = task, [], None
        images = task.images
        self.x = images.prepare(images.x_train[:cfg.batch]) if self.every else None
        self.y = images.y_train[:cfg.batch] if self.every else None
        self.tracker = ConservationTracker(task.trainee.handle) if self.every and cfg.conservation else None

    def due(self, epoch: int) -> bool:
        return bool(self.every) and epoch % self.every == 0

    def measure(self, epoch: int, step_angles=None) -> None:
        task, handle = self.task, self.task.trainee.handle
        if step_angles is None:
            report = alignment_report(task.model, handle, task.trainee.loss_fn, self.x, self.y)
        else:
            report = {"weight_feedback_angle_deg": weight_feedback_angles(handle),
                      "update_gradient_angle_deg": step_angles}
        if self.tracker is not None and epoch > 0:
            report["conservation"] = self.tracker.report()
        self.records.append({"epoch": epoch, **report})

    def epoch_start(self, epoch: int) -> None:
        self.step_angles = None

    def before_update(self, epoch: int):
        if not (self.task.batches.full_batch and self.due(epoch)):
            return None
        task = self.task

        def record_step(xb, yb):
            self.step_angles = step_gradient_angles(task.model, task.trainee.handle, task.trainee.loss_fn, xb, yb)
        return record_step

    def epoch_end(self, stats: EpochStats) -> None:
        if self.due(stats.epoch):
            self.measure(stats.epoch, self.step_angles)


class Evaluation(Callback):
    """Validation and test accuracy every `log_every` epochs (and the last), into the history."""

    def __init__(self, task: SingleTask, bar, log):
        self.task, self.bar, self.log = task, bar, log
        self.every = task.run.log_interval
        self.history: list[dict] = []

    def epoch_end(self, stats: EpochStats) -> None:
        self.bar.update(1)
        epoch, epochs = stats.epoch, self.task.epochs
        if epoch % self.every and epoch != epochs:
            return
        net, images, loss_fn = self.task.trainee.net, self.task.images, self.task.trainee.loss_fn
        val_acc, _ = evaluate_split(net, images, images.x_val, images.y_val, loss_fn)
        test_acc, test_loss = evaluate_split(net, images, images.x_test, images.y_test, loss_fn)
        record = {"epoch": epoch, "lr": stats.lr, "train_loss": stats.train_loss, "train_acc": stats.train_acc,
                  "val_acc": val_acc, "test_acc": test_acc, "test_loss": test_loss}
        self.history.append(record)
        self.bar.set_postfix(loss=f"{stats.train_loss:.4f}", train=f"{stats.train_acc:.1f}%",
                             test=f"{test_acc:.1f}%", refresh=False)
        if self.log and (self.every == 1 or epoch % (50 * self.every) == 0 or epoch == epochs):
            self.log(f"  epoch {epoch}: loss {stats.train_loss:.4f} train {stats.train_acc:.2f}% "
                     f"val {val_acc if val_acc is not None else '-'} test {test_acc:.2f}%")


class Resume(Callback):
    """Saves the run's whole state after an epoch (ResumeState) and restores it before fit()."""

    def __init__(self, task: SingleTask, resume: ResumeState | None, diagnostics: Diagnostics,
                 evaluation: Evaluation, timer: StepTimer):
        self.task, self.resume, self.diagnostics, self.evaluation, self.timer = (
            task, resume, diagnostics, evaluation, timer)
        self.wall0 = time.perf_counter()
        self.first_epoch, self.first_loss, self.resumed_at, self.elapsed_before = 1, None, [], 0.0

    def restore(self, saved: dict) -> None:
        task, t = self.task, self.task.trainee
        _load_model_state(task.model, saved["model"], task.device)
        t.optimizer.load_state_dict(saved["optimizer"])
        if t.scheduler is not None:
            t.scheduler.load_state_dict(saved["scheduler"])
        t.handle.rule.load_resume_state(saved["rule"])
        if self.diagnostics.tracker is not None:
            self.diagnostics.tracker.load_state(saved["conservation"])
        _rng_restore(task.device, task.generators, saved["rng"])
        self.evaluation.history, self.diagnostics.records = saved["history"], saved["diagnostics"]
        self.timer.samples = saved["step_ms"]
        self.first_loss = saved.get("first_loss")
        self.resumed_at, self.elapsed_before = saved["resumed_at"] + [saved["epoch"]], saved["elapsed_s"]
        self.first_epoch = saved["epoch"] + 1

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.wall0

    def epoch_end(self, stats: EpochStats) -> None:
        task, t, ranks = self.task, self.task.trainee, self.task.ranks
        if (self.resume is None or stats.epoch == task.epochs or not self.resume.due()
                or (ranks is not None and not ranks.leader)):
            return
        self.timer.flush()
        tracker = self.diagnostics.tracker
        self.resume.save({
            "epoch": stats.epoch, "resumed_at": self.resumed_at, "first_loss": stats.first_loss,
            "elapsed_s": self.elapsed(), "model": task.model.state_dict(), "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
            "rule": t.handle.rule.resume_state(), "conservation": tracker.state() if tracker is not None else None,
            "rng": _rng_snapshot(task.device, task.generators), "history": self.evaluation.history,
            "diagnostics": self.diagnostics.records, "step_ms": self.timer.samples,
        })


def step_timer(task: SingleTask, diagnostics: Diagnostics) -> StepTimer:
    """Times every step but the first epoch's warm-up and the steps that diagnostics share."""
    warmup = min(WARMUP_STEPS, task.batches.steps // 2)
    full_batch = task.batches.full_batch

    def keep(epoch: int, step: int) -> bool:
        untimed = diagnostics.due(epoch) or (full_batch and epoch <= WARMUP_STEPS)  # one step per epoch
        return step >= (warmup if epoch == 1 else 0) and not untimed
    return StepTimer(task.device, keep)


def _train_run(run: RunSpec, data, device, checkpoint_path, resume_path, resume_every_s, log, progress) -> dict:
    from bpfree.progress import epoch_bar

    wall0 = time.perf_counter()
    task = build_single_task(run, data, device)
    manifest = getattr(data, "manifest", {}) or {}
    diagnostics = Diagnostics(task)
    timer = step_timer(task, diagnostics)
    resume_state = (ResumeState(resume_path, run_fingerprint(run, manifest), resume_every_s, task.epochs)
                    if resume_path else None)
    saved, ignored = resume_state.load() if resume_state is not None else (None, None)
    if ignored and log:
        log(f"  resume file {resume_path}: {ignored}")
    bar = epoch_bar(task.epochs, run.name, enabled=progress,
                    initial=saved["epoch"] if saved is not None else 0)
    evaluation = Evaluation(task, bar, log)
    resume = Resume(task, resume_state, diagnostics, evaluation, timer)
    resume.wall0 = wall0
    if saved is not None:
        resume.restore(saved)
        if log:
            log(f"  resumed after epoch {saved['epoch']} from {resume_path}")
    elif diagnostics.every:
        diagnostics.measure(0)
    task.model.train()
    outcome = fit(task.trainee, task.batches, task.epochs, first_epoch=resume.first_epoch,
                  first_loss=resume.first_loss, callbacks=[diagnostics, evaluation, resume], timer=timer)
    bar.close()
    if outcome.diverged is not None and log:
        log(f"  epoch {outcome.diverged.epoch}: training loss {outcome.diverged.train_loss} "
            f"(first epoch {outcome.first_loss}), run DIVERGED")
    return single_task_record(task, outcome, evaluation.history, diagnostics.records, timer, resume,
                              checkpoint_path).to_json(manifest, task.device)


def single_task_record(task: SingleTask, outcome: FitOutcome, history: list[dict], diagnostics: list[dict],
                       timer: StepTimer, resume: Resume, checkpoint_path) -> RunRecord:
    """The finished run's record; its weights go to `checkpoint_path` when it did not diverge."""
    from bpfree.provenance import atomic_torch_save

    run, ranks, handle = task.run, task.ranks, task.trainee.handle
    status = STATUS_OK if outcome.diverged is None else STATUS_DIVERGED
    step_ms = timer.mean_ms()
    checkpoint = None
    if checkpoint_path is not None and status == STATUS_OK and (ranks is None or ranks.leader):
        atomic_torch_save(checkpoint_path, {
            "state_dict": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
            "model": run.model.name, "rule": run.rule.name, "seed": int(run.seed),
            "final_test_acc": history[-1]["test_acc"] if history else None,
        })
        checkpoint = str(checkpoint_path)
    counts = dict(handle.counts)
    handle.remove()
    selected = _select(history, run.selection)
    curves = None
    # Trained and evaluated epochs (a diverged epoch is neither); the history may be cut below.
    epochs_completed = task.epochs if outcome.diverged is None else outcome.diverged.epoch - 1
    if run.log_interval > 1:
        # Long runs: every logged epoch goes into compact columns instead of one dict each.
        curves = to_curves(history, diagnostics)
        history = history[-1:]
        diagnostics = diagnostics[:1] + diagnostics[-1:] if len(diagnostics) > 1 else diagnostics
    images = task.images
    protocol = {"resumed_after_epochs": resume.resumed_at}
    if ranks is not None:
        protocol["distributed"] = {"world_size": ranks.world, "backend": torch.distributed.get_backend()}
    return RunRecord(
        run=run.to_dict(), status=status, history=history, selection=selected, curves=curves,
        diverged_epoch=outcome.diverged.epoch if outcome.diverged is not None else None,
        sizes={"train": len(images.y_train), "val": len(images.y_val), "test": len(images.y_test)},
        wall_time_s=resume.elapsed(), determinism=task.determinism, train_data_draw=images.draw,
        mean_step_ms=step_ms, converted_layers=counts, diagnostics=diagnostics, checkpoint=checkpoint,
        protocol=protocol, epochs_completed=epochs_completed)


# The modules a run starts from; everything they import from bpfree is found by reading them.
TRAINING_ENTRY_MODULES = ("bpfree.training", "bpfree.continual", "bpfree.transfer")


def _module_file(root: Path, module: str) -> Path | None:
    """bpfree.a.b -> root/a/b.py or root/a/b/__init__.py (None outside the package)."""
    parts = module.split(".")
    if parts[0] != root.name:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every bpfree module a file imports, at top level or inside a function (a lazy import
    runs during training too)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from bpfree import config`
    return {m for m in found if m == package or m.startswith(package + ".")}


def code_files() -> list[Path]:
    """The package files a training run executes, derived from the code rather than listed:
    the entry modules, every bpfree module they import (transitively, each package's
    __init__ included), and the data files (.json) of the subpackages reached. A change to any
    of them changes `code_hash`, so the train stage cannot reuse a run the change affects."""
    root = Path(__file__).resolve().parent
    pending = list(TRAINING_ENTRY_MODULES)
    seen: set[str] = set()
    files: set[Path] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        parents = module.split(".")
        pending += [".".join(parents[:i]) for i in range(1, len(parents))]  # importing a.b runs a
        path = _module_file(root, module)
        if path is None:
            continue
        files.add(path)
        if path.name == "__init__.py" and path.parent != root:  # a subpackage's data (checksums)
            files |= set(path.parent.glob("*.json"))
        pending += sorted(_imported_modules(path, root.name))
    return sorted(files)


def code_hash() -> str:
    """Fingerprint of the code a run executes: a resumed stage reuses a finished run only if
    neither its config nor this changed, so editing a rule never leaves stale metrics behind."""
    import hashlib
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for f in code_files():
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


CURVE_DIGITS = 7  # float32 training: later digits are rounding noise


def _round(v, digits: int = CURVE_DIGITS):
    return v if not isinstance(v, float) or not math.isfinite(v) or v == 0 else float(f"{v:.{digits}g}")


def to_curves(history: list[dict], diagnostics: list[dict]) -> dict[str, list]:
    """Columns keyed "<quantity>" (history) or "<quantity>/<layer>" (diagnostics).

    History and diagnostics have their own epoch columns because they are logged on
    different schedules. Conservation columns hold each hidden layer's mean |ratio - 1|
    and the number of excluded neurons.
    """
    curves: dict[str, list] = {"epoch": [h["epoch"] for h in history]}
    for key in ("lr", "train_loss", "train_acc", "val_acc", "test_acc", "test_loss"):
        curves[key] = [_round(h.get(key)) for h in history]
    curves["diagnostics_epoch"] = [d["epoch"] for d in diagnostics]
    columns: dict[str, list] = {}
    for i, d in enumerate(diagnostics):
        values = {}
        for layer, v in d.get("weight_feedback_angle_deg", {}).items():
            values[f"weight_feedback_angle_deg/{layer}"] = v
        for layer, v in d.get("update_gradient_angle_deg", {}).items():
            values[f"update_gradient_angle_deg/{layer}"] = v
        for layer, c in (d.get("conservation") or {}).items():
            values[f"conservation_deviation/{layer}"] = c["mean_abs_deviation"]
            values[f"conservation_excluded/{layer}"] = c["excluded"]
        for key, v in values.items():
            columns.setdefault(key, [None] * len(diagnostics))[i] = _round(v)
    curves.update(sorted(columns.items()))
    return curves


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, corrupt, not a checkpoint)."""


def load_checkpoint_model(path, run: RunSpec | dict, splits: DeviceSplits, device) -> nn.Module:
    """Rebuild the plain model of a run from its checkpoint (rule state such as B is dropped:
    rules change only the backward pass, so the forward pass of the plain model is the same)."""
    run = as_run_spec(run)
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise ValueError("no state_dict in it")
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... by cause
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable ({detail}); delete it and re-run "
                              f"`python -m stages.train {or_default(run.id, '<experiment>')}` for it") from None
    model = build_model(run.model.name, num_classes=splits.num_classes,
                        **run_model_options(run, splits)).to(device)
    expected = model.state_dict()
    missing = [k for k in expected if k not in ckpt["state_dict"]]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing[:5]}")
    model.load_state_dict({k: ckpt["state_dict"][k] for k in expected})
    return model
