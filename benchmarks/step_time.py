"""Training-step time of every rule relative to BP, measured in one process on one device.

Why one process: step times drift with clocks, allocator state and other load, so a ratio
is only meaningful when BP and the rule are timed side by side, interleaved, under the
same conditions. CUDA timings use events after a warm-up; CPU timings use perf_counter.

    python -m benchmarks.step_time --model lenet_mnist --batch 64 --device cuda
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bpfree
from bpfree.models import build_model

INPUTS = {
    "lenet_mnist": ((1, 32, 32), {}),
    "lenet_cifar": ((3, 32, 32), {}),
    "mlp": ((784,), {"depth": 1, "width": 500, "activation": "sigmoid"}),
    "resnet20": ((3, 32, 32), {}),
    "resnet18": ((3, 32, 32), {}),
    "vgg_cifar": ((3, 32, 32), {}),
}


def _timer(device):
    if device.type == "cuda":
        def timed(fn, steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / steps
    else:
        def timed(fn, steps):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            return (time.perf_counter() - t0) * 1e3 / steps
    return timed


def make_step(model_name, rule, batch, device):
    shape, options = INPUTS[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, **options).to(device)
    handle = bpfree.apply_rule(model, rule)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        handle.after_step()

    return step


def benchmark(model_name, rules, batch, device, steps, repeats):
    timed = _timer(device)
    steps_by_rule = {rule: make_step(model_name, rule, batch, device) for rule in ["bp", *rules]}
    for step in steps_by_rule.values():  # warm-up: kernels, allocator, lazy DFA matrices
        timed(step, 10)
    samples = {rule: [] for rule in steps_by_rule}
    for _ in range(repeats):  # interleave so drift hits every rule alike
        for rule, step in steps_by_rule.items():
            samples[rule].append(timed(step, steps))
    bp_ms = statistics.median(samples["bp"])
    return {
        rule: {"median_ms": statistics.median(ms), "ratio_to_bp": statistics.median(ms) / bp_ms}
        for rule, ms in samples.items()
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet_mnist", choices=sorted(INPUTS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rules", nargs="*", default=[r for r in bpfree.list_rules() if r != "bp"])
    parser.add_argument("--out", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result = benchmark(args.model, args.rules, args.batch, device, args.steps, args.repeats)
    record = {
        "model": args.model, "batch": args.batch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "steps": args.steps,
        "repeats": args.repeats, "rules": result,
    }
    for rule, r in result.items():
        print(f"{args.model:12s} {rule:6s} {r['median_ms']:8.3f} ms/step  x{r['ratio_to_bp']:.2f} of BP")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
