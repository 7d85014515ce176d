"""Does a re-trained run reproduce a committed one? A rule per quantity that holds on any CPU.

Why not bit-for-bit: torch picks its CPU kernels by the processor's vector width (AVX-512,
AVX2 or plain; `ATEN_CPU_CAPABILITY` forces one), and kernels of different widths sum in a
different order, so the last bits of every float differ and a few epochs of SGD carry the
difference into whole images. A check at 1e-5 then fails on a correct submission; a check
too loose misses a changed rule. Each quantity gets the tolerance that fits it:

- accuracies: a number of images of the split they were measured on (``ACC_IMAGES``), since
  a 512-image smoke subset moves in steps of 0.2 points;
- angles (``*_deg``): absolute degrees, since alignment angles sit near 0 or 90 and a relative
  bound near 0 is meaningless (3.3e-06 vs 2.4e-06 degrees is the same "aligned");
- losses: relative;
- every other float (diagnostics, learning rates): relative with an absolute floor;
- integers, strings, booleans: exact (status, epoch counts, sizes, config hash, data draw).

Best-validation selection may pick another epoch when two epochs' validation accuracies
differ by less than the tolerance (a near-tie): that is accepted when the committed epoch is
still within tolerance of the best in the re-trained history, and the committed selected
accuracy is then compared with the re-trained accuracy at the committed epoch.

Networks with a discontinuous forward (a step or a spike threshold) turn a last-bit
difference into a flipped unit, so they get wider bounds (``DISCONTINUOUS``).

The bounds were measured (2026-11-27, AMD EPYC with AVX-512, torch 2.15.0): the whole smoke
profile (77 runs) re-trained four times, with torch's kernels forced to `default` and `avx2`
(`ATEN_CPU_CAPABILITY`), each alone and together with oneDNN's and MKL's matching switches
(`ONEDNN_MAX_CPU_ISA=SSE41|AVX2`, `MKL_ENABLE_INSTRUCTIONS=SSE4_2|AVX2`), against the
metrics committed from the native AVX-512 kernels. Largest deviations, smooth networks:
1 image (A1 MNIST LeNet, 128 validation images), 0.052 degrees (A1 CIFAR-10 LeNet, conv1
update angle), losses 3.5e-5 relative (F1 transformer); step-activation LeNet: 9 of 256
test images, losses 1.5 % relative. Each bound is about three times the largest deviation,
for CPUs that differ more than one machine's kernel switches can show.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

# Measured across CPU kernels (see module docstring); each about 3x the largest seen.
ACC_IMAGES = 3           # images of the split an accuracy was measured on
ANGLE_DEG = 0.25         # degrees
LOSS_REL = 1e-3          # relative
OTHER_REL, OTHER_ABS = 1e-2, 1e-3


@dataclass(frozen=True)
class Bounds:
    acc_images: float = ACC_IMAGES
    angle_deg: float = ANGLE_DEG
    loss_rel: float = LOSS_REL
    other_rel: float = OTHER_REL
    other_abs: float = OTHER_ABS


SMOOTH = Bounds()
# Step activations and spike thresholds: 9 images and 1.5 % seen, about 3x that allowed.
DISCONTINUOUS = Bounds(acc_images=25, angle_deg=1.0, loss_rel=0.05, other_rel=0.05)
DISCONTINUOUS_MODELS = ("noisy_lenet", "spiking_mlp", "spiking_convnet", "deepersnn")


def bounds_for(metrics: dict) -> Bounds:
    model = ((metrics.get("config") or {}).get("model") or {}).get("name")
    return DISCONTINUOUS if model in DISCONTINUOUS_MODELS else SMOOTH

# What a run's metrics.json holds that a re-run must reproduce (timings and provenance vary).
COMPARED = ("status", "diverged_epoch", "epochs_completed", "sizes", "selection", "selected_epoch",
            "selected_test_acc", "final_test_acc", "best_test_epoch", "best_test_acc_test_selected",
            "config_hash", "history", "curves", "train_data_draw", "diagnostics", "scalars",
            "task_accuracy", "transfer")
_EPOCH_PICKS = {"selected_epoch": ("val_acc", "selected_test_acc"),
                "best_test_epoch": ("test_acc", "best_test_acc_test_selected")}


@dataclass(frozen=True)
class Difference:
    where: str
    committed: object
    reproduced: object
    tolerance: str

    def __str__(self) -> str:
        return f"{self.where}: committed {_short(self.committed)}, reproduced {_short(self.reproduced)} ({self.tolerance})"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _split_of(leaf: str) -> str | None:
    for split in ("test", "val", "train"):
        if leaf.startswith(split) or f"_{split}_" in f"_{leaf}":
            return split
    return None


def tolerance_for(where: str, sizes: dict | None, bounds: Bounds = SMOOTH) -> tuple[str, float, float]:
    """(description, absolute, relative) tolerance for a float stored at the path `where`
    (e.g. `diagnostics[3].update_gradient_angle_deg.conv1`, `history[0].val_acc`)."""
    path = where.lower()
    name = re.sub(r"\[\d+\]", "", path.rsplit(".", 1)[-1])
    if "_deg" in path or "angle" in path:
        return f"abs {bounds.angle_deg} deg", bounds.angle_deg, 0.0
    if "acc" in name:
        split = _split_of(name) or _split_of(path.replace(".", "_"))
        images = (sizes or {}).get(split) if split else None
        images = images or min((v for v in (sizes or {}).values() if isinstance(v, int) and v > 0), default=0)
        if images:
            return f"{bounds.acc_images:g} of {images} images", 100.0 * bounds.acc_images / images, 0.0
        return "abs 1 pt", 1.0, 0.0
    if "loss" in name:
        return f"rel {bounds.loss_rel:g}", 1e-6, bounds.loss_rel
    return f"rel {bounds.other_rel:g}, abs {bounds.other_abs:g}", bounds.other_abs, bounds.other_rel


def _close(a: float, b: float, abs_tol: float, rel_tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= max(abs_tol, rel_tol * max(abs(a), abs(b)))


def _compare(expected, actual, where: str, sizes, out: list[Difference], bounds: Bounds = SMOOTH) -> None:
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            out.append(Difference(where, sorted(expected), sorted(actual) if isinstance(actual, dict) else actual,
                                  "same keys"))
            return
        for key in sorted(expected):
            _compare(expected[key], actual[key], f"{where}.{key}", sizes, out, bounds)
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            out.append(Difference(where, f"{len(expected)} entries",
                                  f"{len(actual)} entries" if isinstance(actual, list) else actual, "same length"))
            return
        for i, (e, a) in enumerate(zip(expected, actual)):
            _compare(e, a, f"{where}[{i}]", sizes, out, bounds)
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        text, abs_tol, rel_tol = tolerance_for(where, sizes, bounds)
        if not _close(float(expected), float(actual), abs_tol, rel_tol):
            out.append(Difference(where, expected, actual, text))
    elif expected != actual or type(expected) is not type(actual):
        if isinstance(expected, int) and isinstance(actual, float) and not isinstance(expected, bool):
            _compare(float(expected), actual, where, sizes, out, bounds)
            return
        out.append(Difference(where, expected, actual, "exact"))


def _epoch_value(history: list[dict], epoch, key: str):
    return next((h.get(key) for h in history or [] if h.get("epoch") == epoch), None)


def _near_tie(committed: dict, reproduced: dict, pick: str, sizes, bounds: Bounds) -> list[Difference]:
    """A different picked epoch is accepted when the committed epoch ties (within tolerance)
    with the re-trained pick; its accuracy is then compared at the committed epoch."""
    score_key, acc_key = _EPOCH_PICKS[pick]
    history = reproduced.get("history") or []
    c_epoch, r_epoch = committed.get(pick), reproduced.get(pick)
    text, abs_tol, _ = tolerance_for(score_key, sizes, bounds)
    at_committed = _epoch_value(history, c_epoch, score_key)
    at_reproduced = _epoch_value(history, r_epoch, score_key)
    if at_committed is None or at_reproduced is None or at_reproduced - at_committed > abs_tol:
        return [Difference(pick, c_epoch, r_epoch, f"a near-tie in {score_key} ({text})")]
    out: list[Difference] = []
    _compare(committed.get(acc_key), _epoch_value(history, c_epoch, "test_acc"),
             f"{acc_key}@epoch{c_epoch}", sizes, out, bounds)
    return out


def compare_runs(committed: dict, reproduced: dict, keys=COMPARED) -> list[Difference]:
    """Every difference between a committed metrics.json and a re-trained one, beyond the
    tolerance of its quantity; an empty list means the run reproduced."""
    sizes = committed.get("sizes") if isinstance(committed.get("sizes"), dict) else None
    bounds = bounds_for(committed)
    out: list[Difference] = []
    for key in keys:
        if key in _EPOCH_PICKS and committed.get(key) != reproduced.get(key):
            out += _near_tie(committed, reproduced, key, sizes, bounds)
            continue
        if key in {acc for _, acc in _EPOCH_PICKS.values()}:
            pick = next(p for p, (_, acc) in _EPOCH_PICKS.items() if acc == key)
            if committed.get(pick) != reproduced.get(pick):
                continue  # compared at the committed epoch by _near_tie
        _compare(committed.get(key), reproduced.get(key), key, sizes, out, bounds)
    return out
