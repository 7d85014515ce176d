"""Transfer with sign preservation (LFP paper, claims.md E5): pre-train, swap the head, fine-tune.

Protocol: the run seed fixes one pre-training (gradient descent on the source classes), or
published weights are loaded (ImageNet ResNet-18 for CUB), so every fine-tuning rule of a
seed starts from the same weights; the output layer is replaced
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

from bpfree.continual import task_images, train_task
from bpfree.models import build_model
from bpfree.pruning import sign_flip_fraction
from bpfree.record import STATUS_DIVERGED, STATUS_OK, RunRecord, final_selection
from bpfree.rules import apply_rule
from bpfree.spec import RunSpec, as_run_spec
from bpfree.training import DeviceSplits, batch_generators, evaluate_split, seed_everything, set_determinism


def limit_images(images: DeviceSplits, train: int | None, test: int | None, seed: int) -> DeviceSplits:
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


def target_classes(spec: dict, num_classes: int) -> list[int]:
    return list(range(num_classes)) if spec["target_classes"] == "all" else list(spec["target_classes"])


def pretrained_model(run: RunSpec, device) -> nn.Module:
    """The run's model holding published pre-trained weights (loaded strictly: every key)."""
    from bpfree.data.weights import PRETRAINED, load_pretrained_state

    weights = PRETRAINED[run.transfer["pretrained"]]
    model = build_model(weights.model, num_classes=weights.num_classes,
                        **{**run.model.options, **weights.model_options})
    model.load_state_dict(load_pretrained_state(weights.name), strict=True)
    return model.to(device)


def train_transfer(run: RunSpec | dict, data, device, *, log=None) -> dict:
    """Pre-train with `source_rule` (or load published weights), swap the head, fine-tune."""
    wall0 = time.perf_counter()
    device = torch.device(device)
    run = as_run_spec(run)
    determinism = set_determinism(run.threads, run.deterministic_kernels)
    seed = int(run.seed)
    spec = run.transfer
    classes = {"target": target_classes(spec, int(data.num_classes))}
    if spec.get("source_classes"):
        classes["source"] = list(spec["source_classes"])
    images = {key: limit_images(task_images(data, cls, seed, device, run.preprocess.resize),
                                run.train_subset, run.test_subset, seed)
              for key, cls in classes.items()}
    target = images["target"]
    order_gen, augment_gen = batch_generators(run, device)
    history, diverged, source_acc = [], None, None
    if "source" in images:
        source = images["source"]
        seed_everything(seed)
        model = build_model(run.model.name, num_classes=len(classes["source"]), **run.model.options).to(device)
        pre = apply_rule(model, spec.get("source_rule", "bp"))
        history, diverged = train_task(model, pre, source, run, order_gen, augment_gen, task=1,
                                       epochs=int(spec["source_epochs"]))
        pre.remove()
        if diverged is None:
            source_acc = evaluate_split(model, source, source.x_test, source.y_test)[0]
            if log:
                log(f"  pre-trained on {classes['source']}: test {source_acc:.2f}%")
    else:
        model = pretrained_model(run, device)
        if log:
            log(f"  loaded pre-trained weights {spec['pretrained']}")
    head = replace_output_layer(model, len(classes["target"]), seed + 2)
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(head + ".")}

    final, counts, scalars = None, {}, {}
    if diverged is None:
        handle = apply_rule(model, run.rule.name, **run.rule.options)
        entries, diverged = train_task(model, handle, target, run, order_gen, augment_gen, task=2)
        history += entries
        counts = dict(handle.counts)
        handle.remove()
    status = STATUS_OK if diverged is None else STATUS_DIVERGED
    if status == STATUS_OK:
        final = evaluate_split(model, target, target.x_test, target.y_test)[0]
        after = {k: v.detach() for k, v in model.state_dict().items() if k in before}
        scalars = {"sign_flip_pct": 100.0 * sign_flip_fraction(before, after)}
        if source_acc is not None:
            scalars["source_test_acc_pct"] = source_acc
        if log:
            log(f"  fine-tuned on {len(classes['target'])} classes: test {final:.2f}%, "
                f"{scalars['sign_flip_pct']:.2f}% of pre-trained weights flipped sign")
    return RunRecord(
        run=run.to_dict(), status=status, diverged_epoch=diverged, history=history, selection=final_selection(final),
        sizes={name: {"train": len(t.y_train), "val": len(t.y_val), "test": len(t.y_test)}
               for name, t in images.items()},
        wall_time_s=time.perf_counter() - wall0, determinism=determinism, converted_layers=counts,
        protocol={"transfer": {"source_classes": classes.get("source"), "pretrained": spec.get("pretrained"),
                               "target_classes": classes["target"], "replaced_head": head},
                  "scalars": scalars},
    ).to_json(getattr(data, "manifest", {}) or {}, device)
