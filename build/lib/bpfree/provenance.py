"""Where a result came from, and writing it so that a crash never leaves half a file.

Why atomic writes: the train stage is resumable and trusts any metrics.json it finds; a
file truncated by an interrupted run would be trusted too. Writing to a temporary file in
the same directory and os.replace-ing it means a reader sees the old file or the new one.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain open() gives a new file under the current umask (0644 at umask 022)."""
    return 0o666 & ~_umask()


def _atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        # mkstemp makes the file 0600; results are shared files (a Docker run as root writes
        # into the user's checkout), so give them the mode a plain open() would.
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    def write(tmp: Path):
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return _atomic(path, write)


def atomic_write_json(path, obj: Any, compact: bool = False) -> Path:
    """compact: one line without indentation, for files holding thousands of logged values."""
    # Serialise first: an unserialisable object must fail before anything touches the disk.
    if compact:
        text = json.dumps(obj, sort_keys=True, allow_nan=True, separators=(",", ":")) + "\n"
    else:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True) + "\n"
    return atomic_write_text(path, text)


def atomic_torch_save(path, obj: Any) -> Path:
    import torch
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path) -> Any:
    with open(path) as fh:
        return json.load(fh)


def git_output(*args: str, cwd=None) -> str | None:
    """Stripped stdout of a git command; None where git is absent or the command fails
    (outside a repository), which callers read as "unknown" rather than an error."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


CODE_PATHS = ("bpfree", "stages", "params.yaml", "dvc.yaml", "pyproject.toml", "requirements.lock")


@functools.lru_cache(maxsize=None)
def git_info(cwd: str | None = None) -> dict:
    """Commit and dirty flag; 'unknown' outside a repository or before the first commit."""
    commit = git_output("rev-parse", "HEAD", cwd=cwd)
    if commit is None and os.environ.get("BPFREE_GIT_COMMIT"):
        # A copy of the tree without .git (e.g. shipped to a GPU machine): the sender names
        # the commit it shipped; the run's code_hash vouches for the content.
        return {"commit": os.environ["BPFREE_GIT_COMMIT"], "dirty": None, "source": "BPFREE_GIT_COMMIT"}
    # Untracked code counts: new, uncommitted code is exactly what a commit hash cannot vouch
    # for. Results written while a profile runs are not code and do not make the tree dirty.
    status = git_output("status", "--porcelain", "--", *CODE_PATHS, cwd=cwd)
    return {
        "commit": commit or "unknown",
        "dirty": None if commit is None or status is None else bool(status),
    }


# Packages whose version can change a number (kernels, tokenizer, data decoding) or the pipeline.
RECORDED_PACKAGES = ("torch", "torchvision", "numpy", "tokenizers", "datasets", "safetensors", "dvc")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# Environment variables that choose CPU kernels: torch's own, oneDNN's (convolutions), MKL's.
CPU_KERNEL_SWITCHES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def environment_info(device=None) -> dict:
    import torch
    import torchvision
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "packages": package_versions(),
        "platform": platform.platform(),
        "executable": sys.executable,
        # Which vector kernels torch ran (AVX512, AVX2, DEFAULT): floats differ in their last
        # bits between them, so a re-run elsewhere is compared by bpfree.verify, not bit for bit.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    forced = {k: os.environ[k] for k in CPU_KERNEL_SWITCHES if os.environ.get(k)}
    if forced:
        info["cpu_kernel_switches"] = forced
    if torch.version.cuda:
        info["cuda"] = torch.version.cuda
    if torch.backends.cudnn.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    if device is not None:
        info["device"] = str(device)
        if getattr(device, "type", str(device)) == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
        else:
            info["device_name"] = _cpu_name()
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
