"""Training-step time and memory of every rule against BP, in one process, on one device.

Why one process and interleaving: step times drift with clocks, allocator state and other
load, so a ratio to BP is only meaningful when BP and the rule are timed side by side
under the same conditions. Each rule runs the trainer's own step
(`training.optimisation_step`: forward, loss, the rule's local losses, backward, its pre-
and post-step work, the optimizer), on the same model and the same fixed batch, after a
warm-up. CUDA timings use events; CPU timings perf_counter. Pixel and token values do not
change the arithmetic, so the batch is drawn at random (seeded) with the experiments'
shapes: 28x28 MNIST, 32x32 CIFAR-10, the NLI transformer's sequence length.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bpfree.models import build_model
from bpfree.provenance import environment_info, git_info
from bpfree.rules import apply_rule, list_layer_rules, list_rules
from bpfree.loop import StepTimer, optimisation_step

# Targets of issue 9 on GPU (ratio of the rule's median step time to BP's).
GPU_TARGETS = {
    **{rule: 1.15 for rule in ("fa", "usf", "brsf", "frsf", "adafa", "dfa")},
    "kp": 1.3, "wm": 1.3, "backman": 1.3,
    **{rule: 1.5 for rule in ("lfp0", "lfp_eps", "lfp_ab", "lfp_zpzm")},
}
# No target: extra forward work by design (LFNN's second forward and read-outs, the block
# rules' feedback forwards); reported with that explanation.
EXTRA_WORK = {
    "lfnn": "a second forward of each layer for the followers' alignment, plus per-worker read-outs",
    "lfnn_l": "per-worker read-outs and a joint read-out per layer",
    "tp": "one no-grad forward of each block on noisy input, plus the inverses",
    "dtp": "one no-grad forward of each block on noisy input, plus the inverses",
    "lra": "two no-grad forwards of each block (noisy and clean), plus the error weights",
    "lfnn_heads": "the worker heads (one Linear h -> workers x classes) and their per-sample leader/follower losses",
}


@dataclass(frozen=True)
class Case:
    """One benchmarked model: its builder options, input and optimiser."""

    name: str
    description: str
    model: str
    options: dict
    input_shape: tuple  # per example; () for token ids
    batch: int
    classes: int = 10
    sequence: int = 0  # > 0: (batch, 3, sequence) token / segment / mask ids
    vocab: int = 3612
    optimizer: str = "sgd"
    rule_options: dict = field(default_factory=dict)


CASES = {
    "mlp_mnist": Case("mlp_mnist", "MLP 784-256-128-10 on MNIST (the D1 net)", "mlp",
                      {"in_features": 784, "widths": [256, 128]}, (1, 28, 28), 128),
    "lenet_cifar10": Case("lenet_cifar10", "LeNet on CIFAR-10 (the A1 net)", "lenet_cifar", {}, (3, 32, 32), 128,
                          rule_options={"lfnn": {"workers": 2}, "lfnn_l": {"workers": 2}}),
    "resnet18_cifar10": Case("resnet18_cifar10", "ResNet-18 (CIFAR stem) on CIFAR-10 (the C3 net)", "resnet18",
                             {"cifar_stem": True}, (3, 32, 32), 128),
    "bert_sick": Case("bert_sick", "BERT-style encoder, 4 blocks, dim 64, on SICK pairs (the F net)",
                      "bert_classifier", {"dim": 64, "depth": 4, "heads": 4, "ffn_dim": 256, "max_len": 64,
                                          "dropout": 0.1}, (), 64, classes=3, sequence=53,
                      optimizer="adam", rule_options={"kp": {"match": "update", "shrink": 0.1}}),
}

# (cases, warm-up steps, timed steps per repeat, repeats) per pipeline profile; min_sample_ms:
# a case whose BP step is short times more steps per sample, so that one sample is not a few
# milliseconds that a clock tick or an interrupt can double (the MLP's step is about 2 ms).
PROFILES = {
    "smoke": {"cases": ["mlp_mnist", "bert_sick"], "warmup": 1, "steps": 2, "repeats": 2, "batch": 8},
    "cpu": {"cases": ["mlp_mnist", "lenet_cifar10", "resnet18_cifar10", "bert_sick"], "warmup": 3, "steps": 5,
            "repeats": 5, "min_sample_ms": 200, "batches": {"resnet18_cifar10": 32}},  # a one-thread ResNet-18 step at 128 takes seconds
    "gpu": {"cases": list(CASES), "warmup": 10, "steps": 50, "repeats": 5, "min_sample_ms": 50},
}


def rules_for(case: Case) -> list[str]:
    """Every registered rule that can train this model (block rules need `blocks`)."""
    return list_rules() if case.sequence else list_layer_rules()


def _batch(case: Case, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if case.sequence:
        ids = torch.randint(5, case.vocab, (case.batch, case.sequence), generator=gen)
        segments = torch.zeros_like(ids)
        segments[:, case.sequence // 2:] = 1
        mask = torch.ones_like(ids)
        x = torch.stack([ids, segments, mask], 1)
    else:
        x = torch.randn((case.batch, *case.input_shape), generator=gen)
    y = torch.randint(0, case.classes, (case.batch,), generator=gen)
    return x.to(device), y.to(device)


def make_step(case: Case, rule: str, device: torch.device):
    """A closure running one training step of `rule` on the case's model and fixed batch."""
    torch.manual_seed(0)
    options = dict(case.options)
    if case.sequence:
        options["vocab_size"] = case.vocab
    model = build_model(case.model, num_classes=case.classes, **options).to(device)
    handle = apply_rule(model, rule, **case.rule_options.get(rule, {}))
    params = model.parameters()
    optimizer = (torch.optim.Adam(params, lr=1e-3) if case.optimizer == "adam"
                 else torch.optim.SGD(params, lr=0.01, momentum=0.9))
    x, y = _batch(case, device)
    model.train()

    def step():
        optimisation_step(model, handle, optimizer, x, y)

    return step


def _timer(device: torch.device):
    """ms per step over `steps` consecutive steps, with the trainer's timer (CUDA events on GPU)."""
    def timed(step, steps):
        timer = StepTimer(device)
        token = timer.start()
        for _ in range(steps):
            step()
        timer.stop(token, keep=True)
        return timer.mean_ms() / steps
    return timed


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_memory_mb(case: Case, rule: str, device: torch.device, steps: int = 2) -> tuple[float | None, float | None]:
    """(memory, added): CUDA max allocated during a few steps of this rule alone (added =
    the same); CPU the process RSS after them and the RSS they added (after a collection)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = make_step(case, rule, device)
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        peak = added = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        before = _rss_mb()
        step = make_step(case, rule, device)
        for _ in range(steps):
            step()
        peak = _rss_mb()
        added = None if before is None or peak is None else max(peak - before, 0.0)
    del step
    gc.collect()
    return peak, added


def step_flops(case: Case, rule: str, device: torch.device) -> int:
    """Matrix-product and convolution FLOPs of one step of `rule` (torch.utils.flop_counter),
    after one uncounted step (lazily drawn feedback). Why: where these products dominate a
    step, as on one CPU thread, a rule's time ratio to BP cannot go far below its products'
    ratio; elementwise work and random draws are not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    step = make_step(case, rule, device)
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _steps_per_sample(steps: int, step_ms: float, min_sample_ms: float) -> int:
    """At least `steps`, and enough for a sample of min_sample_ms at step_ms a step."""
    return max(steps, math.ceil(min_sample_ms / max(step_ms, 1e-6)))


def benchmark_case(case: Case, device: torch.device, warmup: int, steps: int, repeats: int,
                   rules: list[str] | None = None, log=None, min_sample_ms: float = 0.0) -> dict:
    """Median and spread of every rule's step time, interleaved with BP's; ratios to BP. A
    sample times at least `steps` steps, more where BP's warm-up steps say a sample of that
    many would be shorter than min_sample_ms (the first steps are the slowest, so a sample
    comes out shorter than that: the MLP's 30 steps take about 60 ms on CPU)."""
    rules = [r for r in (rules or rules_for(case)) if r != "bp"]
    timed = _timer(device)
    builders, errors = {}, {}
    for rule in ["bp", *rules]:
        try:
            builders[rule] = make_step(case, rule, device)
            warm_ms = timed(builders[rule], warmup)  # kernels, allocator, lazily drawn feedback
            if rule == "bp":
                steps = _steps_per_sample(steps, warm_ms, min_sample_ms)
        except Exception as error:  # one rule that cannot run this model must not sink the rest
            if rule == "bp":
                raise
            builders.pop(rule, None)
            errors[rule] = f"{type(error).__name__}: {error}"
    samples = {rule: [] for rule in builders}
    for _ in range(repeats):
        for rule, step in builders.items():
            samples[rule].append(timed(step, steps))
    bp_median = statistics.median(samples["bp"])
    results = {}
    for rule, ms in samples.items():
        median = statistics.median(ms)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [median, median, median]
        results[rule] = {
            "median_ms": median, "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "min_ms": min(ms), "max_ms": max(ms), "steps_per_s": 1e3 / median,
            "ratio_to_bp": median / bp_median, "samples_ms": ms,
            "gpu_target": GPU_TARGETS.get(rule), "extra_work": EXTRA_WORK.get(rule),
        }
        if log:
            log(f"  {case.name:18s} {rule:9s} {median:9.2f} ms/step  x{median / bp_median:.2f} of BP")
    del builders
    for rule in results:
        results[rule]["memory_mb"], results[rule]["memory_added_mb"] = peak_memory_mb(case, rule, device)
        results[rule]["flops"] = step_flops(case, rule, device)
    for rule in results:
        results[rule]["flops_ratio_to_bp"] = results[rule]["flops"] / results["bp"]["flops"]
    for rule, error in errors.items():
        results[rule] = {"error": error}
    return {"case": case.name, "description": case.description, "batch": case.batch,
            "optimizer": case.optimizer, "steps_per_sample": steps, "rules": results}


# --------------------------------------------------------------------------- peers
# Our steps against the same step elsewhere, same model, batch and optimiser, interleaved
# over the repeats: BP against a plain PyTorch loop (what the harness adds), FA against the
# authors' package biotorch (on its own LeNet-CIFAR), LFP-eps against the LFP authors' lfprop
# (on the E2 VGG) where lfprop is importable: its pins conflict with our lock, so that pair is
# timed when this stage runs in lfprop's own environment (README, 'Speed').
LFPROP_NOTE = ("lfprop (the LFP authors' package) pins versions our lock does not hold: time it by running "
               "this stage in lfprop's environment (README, 'Speed')")


def _plain_step(model: torch.nn.Module, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return step


def _in_channels_last(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trainer's `speed.channels_last` (training.py): the model and its images in NHWC."""
    model.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last)


def _biotorch_lenet_steps(device: torch.device, batch: int, channels_last: bool = False):
    """(ours, biotorch's) FA steps on biotorch's LeNetCIFAR with the same weights and batch;
    `channels_last`: ours with the trainer's speed setting of that name."""
    import contextlib
    import copy
    import io

    from biotorch.models.le_net import LeNetCIFAR
    from biotorch.module.biomodule import BioModule

    torch.manual_seed(0)
    plain = LeNetCIFAR()
    with contextlib.redirect_stdout(io.StringIO()):  # biotorch prints its conversion summary
        bio = BioModule(copy.deepcopy(plain), mode="fa", copy_weights=True,
                        layer_config={"type": "fa", "options": {"init": "xavier", "constrain_weights": False,
                                                                "gradient_clip": False}}, output_dim=10).to(device)
    ours = copy.deepcopy(plain).to(device)
    handle = apply_rule(ours, "fa")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 3, 32, 32), generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.01, momentum=0.9)
    bio.train()
    ours.train()
    our_x = _in_channels_last(ours, x) if channels_last else x

    def our_step():
        optimisation_step(ours, handle, optimizer, our_x, y)
    return our_step, _plain_step(bio, x, y)


def _lfprop_vgg_steps(device: torch.device, batch: int, channels_last: bool = False):
    """(ours, lfprop's) LFP-eps steps on the E2 VGG with the same weights and batch: ours is
    the trainer's step with the authors' settings (reward per sample, update norm clipped at
    3.0); theirs is Trainer.lfp_step of the authors' run_experiment.py (c90f1cc, lines
    144-179): composite context, forward, SoftmaxLossReward, autograd.grad, grad = -feedback,
    clip_grad_norm_ 3.0, SGD step. `channels_last`: ours with the trainer's speed setting."""
    import copy
    import warnings

    from lfprop.propagation import propagator_lxt
    from lfprop.rewards import reward_functions

    torch.manual_seed(0)
    plain = build_model("vgg_cifar", num_classes=10).to(device).train()
    theirs_model, ours = copy.deepcopy(plain), copy.deepcopy(plain)
    handle = apply_rule(ours, "lfp_eps", reward_scale="sum", clip_update_norm=3.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, 3, 32, 32), generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    our_optimizer = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    their_optimizer = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9)
    warnings.filterwarnings("ignore", message="This functionality is not yet fully tested")  # lxt, each step
    composite = propagator_lxt.LFPEpsilonComposite(epsilon=1e-6)
    criterion = reward_functions.SoftmaxLossReward(device)
    our_x = _in_channels_last(ours, x) if channels_last else x

    def our_step():
        optimisation_step(ours, handle, our_optimizer, our_x, y)

    def their_step():
        their_optimizer.zero_grad()
        with composite.context(theirs_model) as modified:
            inputs = x.detach().requires_grad_(True)
            outputs = modified(inputs)
            reward = torch.from_numpy(criterion(outputs, y).detach().cpu().numpy()).to(device)
            torch.autograd.grad((outputs,), (inputs,), grad_outputs=(reward,), retain_graph=False)
        for param in theirs_model.parameters():
            param.grad = -param.feedback
        torch.nn.utils.clip_grad_norm_(theirs_model.parameters(), 3.0, 2.0)
        their_optimizer.step()
    return our_step, their_step


def peer_ratios(device: torch.device, warmup: int, steps: int, repeats: int, batch: int = 64,
                min_sample_ms: float = 0.0) -> list[dict]:
    """Median step time of ours over the peer's, both timed interleaved in this process (a
    sample at least min_sample_ms long by our warm-up steps, as in benchmark_case)."""
    timed = _timer(device)
    pairs = []
    for name in ("mlp_mnist", "lenet_cifar10"):
        case = dataclasses.replace(CASES[name], batch=batch)
        ours = make_step(case, "bp", device)
        torch.manual_seed(0)
        model = build_model(case.model, num_classes=case.classes, **case.options).to(device).train()
        x, y = _batch(case, device)
        pairs.append((f"bp (bpfree's step) vs a plain PyTorch loop, {case.description}", ours,
                      _plain_step(model, x, y), "PyTorch"))
    try:
        for layout in ("", ", ours with speed.channels_last"):
            our_fa, bio_fa = _biotorch_lenet_steps(device, batch, channels_last=bool(layout))
            pairs.append((f"fa vs biotorch 0.0.16's fa, LeNet-CIFAR (biotorch's model){layout}", our_fa, bio_fa,
                          "biotorch"))
        missing = None
    except ImportError as error:
        missing = f"biotorch not installed ({error.name}): pip install --no-deps -r requirements-parity.txt"
    try:
        for layout in ("", ", ours with speed.channels_last"):
            our_lfp, their_lfp = _lfprop_vgg_steps(device, batch, channels_last=bool(layout))
            pairs.append((f"lfp_eps vs lfprop {_peer_packages().get('lfprop', '?')}'s lfp_step, the E2 VGG{layout}",
                          our_lfp, their_lfp, "lfprop"))
        lfprop_missing = None
    except ImportError as error:
        lfprop_missing = f"{LFPROP_NOTE} ({error.name} not importable here)"
    out = []
    for label, ours, theirs, peer in pairs:
        pair_steps = _steps_per_sample(steps, timed(ours, warmup), min_sample_ms)
        timed(theirs, warmup)
        a, b = [], []
        for _ in range(repeats):
            a.append(timed(ours, pair_steps))
            b.append(timed(theirs, pair_steps))
        ratios = [x / y for x, y in zip(a, b)]
        out.append({"pair": label, "peer": peer, "ours_ms": statistics.median(a), "peer_ms": statistics.median(b),
                    "ratio": statistics.median(a) / statistics.median(b), "ratio_min": min(ratios),
                    "ratio_max": max(ratios), "batch": batch, "steps_per_sample": pair_steps})
    if missing:
        out.append({"pair": "fa vs biotorch's fa", "peer": "biotorch", "missing": missing})
    if lfprop_missing:
        out.append({"pair": "lfp_eps vs lfprop's lfp_step", "peer": "lfprop", "missing": lfprop_missing})
    return out


def _load_average() -> float | None:
    """Other work on the machine inflates every rule's time alike (the ratios hold), not the
    absolute times: recorded so a reader can tell a quiet machine from a busy one."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def run_benchmark(profile: str, device: torch.device, log=None) -> dict:
    if profile not in PROFILES:
        raise ValueError(f"unknown benchmark profile {profile!r}; valid: {', '.join(PROFILES)}")
    spec = PROFILES[profile]
    cases = []
    for name in spec["cases"]:
        batch = spec.get("batches", {}).get(name, spec.get("batch"))
        cases.append(CASES[name] if batch is None else dataclasses.replace(CASES[name], batch=batch))
    min_sample_ms = spec.get("min_sample_ms", 0.0)
    results = [benchmark_case(case, device, spec["warmup"], spec["steps"], spec["repeats"], log=log,
                              min_sample_ms=min_sample_ms) for case in cases]
    peers = peer_ratios(device, spec["warmup"], spec["steps"], spec["repeats"], batch=spec.get("batch") or 64,
                        min_sample_ms=min_sample_ms)
    return {
        "profile": profile, "device": str(device), "dtype": "float32",
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "threads": torch.get_num_threads(), "load_average_1min": _load_average(),
        "warmup": spec["warmup"], "steps": spec["steps"], "min_sample_ms": min_sample_ms,
        "repeats": spec["repeats"], "memory": "CUDA max allocated" if device.type == "cuda"
        else "process RSS after building the rule's model alone and 2 steps (in brackets: what they added)",
        "environment": environment_info(device), "git": git_info(), "cases": results, "peers": peers,
        "peer_packages": _peer_packages(),
    }


def _peer_packages() -> dict[str, str]:
    """Versions of the authors' packages this process timed against (and lfprop's own pins)."""
    from importlib import metadata
    out = {}
    for name in ("biotorch", "lfprop", "zennit", "lxt"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def record_profile(profile: str, bench_json: Path, bench_md: Path, log=print) -> dict:
    """The bench stage's work: time `profile` (the gpu one on CUDA, the others on one CPU
    thread, as their runs train) and replace only its entry in bench_json; bench_md is
    re-rendered from all entries, so cpu and gpu records sit side by side."""
    from bpfree.config import ConfigError
    from bpfree.provenance import atomic_write_json, atomic_write_text

    if profile not in PROFILES:
        raise ConfigError("profile", profile, "no benchmark preset", list(PROFILES))
    if profile == "gpu":
        if not torch.cuda.is_available():
            raise ConfigError("profile", profile, "the gpu benchmark needs a CUDA device; use smoke or cpu here")
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    log(f"[{profile}] benchmarking on {device}")
    record = run_benchmark(profile, device, log=log)
    try:
        records = json.loads(Path(bench_json).read_text())
    except (OSError, ValueError):
        records = {}
    records[profile] = record
    atomic_write_json(bench_json, records)
    atomic_write_text(bench_md, render_markdown(records))
    return record


def _fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def _memory(r: dict, record: dict) -> str:
    if record["device"].startswith("cuda"):
        return _fmt(r.get("memory_mb"), 1)
    return f"{_fmt(r.get('memory_mb'), 0)} (+{_fmt(r.get('memory_added_mb'), 1)})"


def _longer_samples(record: dict) -> str:
    if not record.get("min_sample_ms"):
        return ""
    return (f" or more (aiming at {record['min_sample_ms']:g} ms a sample by BP's warm-up steps, which run slower "
            "than later ones: each case says how many steps a sample took)")


def render_markdown(records: dict) -> str:
    """One table per (profile, case): the ratio to BP is the headline."""
    lines = ["# Step time of every rule against BP", "",
             "Generated by `python -m stages.bench` (a DVC stage) from `results/bench.json`; do not edit by hand.",
             "Each rule runs the trainer's own step (forward, loss, local losses, backward, pre/post-step work,",
             "optimizer) on the same model and batch, interleaved with BP over the repeats after a warm-up.",
             "Ratios are median step time over BP's median. GPU targets (issue 9): FA, uSF, brSF, frSF, adaFA,",
             "DFA <= 1.15; KP, WM, BackMAN <= 1.3; LFP <= 1.5; LFNN and the block rules do extra forward work",
             "by design (column 'extra work'). On CPU the targets are shown for reference only.",
             "'products × BP': the matrix-product and convolution FLOPs of one step over BP's",
             "(torch.utils.flop_counter; elementwise work and random draws not counted). Where those products",
             "dominate the step, as on one CPU thread, the time ratio cannot go far below it: a target under",
             "it needs a rule that does less arithmetic, not a faster step.", ""]
    for profile, record in sorted(records.items()):
        env = record.get("environment", {})
        git = record.get("git", {})
        lines += [f"## Profile `{profile}`: {record['device']} ({record['device_name']}), {record['threads']} thread(s)", "",
                  f"- 1-minute load average at the start: {_fmt(record.get('load_average_1min'), 1)} "
                  f"(other work slows every rule alike; the ratios hold, absolute times do not)",
                  f"- {record['dtype']}; warm-up {record['warmup']} steps, {record['repeats']} repeats of "
                  f"{record['steps']} steps{_longer_samples(record)}; memory: {record['memory']}",
                  f"- torch {env.get('torch', '?')}, python {env.get('python', '?')}; commit "
                  f"`{str(git.get('commit', '?'))[:12]}`{' (dirty tree)' if git.get('dirty') else ''}", ""]
        for case in record["cases"]:
            per_sample = case.get("steps_per_sample")
            lines += [f"### {case['description']} — batch {case['batch']}, {case['optimizer']}"
                      f"{'' if per_sample is None else f', {per_sample} steps a sample'}", "",
                      "| rule | median ms | p25–p75 ms | steps/s | × BP | products × BP | GPU target | memory MB | extra work |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for rule, r in case["rules"].items():
                if "error" in r:
                    lines.append(f"| {rule} | — | — | — | — | — | — | — | cannot run: {r['error']} |")
                    continue
                target = r.get("gpu_target")
                mark = "" if target is None else f"≤ {target:g}"
                if target is not None and record["device"].startswith("cuda"):
                    mark += " ✓" if r["ratio_to_bp"] <= target else " ✗"
                lines.append(f"| {rule} | {_fmt(r['median_ms'])} | {_fmt(r['p25_ms'])}–{_fmt(r['p75_ms'])} | "
                             f"{_fmt(r['steps_per_s'], 1)} | {_fmt(r['ratio_to_bp'])} | {_fmt(r.get('flops_ratio_to_bp'))} | "
                             f"{mark or '—'} | "
                             f"{_memory(r, record)} | {r.get('extra_work') or ''} |")
            lines.append("")
        if record.get("peers"):
            packages = ", ".join(f"{k} {v}" for k, v in (record.get("peer_packages") or {}).items())
            lines += ["### Against other implementations of the same step (interleaved; ratio = ours / theirs)", "",
                      *([f"Peers' packages in this process: {packages}.", ""] if packages else []),
                      "| pair | ours ms | theirs ms | ratio (median) | ratio range over repeats |", "|---|---|---|---|---|"]
            for p in record["peers"]:
                if "missing" in p:
                    lines.append(f"| {p['pair']} | — | — | — | not timed: {p['missing']} |")
                else:
                    lines.append(f"| {p['pair']}, batch {p['batch']} | {_fmt(p['ours_ms'])} | {_fmt(p['peer_ms'])} | "
                                 f"{_fmt(p['ratio'], 3)} | {_fmt(p['ratio_min'], 3)}–{_fmt(p['ratio_max'], 3)} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


__all__ = ["CASES", "PROFILES", "Case", "benchmark_case", "make_step", "peak_memory_mb", "record_profile",
           "render_markdown", "rules_for", "run_benchmark", "step_flops"]
