"""Parameters of the pipeline: load params.yaml, validate all of it, resolve one run's config.

Why validate everything up front: a typo in a rule name or a zero learning rate found in
hour three of a CPU profile wastes the two hours before it. Every check here runs before
any data is touched, and every error names the field path, the bad value and the choices.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from bpfree.losses import LOSSES

PARAMS_FILE = "params.yaml"
# The profile a stage runs when none is named: the one plain `dvc repro` (dvc.yaml) runs.
# The others have their own pipeline files (pipelines/<profile>/dvc.yaml), so switching
# profile never edits a tracked file.
DEFAULT_PROFILE = "smoke"
NOTES_FILE = Path(__file__).with_name("experiment_notes.yaml")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("multistep", "step", "onecycle", "none")
SELECTIONS = ("best_val", "final")
DEVICES = ("cpu", "cuda", "auto")

# Keys a profile may override per experiment. Anything else is a typo.
PROFILE_KEYS = (
    "epochs", "milestones", "seeds", "train_subset", "test_subset", "val_size",
    "threads", "device", "batch_size", "diagnostics_every", "log_every", "sweep_values",
    "train_data", "skip", "model_options", "pruning", "rules", "speed", "deterministic",
)
# How a profile may run the math faster; absent = these defaults (fp32, eager, contiguous).
SPEED_DEFAULTS = {"precision": "fp32", "compile": False, "channels_last": False}
PRECISIONS = ("fp32", "bf16")
TRAIN_DATA_KINDS = {
    # kind: {option: required?}. Drawn per run from the run's seed (see resolve_train_data).
    "noisy_subset": {"size": True, "flip_fraction": True},
    "k_class": {"k": True, "per_class": False},
}
EXPERIMENT_KEYS = {
    # key: required?
    "dataset": True, "model": True, "rules": True, "optimizer": True, "schedule": True,
    "batch_size": True, "epochs": True, "seeds": True, "val_size": True, "selection": True,
    "preprocess": False, "diagnostics": False, "data_seed": False, "notes": False,
    "tuning": False, "sweep": False, "train_data": False, "log_every": False, "continual": False,
    "pruning": False, "transfer": False, "loss": False, "loader": False,
}
# What a profile's `defaults:` may set for all of its experiments (an experiment's own entry
# wins): how runs execute, never what they compute.
PROFILE_DEFAULT_KEYS = ("threads", "device", "deterministic", "speed")
DEFAULTS = "defaults"

TOP_KEYS = {"datasets": True, "optional_datasets": False, "data_variants": True, "experiments": True,
            "profiles": True}


class ConfigError(ValueError):
    """A bad parameter; the message is one line: field path, bad value, valid choices."""

    def __init__(self, path: str, value: Any, problem: str, choices=None):
        self.path, self.value, self.choices = path, value, choices
        msg = f"{path}: {problem} (got {value!r})"
        if choices is not None:
            msg += f"; valid: {', '.join(map(str, choices))}"
        super().__init__(msg)


_MISSING = object()


# ----------------------------------------------------------------------------- primitives
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _mapping(v, path) -> dict:
    if not isinstance(v, dict):
        raise ConfigError(path, v, "must be a mapping")
    return v


def _keys(d: dict, spec: dict[str, bool], path: str) -> None:
    for key in d:
        if key not in spec:
            raise ConfigError(f"{path}.{key}", d[key], "unknown key", sorted(spec))
    for key, required in spec.items():
        if required and key not in d:
            raise ConfigError(f"{path}.{key}", None, "missing required key")


def _int(v, path, minimum=None) -> int:
    if not _is_int(v):
        raise ConfigError(path, v, "must be an integer")
    if minimum is not None and v < minimum:
        raise ConfigError(path, v, f"must be >= {minimum}")
    return v


def _positive(v, path) -> float:
    if not _is_num(v):
        raise ConfigError(path, v, "must be a number")
    if not v > 0:
        raise ConfigError(path, v, "must be > 0")
    if not math.isfinite(v):
        raise ConfigError(path, v, "must be finite")
    return float(v)


def _choice(v, path, choices) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(path, v, "unknown name", list(choices))
    return v


def _bool(v, path) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(path, v, "must be true or false")
    return v


def _seeds(v, path) -> list[int]:
    if not isinstance(v, list) or not v:
        raise ConfigError(path, v, "must be a non-empty list of integers")
    for i, s in enumerate(v):
        _int(s, f"{path}[{i}]", 0)
    if len(set(v)) != len(v):
        raise ConfigError(path, v, "seeds must be unique")
    return v


def _milestones(v, path) -> list[int]:
    if not isinstance(v, list):
        raise ConfigError(path, v, "must be a list of epochs")
    for i, m in enumerate(v):
        _int(m, f"{path}[{i}]", 1)
    if any(b <= a for a, b in zip(v, v[1:])):
        raise ConfigError(path, v, "milestones must be strictly increasing")
    return v


# ----------------------------------------------------------------------------- registries
def known_rules() -> list[str]:
    from bpfree.rules import list_rules
    return list_rules()


def known_models() -> list[str]:
    from bpfree.models import list_models
    return list_models()


def known_datasets() -> list[str]:
    from bpfree.data import list_datasets
    return list_datasets()


def _rule_options(rule: str, options: dict, path: str) -> None:
    """Let the rule itself judge its options now, instead of at apply time mid-pipeline."""
    from bpfree.rules import get_rule_class
    cls = get_rule_class(rule)
    for key in options:
        if key not in cls.defaults:
            raise ConfigError(f"{path}.{key}", options[key], f"unknown option of rule {rule!r}",
                              sorted(cls.defaults) or ["(none)"])
    try:
        cls(**options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(path, options, f"rejected by rule {rule!r}: {exc}") from None


# ----------------------------------------------------------------------------- sections
def _validate_model(m, path, models) -> None:
    _mapping(m, path)
    _keys(m, {"name": True, "options": False}, path)
    name = _choice(m["name"], f"{path}.name", models)
    options = _mapping(m.get("options", {}) or {}, f"{path}.options")
    from bpfree.models import INIT_SCHEMES, model_options
    valid = model_options(name)
    for key in options:
        if key not in valid:
            raise ConfigError(f"{path}.options.{key}", options[key],
                              f"unknown option of model {name!r}", sorted(valid))
    init = options.get("init", "default")
    _choice(init, f"{path}.options.init", INIT_SCHEMES)


def _validate_rules(rules, path, rule_names) -> None:
    _mapping(rules, path)
    if not rules:
        raise ConfigError(path, rules, "needs at least one rule", rule_names)
    for name, spec in rules.items():
        _choice(name, f"{path}.{name}", rule_names)
        spec = {} if spec is None else spec
        _mapping(spec, f"{path}.{name}")
        _keys(spec, {"lr": False, "options": False, "batch_size": False}, f"{path}.{name}")
        if "batch_size" in spec:  # the authors' per-rule batch (BackMAN 64 where BP uses 512)
            _int(spec["batch_size"], f"{path}.{name}.batch_size", 1)
        if isinstance(spec.get("lr"), dict):  # one lr per sweep value (the authors' per-depth lrs)
            if not spec["lr"]:
                raise ConfigError(f"{path}.{name}.lr", spec["lr"], "a per-sweep-value lr mapping needs entries")
            for point, lr in spec["lr"].items():
                _positive(lr, f"{path}.{name}.lr.{point}")
        elif "lr" in spec and spec["lr"] != TUNED:
            _positive(spec["lr"], f"{path}.{name}.lr")
        options = spec.get("options") or {}
        _mapping(options, f"{path}.{name}.options")
        _rule_options(name, options, f"{path}.{name}.options")


def _validate_optimizer(o, path) -> None:
    _mapping(o, path)
    _keys(o, {"name": True, "lr": True, "momentum": False, "weight_decay": False,
              "nesterov": False, "betas": False, "clip_grad_norm": False, "bias_lr_scale": False}, path)
    if o.get("bias_lr_scale") is not None:
        _positive(o["bias_lr_scale"], f"{path}.bias_lr_scale")
    if o.get("clip_grad_norm") is not None:
        _positive(o["clip_grad_norm"], f"{path}.clip_grad_norm")
    name = _choice(o["name"], f"{path}.name", OPTIMIZERS)
    _positive(o["lr"], f"{path}.lr")
    momentum = o.get("momentum", 0.0)
    if not _is_num(momentum) or not 0 <= momentum < 1:
        raise ConfigError(f"{path}.momentum", momentum, "must be a number in [0, 1)")
    if name == "adam" and momentum:
        raise ConfigError(f"{path}.momentum", momentum, "adam takes betas, not momentum")
    wd = o.get("weight_decay", 0.0)
    if not _is_num(wd) or wd < 0:
        raise ConfigError(f"{path}.weight_decay", wd, "must be a number >= 0")
    nesterov = _bool(o.get("nesterov", False), f"{path}.nesterov")
    if nesterov and (name != "sgd" or not momentum):
        raise ConfigError(f"{path}.nesterov", nesterov, "needs sgd with momentum > 0")
    if "betas" in o:
        b = o["betas"]
        if name != "adam" or not (isinstance(b, list) and len(b) == 2
                                  and all(_is_num(x) and 0 <= x < 1 for x in b)):
            raise ConfigError(f"{path}.betas", b, "adam only; two numbers in [0, 1)")


def _validate_schedule(s, path) -> None:
    _mapping(s, path)
    _keys(s, {"name": True, "milestones": False, "gamma": False, "step_size": False,
              "max_lr": False, "pct_start": False}, path)
    name = _choice(s["name"], f"{path}.name", SCHEDULES)
    if name == "onecycle":
        if "max_lr" in s:
            _positive(s["max_lr"], f"{path}.max_lr")
        pct = s.get("pct_start", 0.3)
        if not _is_num(pct) or not 0 < pct < 1:
            raise ConfigError(f"{path}.pct_start", pct, "must be a number in (0, 1)")
    if name == "step":
        if "step_size" not in s:
            raise ConfigError(f"{path}.step_size", None, "missing required key")
        _int(s["step_size"], f"{path}.step_size", 1)
        gamma = s.get("gamma", 0.1)
        if not _is_num(gamma) or not 0 < gamma <= 1:
            raise ConfigError(f"{path}.gamma", gamma, "must be a number in (0, 1]")
    if name == "multistep":
        if "milestones" not in s:
            raise ConfigError(f"{path}.milestones", None, "missing required key")
        _milestones(s["milestones"], f"{path}.milestones")
        gamma = s.get("gamma", 0.1)
        if not _is_num(gamma) or not 0 < gamma <= 1:
            raise ConfigError(f"{path}.gamma", gamma, "must be a number in (0, 1]")


def _validate_experiment(exp, path, ctx) -> None:
    _mapping(exp, path)
    _keys(exp, EXPERIMENT_KEYS, path)
    _choice(exp["dataset"], f"{path}.dataset", ctx["datasets"])
    _validate_model(exp["model"], f"{path}.model", ctx["models"])
    _validate_rules(exp["rules"], f"{path}.rules", ctx["rules"])
    _validate_optimizer(exp["optimizer"], f"{path}.optimizer")
    _validate_schedule(exp["schedule"], f"{path}.schedule")
    _int(exp["batch_size"], f"{path}.batch_size", 1)
    _int(exp["epochs"], f"{path}.epochs", 1)
    _seeds(exp["seeds"], f"{path}.seeds")
    _int(exp["val_size"], f"{path}.val_size", 0)
    _choice(exp["selection"], f"{path}.selection", SELECTIONS)
    for name, spec in exp["rules"].items():
        if isinstance((spec or {}).get("lr"), dict):
            values = (exp.get("sweep") or {}).get("values")
            if values is None:
                raise ConfigError(f"{path}.rules.{name}.lr", spec["lr"], "an lr per sweep value needs a sweep")
            missing = [v for v in values if v not in spec["lr"]]
            if missing:
                raise ConfigError(f"{path}.rules.{name}.lr", spec["lr"], f"no lr for sweep value(s) {missing}")
    _int(exp.get("data_seed", 0), f"{path}.data_seed", 0)
    pre = exp.get("preprocess", {}) or {}
    _mapping(pre, f"{path}.preprocess")
    _keys(pre, {"normalize": False, "resize": False, "crop_padding": False, "flip": False,
                "mean": False, "std": False}, f"{path}.preprocess")
    for key in ("mean", "std"):
        if key in pre:
            values = pre[key]
            if not (isinstance(values, list) and values and all(_is_num(v) and math.isfinite(v) for v in values)):
                raise ConfigError(f"{path}.preprocess.{key}", values, "must be a non-empty list of numbers (one per channel)")
            if key == "std" and not all(v > 0 for v in values):
                raise ConfigError(f"{path}.preprocess.std", values, "every value must be > 0")
    _int(pre.get("crop_padding", 0), f"{path}.preprocess.crop_padding", 0)
    _bool(pre.get("flip", False), f"{path}.preprocess.flip")
    _validate_protocol_blocks(exp, path, ctx)
    _bool(pre.get("normalize", True), f"{path}.preprocess.normalize")
    if pre.get("resize") is not None:
        _int(pre["resize"], f"{path}.preprocess.resize", 1)
    diag = exp.get("diagnostics", {}) or {}
    _mapping(diag, f"{path}.diagnostics")
    _keys(diag, {"every": False, "batch": False, "conservation": False}, f"{path}.diagnostics")
    _int(diag.get("every", 0), f"{path}.diagnostics.every", 0)
    _int(diag.get("batch", 256), f"{path}.diagnostics.batch", 1)
    _bool(diag.get("conservation", False), f"{path}.diagnostics.conservation")
    _int(exp.get("log_every", 1), f"{path}.log_every", 1)
    if exp.get("train_data") is not None:
        _validate_train_data(exp["train_data"], f"{path}.train_data")
    if exp.get("sweep") is not None:
        _validate_sweep(exp["sweep"], exp, f"{path}.sweep")
    if exp.get("tuning") is not None:
        _validate_tuning(exp["tuning"], f"{path}.tuning")
    if "notes" in exp and not isinstance(exp["notes"], str):
        raise ConfigError(f"{path}.notes", exp["notes"], "must be a string")


def _validate_protocol_blocks(exp, path, ctx) -> None:
    """The optional blocks: loss, loader, pruning, task sequence and transfer."""
    if exp.get("loss") is not None:
        _choice(exp["loss"], f"{path}.loss", tuple(LOSSES))
    if exp.get("loader") is not None:
        loader = _mapping(exp["loader"], f"{path}.loader")
        _keys(loader, {"shuffle": False, "drop_last": False}, f"{path}.loader")
        for key in loader:
            _bool(loader[key], f"{path}.loader.{key}")
    if exp.get("pruning") is not None:
        pr = _mapping(exp["pruning"], f"{path}.pruning")
        _keys(pr, {"methods": True, "step": False, "test_images": False, "relevance_batch": False,
                   "layers": False}, f"{path}.pruning")
        if "layers" in pr:
            _choice(pr["layers"], f"{path}.pruning.layers", ("all", "conv"))
        from bpfree.pruning import METHODS
        if not isinstance(pr["methods"], list) or not pr["methods"]:
            raise ConfigError(f"{path}.pruning.methods", pr["methods"], "must be a non-empty list", METHODS)
        for i, m in enumerate(pr["methods"]):
            _choice(m, f"{path}.pruning.methods[{i}]", METHODS)
        step = pr.get("step", 0.05)
        if not _is_num(step) or not 0 < step < 1:
            raise ConfigError(f"{path}.pruning.step", step, "must be a number in (0, 1)")
        for key in ("test_images", "relevance_batch"):
            if key in pr:
                _int(pr[key], f"{path}.pruning.{key}", 1)
    if exp.get("continual") is not None:
        c = _mapping(exp["continual"], f"{path}.continual")
        _keys(c, {"tasks": True, "classes_per_task": True}, f"{path}.continual")
        _int(c["tasks"], f"{path}.continual.tasks", 2)
        _int(c["classes_per_task"], f"{path}.continual.classes_per_task", 2)
        if exp.get("train_data") or exp.get("sweep"):
            raise ConfigError(f"{path}.continual", c, "cannot be combined with train_data or sweep")
    if exp.get("transfer") is not None:
        _validate_transfer(exp, f"{path}.transfer", ctx)


def _validate_train_data(t, path) -> None:
    """A derived training set (label-noise subset, k-class subset) drawn per repeat."""
    _mapping(t, path)
    kind = _choice(t.get("kind"), f"{path}.kind", list(TRAIN_DATA_KINDS))
    _keys(t, {"kind": True, **TRAIN_DATA_KINDS[kind]}, path)
    if kind == "noisy_subset":
        _int(t["size"], f"{path}.size", 1)
        f = t["flip_fraction"]
        if not _is_num(f) or not 0 <= f <= 1:
            raise ConfigError(f"{path}.flip_fraction", f, "must be a number in [0, 1]")
    else:
        _int(t["k"], f"{path}.k", 2)
        if "per_class" in t:
            _int(t["per_class"], f"{path}.per_class", 1)


def _validate_sweep(sw, exp, path) -> None:
    """One parameter varied over values, every rule and seed run at each value."""
    _mapping(sw, path)
    _keys(sw, {"param": True, "values": True}, path)
    param = sw["param"]
    head, _, key = param.partition(".options.") if param.startswith("model.") else param.partition(".")
    if param.startswith("model.options."):
        from bpfree.models import model_options
        valid = sorted(model_options(exp["model"]["name"]))
        if key not in valid:
            raise ConfigError(f"{path}.param", param, f"not an option of model {exp['model']['name']!r}",
                              [f"model.options.{k}" for k in valid])
    elif param.startswith("rule.options."):
        from bpfree.rules import get_rule_class
        option = param[len("rule.options."):]
        for rule in exp.get("rules") or {}:
            valid = sorted(get_rule_class(rule).defaults)
            if option not in valid:
                raise ConfigError(f"{path}.param", param, f"not an option of rule {rule!r} (a rule-option "
                                  "sweep needs every rule of the experiment to take it)",
                                  [f"rule.options.{k}" for k in valid])
    elif head == "train_data" and exp.get("train_data"):
        valid = sorted(TRAIN_DATA_KINDS[exp["train_data"]["kind"]])
        if key not in valid:
            raise ConfigError(f"{path}.param", param, "not a train_data option",
                              [f"train_data.{k}" for k in valid])
    else:
        raise ConfigError(f"{path}.param", param, "a sweep varies a model option, a rule option or a "
                          "train_data option", ["model.options.<option>", "rule.options.<option>",
                                                "train_data.<option>"])
    _sweep_values(sw["values"], f"{path}.values")


def _sweep_values(v, path) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(path, v, "must be a non-empty list")
    for i, x in enumerate(v):
        if not (_is_num(x) or isinstance(x, str)):
            raise ConfigError(f"{path}[{i}]", x, "sweep values are numbers or names")
    if len(set(map(str, v))) != len(v):
        raise ConfigError(path, v, "sweep values must be unique")
    return v


DATASET_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "tiny_imagenet": 200,
                   "cub200": 200}


def _validate_transfer(exp: dict, path: str, ctx: dict) -> None:
    """Pre-training on source classes of the same dataset, or published weights (`pretrained`)."""
    from bpfree.data.weights import PRETRAINED

    t = _mapping(exp["transfer"], path)
    _keys(t, {"source_classes": False, "pretrained": False, "target_classes": True,
              "source_epochs": False, "source_rule": False}, path)
    n = DATASET_CLASSES.get(exp["dataset"])
    if n is None:
        raise ConfigError(f"{path}", exp["dataset"], "transfer needs an image classification dataset",
                          sorted(DATASET_CLASSES))
    if ("source_classes" in t) == ("pretrained" in t):
        raise ConfigError(path, t, "needs exactly one of source_classes (pre-train here) or pretrained")
    if "pretrained" in t:
        _choice(t["pretrained"], f"{path}.pretrained", sorted(PRETRAINED))
        weights = PRETRAINED[t["pretrained"]]
        if exp["model"]["name"] != weights.model:
            raise ConfigError(f"{path}.pretrained", t["pretrained"],
                              f"holds {weights.model} weights but the model is {exp['model']['name']}")
        for key in ("source_epochs", "source_rule"):
            if key in t:
                raise ConfigError(f"{path}.{key}", t[key], "only applies to source_classes pre-training")
    lists = ("source_classes", "target_classes") if "source_classes" in t else ("target_classes",)
    for key in lists:
        v = t[key]
        if key == "target_classes" and v == "all":
            continue
        if not isinstance(v, list) or len(v) < 2 or len(set(v)) != len(v):
            raise ConfigError(f"{path}.{key}", v, "must be 'all' or a list of at least 2 distinct class "
                              "indices" if key == "target_classes" else
                              "must be a list of at least 2 distinct class indices")
        for i, c in enumerate(v):
            _int(c, f"{path}.{key}[{i}]", 0)
            if c >= n:
                raise ConfigError(f"{path}.{key}[{i}]", c, f"{exp['dataset']} has classes 0..{n - 1}")
    if "source_classes" in t:
        target = range(n) if t["target_classes"] == "all" else t["target_classes"]
        if set(t["source_classes"]) & set(target):
            raise ConfigError(f"{path}.target_classes", t["target_classes"], "must not overlap source_classes")
        if "source_epochs" not in t:
            raise ConfigError(f"{path}.source_epochs", None, "pre-training on source_classes needs it")
        _int(t["source_epochs"], f"{path}.source_epochs", 1)
        _choice(t.get("source_rule", "bp"), f"{path}.source_rule", ctx["rules"])
    for other in ("continual", "train_data", "sweep"):
        if exp.get(other):
            raise ConfigError(path, t, f"cannot be combined with {other}")


def _validate_tuning(t, path) -> None:
    """The lr grid searched on the validation split by `python -m stages.tune`."""
    _mapping(t, path)
    _keys(t, {"lrs": True, "epochs": True, "seed": False, "at": False}, path)
    if not isinstance(t["lrs"], list) or not t["lrs"]:
        raise ConfigError(f"{path}.lrs", t["lrs"], "must be a non-empty list of learning rates")
    for i, lr in enumerate(t["lrs"]):
        _positive(lr, f"{path}.lrs[{i}]")
    _int(t["epochs"], f"{path}.epochs", 1)
    _int(t.get("seed", 0), f"{path}.seed", 0)


def _validate_override(o, path) -> None:
    o = {} if o is None else o
    _mapping(o, path)
    for key in o:
        if key not in PROFILE_KEYS:
            raise ConfigError(f"{path}.{key}", o[key], "unknown profile key", PROFILE_KEYS)
    if "epochs" in o:
        _int(o["epochs"], f"{path}.epochs", 1)
    if "milestones" in o:
        _milestones(o["milestones"], f"{path}.milestones")
    if "seeds" in o:
        _seeds(o["seeds"], f"{path}.seeds")
    for key in ("train_subset", "test_subset", "batch_size", "threads"):
        if o.get(key) is not None:
            _int(o[key], f"{path}.{key}", 1)
    if "val_size" in o:
        _int(o["val_size"], f"{path}.val_size", 0)
    if "diagnostics_every" in o:
        _int(o["diagnostics_every"], f"{path}.diagnostics_every", 0)
    if "device" in o:
        _choice(o["device"], f"{path}.device", DEVICES)
    if "log_every" in o:
        _int(o["log_every"], f"{path}.log_every", 1)
    if "sweep_values" in o:
        _sweep_values(o["sweep_values"], f"{path}.sweep_values")
    if "rules" in o and (not isinstance(o["rules"], list) or not o["rules"]
                         or not all(isinstance(r, str) for r in o["rules"])):
        raise ConfigError(f"{path}.rules", o["rules"], "must be a non-empty list of the experiment's rule names")
    for key in ("train_data", "model_options", "pruning"):  # merged into the experiment's own
        if key in o:
            _mapping(o[key], f"{path}.{key}")
    if "speed" in o:
        speed = _mapping(o["speed"], f"{path}.speed")
        _keys(speed, {key: False for key in SPEED_DEFAULTS}, f"{path}.speed")
        if "precision" in speed:
            _choice(speed["precision"], f"{path}.speed.precision", PRECISIONS)
        for key in ("compile", "channels_last"):
            if key in speed:
                _bool(speed[key], f"{path}.speed.{key}")
    if "deterministic" in o:
        _bool(o["deterministic"], f"{path}.deterministic")
    if "skip" in o and not (isinstance(o["skip"], str) and o["skip"].strip()):
        raise ConfigError(f"{path}.skip", o["skip"], "must be the reason this profile does not run it")


def _validate_data_variants(variants: Any, datasets: list[str]) -> None:
    """Each prepared dataset names the pinned raw release (bpfree/data/checksums.json) it is
    made from: a dependency of its prepare stage, so other raw data re-runs it, or stops."""
    from bpfree.data.checksums import load_pins
    _mapping(variants, "data_variants")
    for name in datasets:
        if name not in variants:
            raise ConfigError(f"data_variants.{name}", None, "every dataset names the raw release it is "
                              "prepared from", sorted(load_pins().get(name, {}).get("variants", {})))
        _choice(variants[name], f"data_variants.{name}", sorted(load_pins().get(name, {}).get("variants", {})))


def validate_params(params: Any) -> dict:
    """Check the whole params tree, and every (experiment, profile) combination resolved."""
    _mapping(params, "params")
    if "profile" in params:
        raise ConfigError("profile", params["profile"], "params.yaml does not choose the profile: `dvc repro` "
                          "runs smoke, `dvc repro pipelines/<profile>/dvc.yaml` another (or `bpfree repro "
                          "--profile <profile>`); remove the key")
    _keys(params, TOP_KEYS, "params")
    ctx = {"rules": known_rules(), "models": known_models()}
    all_datasets = known_datasets()
    datasets = params["datasets"]
    if not isinstance(datasets, list) or not datasets:
        raise ConfigError("datasets", datasets, "must be a non-empty list", all_datasets)
    for i, d in enumerate(datasets):
        _choice(d, f"datasets[{i}]", all_datasets)
    optional = params.get("optional_datasets") or []
    if not isinstance(optional, list):
        raise ConfigError("optional_datasets", optional, "must be a list", all_datasets)
    for i, d in enumerate(optional):
        _choice(d, f"optional_datasets[{i}]", all_datasets)
        if d in datasets:
            raise ConfigError(f"optional_datasets[{i}]", d, "is already in datasets")
    # An experiment may only use a dataset a prepare stage makes.
    ctx["datasets"] = datasets + optional
    _validate_data_variants(params["data_variants"], ctx["datasets"])

    experiments = _mapping(params["experiments"], "experiments")
    if not experiments:
        raise ConfigError("experiments", experiments, "needs at least one experiment")
    for exp_id, exp in experiments.items():
        if not isinstance(exp_id, str) or not exp_id.replace("_", "").isalnum():
            raise ConfigError(f"experiments.{exp_id}", exp_id, "id must be letters, digits and _")
        _validate_experiment(exp, f"experiments.{exp_id}", ctx)

    profiles = _mapping(params["profiles"], "profiles")
    if not profiles:
        raise ConfigError("profiles", profiles, "needs at least one profile")
    _choice(DEFAULT_PROFILE, "profiles (the default profile)", list(profiles))
    if DEFAULTS in experiments:
        raise ConfigError(f"experiments.{DEFAULTS}", None, f"{DEFAULTS!r} names a profile's defaults; rename it")
    for pname, pdef in profiles.items():
        _mapping(pdef, f"profiles.{pname}")
        defaults = pdef.get(DEFAULTS) or {}
        _validate_override(defaults, f"profiles.{pname}.{DEFAULTS}")
        for key in defaults:
            _choice(key, f"profiles.{pname}.{DEFAULTS}.{key}", PROFILE_DEFAULT_KEYS)
        for exp_id in experiments:
            if exp_id not in pdef:
                raise ConfigError(f"profiles.{pname}.{exp_id}", None,
                                  "every profile must say how to run every experiment "
                                  "({} = the full protocol with the profile's defaults)")
        for exp_id, override in pdef.items():
            if exp_id == DEFAULTS:
                continue
            _choice(exp_id, f"profiles.{pname}.{exp_id}", list(experiments))
            _validate_override(override, f"profiles.{pname}.{exp_id}")
            _check_resolved(resolve_experiment(params, exp_id, pname), f"profiles.{pname}.{exp_id}")
    return params


def _check_resolved(exp: dict, path: str) -> None:
    """Cross-field checks that only make sense once a profile's overrides are applied."""
    from bpfree.models import model_options
    valid = model_options(exp["model"]["name"])
    for key, value in exp["model"]["options"].items():
        if key not in valid:
            raise ConfigError(f"{path}.model_options.{key}", value,
                              f"unknown option of model {exp['model']['name']!r}", sorted(valid))
    epochs = exp["epochs"]
    for m in exp["schedule"].get("milestones", []) if exp["schedule"]["name"] == "multistep" else []:
        if m > epochs:
            raise ConfigError(f"{path}.milestones", exp["schedule"]["milestones"],
                              f"milestone beyond the {epochs} epochs of this profile")
    if exp["selection"] == "best_val" and exp["val_size"] <= 0:
        raise ConfigError(f"{path}.val_size", exp["val_size"],
                          "selection best_val needs a validation split (val_size > 0)")
    if exp.get("train_data"):
        _validate_train_data(exp["train_data"], f"{path}.train_data")
        if exp["train_data"]["kind"] == "noisy_subset" and exp["train_subset"] is not None \
                and exp["train_data"]["size"] > exp["train_subset"]:
            raise ConfigError(f"{path}.train_data.size", exp["train_data"]["size"],
                              f"larger than train_subset ({exp['train_subset']})")
    sub = exp.get("train_subset")
    if sub is not None and exp["val_size"] >= sub:
        raise ConfigError(f"{path}.val_size", exp["val_size"],
                          f"must be smaller than train_subset ({sub})")


# ----------------------------------------------------------------------------- resolution
class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (plain YAML keeps the last).

    Merge keys (`<<: *block`) stay allowed: keys the mapping names itself override the block's,
    as in plain YAML; only a key written twice by hand is an error.
    """

    def construct_document(self, node):
        self._refuse_duplicate_keys(node, set())  # on the written tree, before merges flatten it
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node, visited: set) -> None:
        if id(node) in visited:  # an alias: checked where its anchor is
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, value_node in node.value:
                if key_node.tag != "tag:yaml.org,2002:merge":  # `<<: *block`: own keys override it
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (YAML would silently keep the last one)",
                            key_node.start_mark)
                    seen.add(key)
                self._refuse_duplicate_keys(value_node, visited)
        elif isinstance(node, yaml.SequenceNode):
            for child in node.value:
                self._refuse_duplicate_keys(child, visited)


def _unshared(tree):
    """The same tree with no object reachable twice. An alias or a merged block is one shared
    object in what PyYAML returns, so an edit to one experiment would reach another."""
    if isinstance(tree, dict):
        return {k: _unshared(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unshared(v) for v in tree]
    return tree


def load_yaml(path: str | os.PathLike):
    """A YAML file's contents; errors name the file and line (not "<unicode string>")."""
    p = Path(path)
    try:
        with open(p) as fh:  # a named stream: the error marks say 'in "params.yaml", line N'
            return _unshared(yaml.load(fh, Loader=UniqueKeyLoader))
    except FileNotFoundError:
        raise ConfigError(str(p), None, "file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), None, f"not valid YAML: {' '.join(str(exc).split())}") from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> dict:
    """Read and validate params.yaml; the only entry point stages use."""
    return validate_params(load_yaml(path))


def experiment_notes(path: str | os.PathLike = NOTES_FILE) -> dict[str, str]:
    """experiment id -> what it reproduces and from which sources (prose; not hashed)."""
    with open(path) as fh:
        notes = yaml.safe_load(fh) or {}
    return {k: " ".join(str(v).split()) for k, v in notes.items()}


def profile_override(params: dict, profile: str, exp_id: str) -> dict:
    """How a profile runs one experiment: its defaults, under the experiment's own entry."""
    pdef = params["profiles"][profile]
    return copy.deepcopy({**(pdef.get(DEFAULTS) or {}), **(pdef.get(exp_id) or {})})


def resolve_experiment(params: dict, exp_id: str, profile: str | None = None) -> dict:
    """The experiment as this profile runs it: base protocol with the profile's overrides."""
    profile = DEFAULT_PROFILE if profile is None else profile
    if exp_id not in params["experiments"]:
        raise ConfigError("experiment", exp_id, "unknown experiment", list(params["experiments"]))
    exp = copy.deepcopy(params["experiments"][exp_id])
    override = profile_override(params, profile, exp_id)
    path = f"profiles.{profile}.{exp_id}"
    deviations: list[str] = []  # what makes this profile's run shorter than the protocol, in words
    _apply_budget(exp, override, deviations, path)
    _apply_runtime(exp, override)
    _apply_scope(exp, override, deviations, path)
    exp["optimizer"] = {"momentum": 0.0, "weight_decay": 0.0, "nesterov": False, **exp["optimizer"]}
    if exp["schedule"]["name"] == "multistep":
        exp["schedule"].setdefault("gamma", 0.1)
    exp["id"] = exp_id
    exp["profile"] = profile
    exp["deviations"] = deviations
    exp["shortened"] = bool(deviations)
    return exp


def _apply_budget(exp: dict, override: dict, deviations: list[str], path: str) -> None:
    """Epochs, seeds, validation size, batch, lr milestones and data subsets."""
    for key in ("epochs", "seeds", "val_size", "batch_size"):
        if key in override and override[key] != exp[key]:
            if key == "seeds" and len(exp[key]) > 6:
                deviations.append(f"{len(override[key])} seeds (protocol {len(exp[key])})")
            else:
                deviations.append(f"{key} {override[key]} (protocol {exp[key]})")
            exp[key] = override[key]
    if "milestones" in override:
        if exp["schedule"]["name"] != "multistep":
            raise ConfigError(f"{path}.milestones", override["milestones"],
                              "the experiment's schedule has no milestones")
        if override["milestones"] != exp["schedule"]["milestones"]:
            deviations.append(f"milestones {override['milestones']} (protocol {exp['schedule']['milestones']})")
        exp["schedule"]["milestones"] = override["milestones"]
    exp["train_subset"] = override.get("train_subset")
    exp["test_subset"] = override.get("test_subset")
    if exp["train_subset"] is not None:
        deviations.append(f"train subset {exp['train_subset']} images")
    if exp["test_subset"] is not None:
        deviations.append(f"test subset {exp['test_subset']} images")


def _apply_runtime(exp: dict, override: dict) -> None:
    """How the runs execute (threads, device, speed, determinism) and the keys' defaults."""
    exp["threads"] = override.get("threads")
    exp["device"] = override.get("device", "auto")
    exp.setdefault("preprocess", {})
    exp["preprocess"] = {"normalize": True, "resize": None, **(exp["preprocess"] or {})}
    diag = {"every": 0, "batch": 256, **(exp.get("diagnostics") or {})}
    if "diagnostics_every" in override:
        diag["every"] = override["diagnostics_every"]
    exp["diagnostics"] = diag
    exp["data_seed"] = exp.get("data_seed", 0)
    # Keys below are set only when used, so configs (and hashes) of experiments that do not
    # use them are exactly what they were before the keys existed.
    if "log_every" in override or "log_every" in exp:
        exp["log_every"] = override.get("log_every", exp.get("log_every", 1))
    if override.get("speed"):
        exp["speed"] = {**SPEED_DEFAULTS, **override["speed"]}
    if "deterministic" in override:  # absent: deterministic algorithms, warn-only (training.set_determinism)
        exp["deterministic"] = override["deterministic"]


def _apply_scope(exp: dict, override: dict, deviations: list[str], path: str) -> None:
    """What is trained: derived training set, sweep points, rules, pruning and model options."""
    if exp.get("train_data"):
        merged = {**exp["train_data"], **(override.get("train_data") or {})}
        if merged != exp["train_data"]:
            deviations.append(f"train_data {merged} (protocol {exp['train_data']})")
        exp["train_data"] = merged
    elif override.get("train_data"):
        raise ConfigError(f"{path}.train_data", override["train_data"], "the experiment has no train_data to override")
    if exp.get("sweep"):
        values = override.get("sweep_values", exp["sweep"]["values"])
        if values != exp["sweep"]["values"]:
            deviations.append(f"{exp['sweep']['param']} in {values} (protocol {exp['sweep']['values']})")
        exp["sweep"] = {"param": exp["sweep"]["param"], "values": values}
    elif "sweep_values" in override:
        raise ConfigError(f"{path}.sweep_values", override["sweep_values"], "the experiment has no sweep")
    if "rules" in override:  # a profile may run a subset of the rules (a cheaper budget)
        unknown = [r for r in override["rules"] if r not in exp["rules"]]
        if unknown:
            raise ConfigError(f"{path}.rules", override["rules"], f"not rules of the experiment: {unknown}",
                              list(exp["rules"]))
        if list(override["rules"]) != list(exp["rules"]):
            deviations.append(f"rules {list(override['rules'])} (protocol {list(exp['rules'])})")
        exp["rules"] = {r: exp["rules"][r] for r in override["rules"]}
    exp["skip"] = override.get("skip")
    if override.get("pruning"):
        if not exp.get("pruning"):
            raise ConfigError(f"{path}.pruning", override["pruning"],
                              "the experiment has no pruning evaluation to override")
        exp["pruning"] = {**exp["pruning"], **override["pruning"]}
    exp["model"].setdefault("options", {})
    exp["model"]["options"] = exp["model"]["options"] or {}
    if override.get("model_options"):
        merged = {**exp["model"]["options"], **override["model_options"]}
        if merged != exp["model"]["options"]:
            deviations.append(f"model options {override['model_options']} (protocol "
                              f"{ {k: exp['model']['options'].get(k) for k in override['model_options']} })")
        exp["model"]["options"] = merged


TUNED = "tuned"
TUNING_DIR = Path("results/tuning")


def tuned_lr(exp_id: str, rule: str, tuning_dir: Path = TUNING_DIR) -> float:
    """The lr that `python -m stages.tune` chose on the validation split (lr: tuned)."""
    path = tuning_dir / exp_id / f"{rule}.json"
    field = f"experiments.{exp_id}.rules.{rule}.lr"
    try:
        chosen = json.loads(path.read_text())["chosen_lr"]
    except (OSError, ValueError, KeyError):
        raise ConfigError(field, TUNED, f"no tuning result at {path}; run "
                          f"`python -m stages.tune {exp_id} --rules {rule}` first") from None
    if chosen is None:
        raise ConfigError(field, TUNED, f"every lr in {path} diverged; widen the grid")
    return float(chosen)


def sweep_label(param: str) -> str:
    """Short name of a swept parameter for run ids and tables: model.options.width -> width."""
    return param.rsplit(".", 1)[-1]


def _set_path(run: dict, dotted: str, value) -> None:
    node = run
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def run_configs(params: dict, exp_id: str, profile: str | None = None) -> list[dict]:
    """Every (seed, sweep value, rule) run of an experiment, fully resolved.

    Ordered repeat by repeat, so an interrupted long sweep leaves whole repeats behind. A
    derived training set (train_data) is drawn from the run's seed: a new draw per repeat,
    the same draw for every rule and sweep value of that repeat.
    """
    exp = resolve_experiment(params, exp_id, profile)
    # a profile's batch_size (a small smoke set) wins over a rule's own batch
    profile_batch = "batch_size" in profile_override(params, DEFAULT_PROFILE if profile is None else profile, exp_id)
    sweep = exp.get("sweep")
    points = [(None, None)] if not sweep else [(sweep["param"], v) for v in sweep["values"]]
    runs = []
    for seed in exp["seeds"]:
        for param, value in points:
            for rule, spec in exp["rules"].items():
                spec = spec or {}
                run = {k: copy.deepcopy(v) for k, v in exp.items()
                       if k not in ("rules", "seeds", "tuning", "sweep", "skip")}
                run["rule"] = {"name": rule, "options": dict(spec.get("options") or {})}
                if "batch_size" in spec and not profile_batch:
                    run["batch_size"] = int(spec["batch_size"])
                lr = spec.get("lr", exp["optimizer"]["lr"])
                if isinstance(lr, dict):
                    if value not in lr:
                        raise ConfigError(f"experiments.{exp_id}.rules.{rule}.lr", lr,
                                          f"no lr for sweep value {value!r}")
                    lr = lr[value]
                run["optimizer"]["lr"] = tuned_lr(exp_id, rule) if lr == TUNED else float(lr)
                run["lr_source"] = f"results/tuning/{exp_id}/{rule}.json" if lr == TUNED else "params.yaml"
                run["seed"] = seed
                run["run_id"] = f"{rule}_seed{seed}"
                if run.get("train_data"):
                    run["train_data"]["seed"] = seed
                if param is not None:
                    _set_path(run, param, value)
                    run["sweep"] = {"param": param, "value": value}
                    run["run_id"] = f"{rule}_{sweep_label(param)}{value}_seed{seed}"
                runs.append(run)
    if not sweep:  # historical order (rule-major) for experiments without a sweep
        runs.sort(key=lambda r: list(exp["rules"]).index(r["rule"]["name"]))
    return runs


def run_specs(params: dict, exp_id: str, profile: str | None = None) -> list:
    """run_configs as typed, frozen RunSpecs (bpfree.spec)."""
    from bpfree.spec import RunSpec
    return [RunSpec.from_dict(run, f"{exp_id}/{run['run_id']}") for run in run_configs(params, exp_id, profile)]


# Fields that do not change what a run computes, so they must not change its hash.
HASH_EXCLUDED = ("notes", "deviations", "shortened")


def config_hash(run: dict, data_hash: str | None = None) -> str:
    """Identity of a run's computation: same hash => its metrics.json can be reused."""
    payload = {k: v for k, v in run.items() if k not in HASH_EXCLUDED}
    payload["data_hash"] = data_hash
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
