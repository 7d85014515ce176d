"""RunSpec: one run's configuration as frozen dataclasses, built and checked once.

Why: a run's config was a nested dict read by string keys across the harness, with its
defaults in two places and no type naming its fields. A RunSpec names every field once,
with its type; `RunSpec.from_dict` refuses a key it does not know (a typo, or a new key
that nobody taught the schema), and `hash_payload()` gives back exactly the dict that
bpfree.config.config_hash has always hashed, so no committed result goes stale
(tests/test_spec.py round-trips every run of every profile).

Keys a run does not set stay absent (ABSENT), not None: the hashed dict of an experiment
that never used a key must not change when the schema learns it. What an absent key means
(no clipping, one log per epoch, the default batch order) is said once, by the properties
below, which the trainer reads instead of the raw fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any


class _Absent:
    """A key the run's dict does not have (distinct from a key set to None)."""

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False


ABSENT: Any = _Absent()


def _opt() -> Any:
    return field(default=ABSENT)


class _Spec:
    """from_dict / to_dict shared by the blocks: fields map one to one onto dict keys."""

    @classmethod
    def from_dict(cls, d: dict, where: str = "run"):
        if not isinstance(d, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise KeyError(f"{where}: keys the run schema does not know: {unknown} (bpfree/spec.py)")
        missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise KeyError(f"{where}: missing keys {missing}")
        nested = {f.name: f.metadata["spec"] for f in fields(cls) if "spec" in f.metadata}
        values = {k: (nested[k].from_dict(v, f"{where}.{k}") if k in nested and isinstance(v, dict) else v)
                  for k, v in d.items()}
        return cls(**values)

    @classmethod
    def of(cls, value, where: str = "run"):
        """`value` as it is when it is already this spec, else a mapping checked into one."""
        return value if isinstance(value, cls) else cls.from_dict(value, where)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is ABSENT:
                continue
            out[f.name] = v.to_dict() if isinstance(v, _Spec) else v
        return out


def _block(spec_cls, default=dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"spec": spec_cls})


@dataclass(frozen=True)
class ModelSpec(_Spec):
    name: str
    options: dict


@dataclass(frozen=True)
class RuleSpec(_Spec):
    name: str
    options: dict


def or_default(value, default):
    """A field's value, or `default` where the run leaves it out (ABSENT; None stays None)."""
    return default if value is ABSENT else value


@dataclass(frozen=True)
class OptimizerSpec(_Spec):
    name: str
    lr: float
    momentum: float = _opt()
    weight_decay: float = _opt()
    nesterov: bool = _opt()
    bias_lr_scale: float = _opt()
    clip_grad_norm: float = _opt()

    @property
    def clip(self) -> float | None:
        """The gradient-norm bound, None for no clipping."""
        return or_default(self.clip_grad_norm, None)

    @property
    def bias_scale(self) -> float:
        """Biases' lr over the weights' (Akrout's reference code steps biases by the batch mean)."""
        scale = or_default(self.bias_lr_scale, None)
        return 1.0 if scale is None else scale


@dataclass(frozen=True)
class ScheduleSpec(_Spec):
    name: str
    milestones: list = _opt()
    gamma: float = _opt()
    step_size: int = _opt()
    max_lr: float = _opt()
    pct_start: float = _opt()


@dataclass(frozen=True)
class PreprocessSpec(_Spec):
    normalize: bool
    resize: int | None
    crop_padding: int = _opt()
    flip: bool = _opt()
    mean: list = _opt()
    std: list = _opt()

    @property
    def crop(self) -> int:
        """Padding of the random crop, 0 for none."""
        return int(self.crop_padding or 0)

    @property
    def augments(self) -> bool:
        """Whether batches are augmented (a random crop or flip), so an augmentation stream is drawn."""
        return bool(self.crop or self.flip)


@dataclass(frozen=True)
class DiagnosticsSpec(_Spec):
    every: int
    batch: int
    conservation: bool = _opt()


@dataclass(frozen=True)
class LoaderSpec(_Spec):
    """How an epoch walks the training set, as torch's DataLoader names it: reshuffled, the
    short last batch kept, unless set. Akrout et al.'s code reads MNIST in file order and
    never sees the last partial batch (FCNN_BP.py:103-106, 125)."""

    shuffle: bool = _opt()
    drop_last: bool = _opt()


@dataclass(frozen=True)
class SweepPoint(_Spec):
    param: str
    value: Any


@dataclass(frozen=True)
class RunSpec(_Spec):
    """One (experiment, rule, seed[, sweep value]) run as bpfree.config.run_configs resolves it."""

    seed: int
    # what is trained, and how
    dataset: str
    model: ModelSpec = _block(ModelSpec)
    rule: RuleSpec = _block(RuleSpec)
    optimizer: OptimizerSpec = _block(OptimizerSpec)
    schedule: ScheduleSpec = _block(ScheduleSpec)
    preprocess: PreprocessSpec = _block(PreprocessSpec)
    diagnostics: DiagnosticsSpec = _block(DiagnosticsSpec)
    batch_size: int
    epochs: int
    val_size: int
    selection: str
    train_subset: int | None
    test_subset: int | None
    data_seed: int
    # how it executes
    threads: int | None
    device: str
    # identity, and the profile's account of what it shortened (not hashed): run_configs
    # sets them; a run built by hand (a test, a notebook) may leave them out
    id: str = _opt()
    profile: str = _opt()
    run_id: str = _opt()
    lr_source: str = _opt()
    deviations: list = _opt()
    shortened: bool = _opt()
    # set only when used
    sweep: SweepPoint = _block(SweepPoint, ABSENT)
    loader: LoaderSpec = _block(LoaderSpec, ABSENT)
    loss: str = _opt()
    log_every: int = _opt()
    train_data: dict = _opt()
    continual: dict = _opt()
    transfer: dict = _opt()
    pruning: dict = _opt()
    speed: dict = _opt()
    deterministic: bool = _opt()
    notes: str = _opt()

    def hash_payload(self) -> dict:
        """Exactly the dict bpfree.config.config_hash hashes for this run (before the data hash)."""
        from bpfree.config import HASH_EXCLUDED
        return {k: v for k, v in self.to_dict().items() if k not in HASH_EXCLUDED}

    @property
    def name(self) -> str:
        """How messages name the run: its run id, or its rule for a run built by hand."""
        return or_default(self.run_id, self.rule.name)

    @property
    def log_interval(self) -> int:
        """Epochs between evaluations (1: every epoch)."""
        return int(or_default(self.log_every, 1))

    @property
    def loss_name(self) -> str | None:
        """The training loss (None: cross-entropy)."""
        return or_default(self.loss, None)

    @property
    def deterministic_kernels(self) -> bool:
        return bool(or_default(self.deterministic, True))

    @property
    def speed_settings(self) -> dict:
        return or_default(self.speed, {}) or {}

    @property
    def batch_order(self) -> tuple[bool, bool]:
        """(shuffle, drop_last), LoaderSpec's defaults where unset."""
        loader = self.loader if self.loader is not ABSENT else LoaderSpec()
        return bool(or_default(loader.shuffle, True)), bool(or_default(loader.drop_last, False))

    @property
    def protocol(self) -> str:
        """Which loop trains it: a task sequence, transfer, or a single task."""
        return "continual" if self.continual else "transfer" if self.transfer else "single"


def as_run_spec(run) -> RunSpec:
    """A RunSpec as it is, a run dict checked into one (an unknown key is refused here)."""
    return RunSpec.of(run)
