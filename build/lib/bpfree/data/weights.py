"""Pre-trained weights for transfer experiments, found and checked like raw data.

Weights are data: they come from `$BPFREE_DATA_DIR/weights/<file>` (or torch's hub cache),
are downloaded only when the machine is online, and a file whose hash does not match is
refused with one message, never loaded into a model that would then train on garbage.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from bpfree.data import downloads
from bpfree.data.errors import ChecksumError, MissingDataError
from bpfree.data.sources import resolve_data_dir


@dataclass(frozen=True)
class PretrainedWeights:
    name: str
    model: str  # bpfree model name whose state_dict keys these are
    model_options: dict
    num_classes: int
    file: str
    url: str
    # The whole sha256, pinned: torchvision checks only the 8 hex digits in the file name. The
    # value is the one many independent projects pin for this file (46,830,571 bytes).
    sha256: str


PRETRAINED: dict[str, PretrainedWeights] = {
    w.name: w for w in (
        PretrainedWeights("resnet18_imagenet", "resnet18", {"cifar_stem": False}, 1000,
                          "resnet18-f37072fd.pth",
                          "https://download.pytorch.org/models/resnet18-f37072fd.pth",
                          "f37072fd47e89c5e827621c5baffa7500819f7896bbacec160b1a16c560e07ec"),
    )
}


def _candidates(spec: PretrainedWeights, data_dir: Path) -> list[Path]:
    import torch.hub
    return [data_dir / "weights" / spec.file, Path(torch.hub.get_dir()) / "checkpoints" / spec.file]


def locate_weights(name: str, data_dir: Path | str | None = None, *, download: bool = True) -> Path:
    """Path of a verified weights file; MissingDataError / ChecksumError say what to do."""
    if name not in PRETRAINED:
        raise MissingDataError(f"unknown pre-trained weights {name!r}; known: {', '.join(sorted(PRETRAINED))}")
    spec = PRETRAINED[name]
    data_dir = Path(data_dir) if data_dir is not None else resolve_data_dir()
    candidates = _candidates(spec, data_dir)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None and download:
        try:
            downloads.check_online(spec.url)
            import torch.hub
            candidates[0].parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(candidates[0]), progress=False)
            found = candidates[0]
        except downloads.DownloadFailed as error:
            reason = str(error)
        except Exception as error:  # noqa: BLE001 - urllib/torch raise many kinds alike
            reason = str(error).splitlines()[0]
    if found is None:
        raise MissingDataError(
            f"Pre-trained weights {name!r} ({spec.file}) not found. Looked in:\n"
            + "".join(f"  MISSING  {p}\n" for p in candidates)
            + (f"Then download failed: {reason}.\n" if download else "")
            + f"Put {spec.file} (from {spec.url}) in {candidates[0].parent}.")
    digest = hashlib.sha256(found.read_bytes()).hexdigest()
    if digest != spec.sha256:
        raise ChecksumError(
            f"{found}: sha256 {digest} is not {spec.sha256} (the published {spec.file}); the file "
            f"is corrupt or another release. Delete it and fetch {spec.url}.",
            [{"path": str(found), "actual_sha256": digest, "expected": [spec.sha256]}])
    return found


def load_pretrained_state(name: str, data_dir: Path | str | None = None) -> dict:
    """The verified state dict (tensors only: weights_only loading)."""
    import torch
    return torch.load(locate_weights(name, data_dir), map_location="cpu", weights_only=True)
