"""Writes tests/reference/backman_reference.pt: the BackMAN authors' own hooks on two small nets.

The authors' code (github.com/ckodser/greedyneuron) is read straight from a clone with
`git show`, so no file of theirs is copied here. Regenerate with:

    git clone https://github.com/ckodser/greedyneuron /tmp/greedyneuron
    .venv/bin/python tests/reference/backman_reference.py [/tmp/greedyneuron]

Hooks recorded (one float64 backward each, CPU: Tensor.cuda is patched to a no-op because the
authors' layers call .cuda() in __init__; wandb, imported by master's models.py, is stubbed):

- "forgetting_hook": neurips branch 0a607f3, models.py:12-47, registered globally with
  torch.nn.modules.module.register_module_full_backward_hook exactly as their Split-MNIST
  script does (forgetting_check_hard.py:67-68), in training mode, with their loss
  torch.nn.CrossEntropyLoss() (mean over the batch, forgetting_check_hard.py:63, 88-89).
- "master_hook": master a2def09, models.py:14-57 (`hook`, registered by main.py:129-130),
  same wiring and loss.

Nets (weights drawn by our seeded nn layers in float64, then copied into the authors' greedy
layers; the .pt stores them under our nn.Sequential state_dict names):

- "mlp": their ClassifierMLP(12, [16, 16], 3, "greedy") = 12-16-16-3 ReLU MLP with biases,
  ours nn.Sequential(Linear, ReLU, Linear, ReLU, Linear); batch of 8.
- "cnn": nn.Sequential(GConv2d(2, 4, 3, padding=1, ReLU), GConv2d(4, 3, 3, stride=2, ReLU),
  Flatten, GLinear(27, 3)) of their layers (their LeNet is too large to store), ours the
  same with nn.Conv2d / nn.Linear; batch of 8 x 2 x 7 x 7.

For each net and hook: every parameter's gradient and the gradient reaching the input.
"""
import hashlib
import subprocess
import sys
import tempfile
import types
from importlib import util
from pathlib import Path

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "backman_reference.pt"
COMMITS = {"neurips": "0a607f32717077ee6bc0d9bbd882465f08521127",
           "master": "a2def09ea12ce132aab2ee9bb28cfac444cd8e64"}
HOOKS = {"forgetting_hook": ("neurips", "forgetting_hook"), "master_hook": ("master", "hook")}


def load_models(clone: Path, branch: str, tmp: Path):
    source = subprocess.run(["git", "-C", str(clone), "show", f"{COMMITS[branch]}:models.py"],
                            check=True, capture_output=True, text=True).stdout
    path = tmp / f"models_{branch}.py"
    path.write_text(source)
    spec = util.spec_from_file_location(f"greedyneuron_models_{branch}", path)
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, hashlib.sha256(source.encode()).hexdigest()


def ours(net: str) -> nn.Sequential:
    torch.manual_seed(0 if net == "mlp" else 1)
    if net == "mlp":
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(27, 3))


def authors(mod, branch: str, net: str) -> tuple[nn.Module, list[nn.Module]]:
    """The authors' greedy model and its weight-holding layers, in our layer order."""
    if net == "mlp":
        extra = (1, 0) if branch == "master" else ()  # master's ClassifierMLP adds extravert args
        model = mod.ClassifierMLP(12, [16, 16], 3, "greedy", *extra)
        return model, [g.linear for g in model.deep]
    model = nn.Sequential(
        mod.GConv2d(2, 4, 3, padding=1, mode="greedy", activation=nn.ReLU()),
        mod.GConv2d(4, 3, 3, stride=2, mode="greedy", activation=nn.ReLU()),
        nn.Flatten(), mod.GLinear(27, 3, mode="greedy"))
    return model, [model[0].conv2d, model[1].conv2d, model[3].linear]


def main(clone: Path) -> None:
    torch.set_default_dtype(torch.float64)
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    result = {"commits": COMMITS, "models_sha256": {}, "torch": str(torch.__version__), "nets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        mods = {}
        for branch in COMMITS:
            mods[branch], result["models_sha256"][branch] = load_models(clone, branch, Path(tmp))
        gen = torch.Generator().manual_seed(2024)
        for net in ("mlp", "cnn"):
            model = ours(net)
            x = torch.randn((8, 12) if net == "mlp" else (8, 2, 7, 7), generator=gen)
            y = torch.randint(0, 3, (8,), generator=gen)
            entry = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "x": x, "y": y}
            layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
            for hook_name, (branch, attr) in HOOKS.items():
                theirs, their_layers = authors(mods[branch], branch, net)
                with torch.no_grad():
                    for mine, other in zip(layers, their_layers, strict=True):
                        assert other.weight.shape == mine.weight.shape
                        other.weight.copy_(mine.weight)
                        other.bias.copy_(mine.bias)
                theirs.train()
                handle = torch.nn.modules.module.register_module_full_backward_hook(getattr(mods[branch], attr))
                try:
                    xx = x.clone().requires_grad_(True)
                    nn.CrossEntropyLoss()(theirs(xx), y).backward()
                finally:
                    handle.remove()
                grads = {"input": xx.grad.clone()}
                for i, (mine, other) in zip(range(len(layers)), zip(layers, their_layers)):
                    prefix = next(n for n, m in model.named_children() if m is mine)
                    grads[f"{prefix}.weight"] = other.weight.grad.clone()
                    grads[f"{prefix}.bias"] = other.bias.grad.clone()
                entry[hook_name] = grads
            result["nets"][net] = entry
    torch.save(result, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/greedyneuron"))
