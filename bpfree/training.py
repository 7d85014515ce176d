"""One trainer for every rule, model and dataset.

Why one generic loop: the causes of failed reproductions in this field are mostly loop
details (scheduler stepped per batch, a "validation" split that is the test set, seeds
drawn before seeding). Writing those details once, for every rule, removes them as a
variable: a difference between two rules' numbers is then the rules' difference.

Data stays on the device as tensors; batches are index slices of a seeded randperm drawn
from a dedicated generator, so the batch order depends on the run seed alone.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# cuBLAS needs this before the first CUDA call to be deterministic; harmless on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch
import torch.nn.functional as F
from torch import nn

from bpfree.data import train_val_split
from bpfree.metrics import alignment_report
from bpfree.models import build_model
from bpfree.provenance import environment_info, git_info
from bpfree.rules import apply_rule

EVAL_BATCH = 1000
WARMUP_STEPS = 5
STATUS_OK = "OK"
STATUS_DIVERGED = "DIVERGED"


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile asks for device 'cuda' but no CUDA device is available")
    return torch.device(name)


def set_determinism(threads: int | None) -> None:
    """Same seed, same numbers: deterministic kernels, fixed thread count on CPU."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    if threads:
        torch.set_num_threads(int(threads))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device


@dataclass
class DeviceImages:
    """Train/val/test images of one run, already on the device, normalised per batch.

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

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
        return (x - self.mean) / self.std if self.normalize else x


def _as_index(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.long)


def device_images(data, run: dict, device: torch.device) -> DeviceImages:
    """Cut the run's subsets out of the prepared tensors and resize them once, on device."""
    gen = torch.Generator().manual_seed(int(run["data_seed"]))
    n_train, n_test = len(data.y_train), len(data.y_test)
    pool = torch.arange(n_train)
    if run.get("train_subset") is not None:
        if run["train_subset"] > n_train:
            raise ValueError(f"train_subset {run['train_subset']} > {n_train} training images")
        pool = torch.randperm(n_train, generator=gen)[: run["train_subset"]].sort().values
    test_idx = torch.arange(n_test)
    if run.get("test_subset") is not None:
        if run["test_subset"] > n_test:
            raise ValueError(f"test_subset {run['test_subset']} > {n_test} test images")
        test_idx = torch.randperm(n_test, generator=gen)[: run["test_subset"]].sort().values
    if run["val_size"] > 0:
        tr, va = train_val_split(len(pool), run["val_size"], run["data_seed"])
        tr_idx, va_idx = pool[_as_index(tr)], pool[_as_index(va)]
    else:
        tr_idx, va_idx = pool, pool[:0]

    def take(x, idx):
        return x[idx.to(x.device)].to(device)

    x_tr, x_va, x_te = take(data.x_train, tr_idx), take(data.x_train, va_idx), take(data.x_test, test_idx)
    resize = run["preprocess"].get("resize")
    if resize:
        # Bilinear resize once, in float [0, 1]; per-batch work is then only the normalisation.
        def rs(x):
            if x.shape[-1] == resize and x.shape[-2] == resize:
                return x
            return F.interpolate(x.float().div(255.0), size=(resize, resize), mode="bilinear",
                                 align_corners=False)
        x_tr, x_va, x_te = rs(x_tr), rs(x_va), rs(x_te)
    channels = x_tr.shape[1]
    mean = torch.as_tensor(data.mean, dtype=torch.float32, device=device).reshape(1, channels, 1, 1)
    std = torch.as_tensor(data.std, dtype=torch.float32, device=device).reshape(1, channels, 1, 1)
    return DeviceImages(
        x_tr, take(data.y_train, tr_idx), x_va, take(data.y_train, va_idx), x_te,
        take(data.y_test, test_idx), mean, std, bool(run["preprocess"].get("normalize", True)),
        int(data.num_classes),
    )


def build_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    if cfg["name"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg.get("momentum", 0.0),
                               weight_decay=cfg.get("weight_decay", 0.0),
                               nesterov=cfg.get("nesterov", False))
    if cfg["name"] == "adam":
        betas = tuple(cfg.get("betas", (0.9, 0.999)))
        return torch.optim.Adam(params, lr=cfg["lr"], betas=betas,
                                weight_decay=cfg.get("weight_decay", 0.0))
    raise ValueError(f"unknown optimizer {cfg['name']!r}")


def build_scheduler(optimizer, cfg: dict):
    """Stepped once per EPOCH by the trainer (stepping per batch is a classic reproduction bug)."""
    if cfg["name"] == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg["milestones"],
                                                    gamma=cfg.get("gamma", 0.1))
    return None


@torch.no_grad()
def accuracy(model: nn.Module, images: DeviceImages, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Top-1 accuracy in percent; None for an empty split."""
    if len(y) == 0:
        return None
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=y.device)
    for i in range(0, len(y), EVAL_BATCH):
        out = model(images.prepare(x[i:i + EVAL_BATCH]))
        correct += (out.argmax(1) == y[i:i + EVAL_BATCH]).sum()
    model.train(was_training)
    return 100.0 * correct.item() / len(y)


class _StepTimer:
    """Per-step wall time; CUDA events on GPU so that asynchronous kernels are counted."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
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


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


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


def train_run(run: dict, data, device, *, checkpoint_path: str | os.PathLike | None = None,
              log: Callable[[str], None] | None = None) -> dict:
    """Train one (experiment, rule, seed) run and return its metrics dict.

    A non-finite training loss ends the run with status DIVERGED instead of raising, so the
    rest of the pipeline (other rules, other seeds, tables) still runs.
    """
    from bpfree.provenance import atomic_torch_save

    wall0 = time.perf_counter()
    device = torch.device(device) if not isinstance(device, torch.device) else device
    set_determinism(run.get("threads"))
    seed = int(run["seed"])
    images = device_images(data, run, device)

    seed_everything(seed)  # before the model and the rule: both draw random numbers
    model = build_model(run["model"]["name"], num_classes=images.num_classes,
                        **run["model"]["options"]).to(device)
    handle = apply_rule(model, run["rule"]["name"], **run["rule"]["options"])
    optimizer = build_optimizer(model.parameters(), run["optimizer"])  # after apply_rule: KP adds B
    scheduler = build_scheduler(optimizer, run["schedule"])
    order_gen = torch.Generator().manual_seed(seed)

    diag_cfg = run.get("diagnostics") or {}
    diag_every = int(diag_cfg.get("every", 0) or 0)
    diag_x = images.prepare(images.x_train[: diag_cfg.get("batch", 256)]) if diag_every else None
    diag_y = images.y_train[: diag_cfg.get("batch", 256)] if diag_every else None
    diagnostics = []

    def diagnose(epoch):
        report = alignment_report(model, handle, F.cross_entropy, diag_x, diag_y)
        diagnostics.append({"epoch": epoch, **report})

    if diag_every:
        diagnose(0)

    n = len(images.y_train)
    bs = int(run["batch_size"])
    timer = _StepTimer(device)
    history: list[dict] = []
    status, diverged_epoch = STATUS_OK, None
    model.train()
    for epoch in range(1, int(run["epochs"]) + 1):
        perm = torch.randperm(n, generator=order_gen).to(device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        lr = optimizer.param_groups[0]["lr"]
        steps = (n + bs - 1) // bs
        warmup = min(WARMUP_STEPS, steps // 2) if epoch == 1 else 0
        for step, i in enumerate(range(0, n, bs)):
            token = timer.start()
            idx = perm[i:i + bs]
            xb, yb = images.prepare(images.x_train[idx]), images.y_train[idx]
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            loss.backward()
            optimizer.step()
            handle.after_step()
            loss_sum += loss.detach().double() * len(idx)
            correct += (out.detach().argmax(1) == yb).sum()
            timer.stop(token, keep=step >= warmup)
        train_loss = (loss_sum / n).item()
        if not math.isfinite(train_loss):
            status, diverged_epoch = STATUS_DIVERGED, epoch
            if log:
                log(f"  epoch {epoch}: training loss {train_loss}, run DIVERGED")
            break
        record = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": 100.0 * correct.item() / n,
            "val_acc": accuracy(model, images, images.x_val, images.y_val),
            "test_acc": accuracy(model, images, images.x_test, images.y_test),
        }
        history.append(record)
        if scheduler is not None:
            scheduler.step()
        if diag_every and epoch % diag_every == 0:
            diagnose(epoch)
        if log:
            log(f"  epoch {epoch}: loss {train_loss:.4f} train {record['train_acc']:.2f}% "
                f"val {record['val_acc'] if record['val_acc'] is not None else '-'} "
                f"test {record['test_acc']:.2f}%")

    step_ms = timer.mean_ms()
    checkpoint = None
    if checkpoint_path is not None and status == STATUS_OK:
        atomic_torch_save(checkpoint_path, {
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model": run["model"]["name"], "rule": run["rule"]["name"], "seed": seed,
            "final_test_acc": history[-1]["test_acc"] if history else None,
        })
        checkpoint = str(checkpoint_path)
    counts = dict(handle.counts)
    handle.remove()
    manifest = getattr(data, "manifest", {}) or {}
    return _json_safe({
        "status": status,
        "diverged_epoch": diverged_epoch,
        "history": history,
        **_select(history, run["selection"]),
        "epochs_completed": len(history),
        "sizes": {"train": n, "val": len(images.y_val), "test": len(images.y_test)},
        "mean_step_ms": step_ms,
        "wall_time_s": time.perf_counter() - wall0,
        "converted_layers": counts,
        "diagnostics": diagnostics,
        "checkpoint": checkpoint,
        "seed": seed,
        "data": {"dataset": run["dataset"], "variant": manifest.get("variant"),
                 "hash": data_hash(manifest)},
        "environment": environment_info(device),
        "git": git_info(),
        "config": run,
    })


# Sources whose change can change a run's numbers (the train stage's code deps in dvc.yaml).
CODE_SOURCES = ("__init__.py", "config.py", "training.py", "metrics.py", "models.py", "rules", "data")


def code_hash() -> str:
    """Fingerprint of the code a run executes: a resumed stage reuses a finished run only if
    neither its config nor this changed, so editing a rule never leaves stale metrics behind."""
    import hashlib
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in CODE_SOURCES:
        path = root / name
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        for f in files:
            if f.is_file() and f.suffix in (".py", ".json"):
                digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def data_hash(manifest: dict) -> str | None:
    """One hash for the prepared data: of the sha256 pins of its output files (which the
    loader verifies), so a re-preparation from different raw bytes re-runs every run."""
    import hashlib
    import json
    if not manifest:
        return None
    pins = manifest.get("outputs") or manifest
    blob = json.dumps(pins, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _json_safe(obj):
    """Strict JSON: NaN/inf become None (a diverged run's loss must not break JSON readers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_checkpoint_model(path, run: dict, num_classes: int, device) -> nn.Module:
    """Rebuild the plain model of a run from its checkpoint (rule state such as B is dropped:
    rules change only the backward pass, so the forward pass of the plain model is the same)."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = build_model(run["model"]["name"], num_classes=num_classes, **run["model"]["options"]).to(device)
    expected = model.state_dict()
    missing = [k for k in expected if k not in ckpt["state_dict"]]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing[:5]}")
    model.load_state_dict({k: ckpt["state_dict"][k] for k in expected})
    return model
