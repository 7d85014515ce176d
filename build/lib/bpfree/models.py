"""Benchmark architectures, built only from layers a learning rule can swap by class.

Every weighted layer is a plain ``nn.Linear`` or ``nn.Conv2d`` that runs its own
``forward`` exactly once per pass, so a rule library can convert layers by class and
hook them. For the same reason residual additions are ``Add`` modules, flattening is an
``nn.Flatten`` and every activation call is its own (never in-place) module: a rule that
needs a block's output, or the input of a nonlinearity, can hook a module instead of
patching a ``forward``. Nothing here imports the rest of bpfree.
"""
from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

__all__ = [
    "Add",
    "BasicBlock",
    "Heaviside",
    "LIF",
    "SumOverTime",
    "SpikingNet",
    "BertClassifier",
    "ChannelPadShortcut",
    "ImageSizeCheckedSequential",
    "INIT_SCHEMES",
    "ACTIVATIONS",
    "ResNet",
    "SelfAttention",
    "TransformerEncoderBlock",
    "build_model",
    "init_weights",
    "list_models",
    "make_activation",
    "model_options",
    "register_model",
]

INIT_SCHEMES = ("default", "xavier_uniform", "normal_inverse_width", "normal_fan_sum")
ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu", "identity", "step")

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


# --------------------------------------------------------------------------- registry

def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a builder ``fn(num_classes, **options)``; its keyword defaults are its options."""
    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        parameters = list(inspect.signature(builder).parameters)
        if not parameters or parameters[0] != "num_classes":
            raise TypeError(f"builder for {name!r} must take num_classes as its first parameter")
        _BUILDERS[name] = builder
        return builder
    return decorator


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def _builder(name: str) -> Callable[..., nn.Module]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return _BUILDERS[name]


def model_options(name: str) -> dict[str, object]:
    """Options a model accepts with their defaults, so configs can be validated before building."""
    signature = inspect.signature(_builder(name))
    return {key: p.default for key, p in signature.parameters.items() if key != "num_classes"}


def build_model(name: str, num_classes: int, **options) -> nn.Module:
    """Build a registered model; typos in config options fail loudly instead of being ignored."""
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for model {name!r}; "
            f"valid options: {', '.join(valid)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return _builder(name)(num_classes, **options)


# ------------------------------------------------------------------------- components

def init_weights(model: nn.Module, scheme: str = "default", width: int | None = None) -> nn.Module:
    """Re-initialise Linear/Conv2d layers so results match papers that fix the init.

    "default" keeps whatever the constructors drew (torch's default, or torchvision's
    for resnet18). "xavier_uniform" draws Xavier-uniform weights and zero biases, as
    the biotorch benchmark does; norms and embeddings keep their defaults.
    "normal_inverse_width" draws every weight from N(0, 1/width) with zero biases, the
    init of Robertson & Koyejo 2024's two-layer nets (width = the hidden width).
    "normal_fan_sum" draws weights and biases alike from N(0, 1/(fan_in + fan_out)), as
    Akrout et al.'s reference code does (fcnn/FCNN_BP.py:29-32).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; valid schemes: {', '.join(INIT_SCHEMES)}")
    if scheme == "normal_inverse_width":
        if not width:
            raise ValueError("init 'normal_inverse_width' needs the hidden width (MLPs only)")
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(module.weight, std=width ** -0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    if scheme == "normal_fan_sum":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(module.weight)
                std = (fan_in + fan_out) ** -0.5
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=std)
    if scheme == "xavier_uniform":
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    return model


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    """A fresh, non-in-place activation module: in-place ops break module backward hooks."""
    factories: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(negative_slope),
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "identity": nn.Identity,
        "step": Heaviside,
    }
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}; valid activations: {', '.join(ACTIVATIONS)}")
    return factories[name]()


class Heaviside(nn.Module):
    """Step activation 1[x > 0] (lfprop's Step, where(x > 0, sign x, 0)). Its derivative is 0
    almost everywhere, so plain gradient descent sends no error through it; reward-based
    rules (LFP) pass through unchanged. Noise, where a protocol wants it, is InputNoise."""

    bpfree_activation = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0).to(x.dtype) + 0.0 * x  # "+ 0 x": in the graph, with zero derivative


class InputNoise(nn.Module):
    """Gaussian noise N(0, std^2) added to what enters the next layer, in training only.

    The LFP authors' NoisyWrapper (nbs/nondifferentiable-act/nondifferentiable-act_lenet.ipynb,
    cell 9): the layer sees the noisy input, and a reward or gradient passes the sum
    unchanged. Unlike pre-activation noise, it reaches units that are off.
    """

    def __init__(self, std: float = 0.0):
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + self.std * torch.randn_like(x)
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


class Add(nn.Module):
    """Residual sum as a module, so rules can hook where the skip path rejoins."""

    def forward(self, residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return residual + shortcut


class ImageSizeCheckedSequential(nn.Sequential):
    """A Sequential whose flattened head only fits one input size: fail with a clear message."""

    def __init__(self, layers: OrderedDict, image_size: tuple[int, int]):
        super().__init__(layers)
        self.image_size = tuple(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"{type(self).__name__} expects (B, C, {self.image_size[0]}, {self.image_size[1]}) "
                f"images, got shape {tuple(x.shape)}; pad or resize the inputs "
                f"(e.g. MNIST 28x28 -> 32x32 with 2 pixels of padding)"
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"image_size={self.image_size}"


# ------------------------------------------------------------------------------- MLPs

@register_model("mlp")
def mlp(
    num_classes: int,
    in_features: int = 784,
    depth: int = 1,
    width: int = 500,
    activation: str = "relu",
    negative_slope: float = 0.01,
    bias: bool = True,
    init: str = "default",
    widths: list[int] | None = None,
) -> nn.Module:
    """Fully connected net; depth=0 is a linear classifier. Flattens any (B, *) input.

    `widths` (e.g. [256, 128]) gives unequal hidden layers and overrides depth and width.
    """
    if widths is not None:
        if not isinstance(widths, (list, tuple)) or not all(
                isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ValueError(f"widths must be a list of positive ints, got {widths!r}")
        hidden = list(widths)
    else:
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        hidden = [width] * depth
    make_activation(activation, negative_slope)  # reject an unknown name before building
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    features = in_features
    for index, size in enumerate(hidden, start=1):
        layers[f"fc{index}"] = nn.Linear(features, size, bias=bias)
        layers[f"act{index}"] = make_activation(activation, negative_slope)
        features = size
    layers["classifier"] = nn.Linear(features, num_classes, bias=bias)
    return init_weights(nn.Sequential(layers), init, width=width)


# ----------------------------------------------------------------------------- LeNets

@register_model("lenet_mnist")
def lenet_mnist(num_classes: int = 10, in_channels: int = 1, init: str = "default") -> nn.Module:
    """LeCun et al. 1998 LeNet-5 (ReLU, max-pool); the 5x5 convs need 32x32 inputs."""
    layers = OrderedDict(
        conv1=nn.Conv2d(in_channels, 6, kernel_size=5),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 16, kernel_size=5),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(16, 120, kernel_size=5),
        relu3=nn.ReLU(),
        flatten=nn.Flatten(),
        fc1=nn.Linear(120, 84),
        relu4=nn.ReLU(),
        classifier=nn.Linear(84, num_classes),
    )
    return init_weights(ImageSizeCheckedSequential(layers, (32, 32)), init)


@register_model("lenet_cifar")
def lenet_cifar(num_classes: int = 10, in_channels: int = 3, init: str = "default") -> nn.Module:
    """biotorch's LeNet for CIFAR: unpadded 3x3 convs, then global average pooling."""
    layers = OrderedDict(
        conv1=nn.Conv2d(in_channels, 32, kernel_size=3),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, kernel_size=3),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        conv3=nn.Conv2d(64, 128, kernel_size=3),
        relu3=nn.ReLU(),
        avgpool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc1=nn.Linear(128, 256),
        relu4=nn.ReLU(),
        classifier=nn.Linear(256, num_classes),
    )
    return init_weights(nn.Sequential(layers), init)


# -------------------------------------------------------------------------------- VGG

@register_model("vgg_cifar")
def vgg_cifar(
    num_classes: int = 10, in_channels: int = 3, dropout: float = 0.5, init: str = "default"
) -> nn.Module:
    """VGG-like CIFAR net without BatchNorm, the usual feedback-alignment conv benchmark."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = in_channels
    stages = ((32, 64), (128, 128), (256, 256))
    conv_index = 0
    for stage_index, stage in enumerate(stages, start=1):
        for out_channels in stage:
            conv_index += 1
            layers[f"conv{conv_index}"] = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
            layers[f"relu{conv_index}"] = nn.ReLU()
            channels = out_channels
        layers[f"pool{stage_index}"] = nn.MaxPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(256 * 4 * 4, 1024)
    layers["fc1_relu"] = nn.ReLU()
    layers["fc1_dropout"] = nn.Dropout(dropout)
    layers["fc2"] = nn.Linear(1024, 512)
    layers["fc2_relu"] = nn.ReLU()
    layers["fc2_dropout"] = nn.Dropout(dropout)
    layers["classifier"] = nn.Linear(512, num_classes)
    return init_weights(ImageSizeCheckedSequential(layers, (32, 32)), init)


@register_model("vgg_gap")
def vgg_gap(
    num_classes: int = 10, in_channels: int = 3, channels: list[int] = (64, 64, 128, 128, 256, 256),
    hidden: int = 256, init: str = "default",
) -> nn.Module:
    """Pairs of 3x3 convs, each pair followed by 2x2 max-pooling, then global average pooling
    and one hidden Linear: the CNN backbone of the leader-follower paper's CIFAR-10 runs."""
    channels = list(channels)
    if not channels or len(channels) % 2 or not all(isinstance(c, int) and c > 0 for c in channels):
        raise ValueError(f"channels must be an even-length list of positive ints, got {channels!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    previous = in_channels
    for index, out_channels in enumerate(channels, start=1):
        layers[f"conv{index}"] = nn.Conv2d(previous, out_channels, kernel_size=3, padding=1)
        layers[f"relu{index}"] = nn.ReLU()
        previous = out_channels
        if index % 2 == 0:
            layers[f"pool{index // 2}"] = nn.MaxPool2d(2)
    layers["avgpool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc1"] = nn.Linear(previous, hidden)
    layers["fc1_relu"] = nn.ReLU()
    layers["classifier"] = nn.Linear(hidden, num_classes)
    return init_weights(nn.Sequential(layers), init)


# ------------------------------------------------------------------- step and spiking nets

@register_model("noisy_lenet")
def noisy_lenet(num_classes: int = 10, in_channels: int = 1, noise_std: float = 0.1,
                activation: str = "step", dropout: float = 0.5, init: str = "default") -> nn.Module:
    """The LFP authors' NoisyLeNet (nondifferentiable-act_lenet.ipynb, cell 9): conv 16-16
    (5x5, max-pool 2 each), fc 120-84 with dropout, on 28x28 MNIST (32x32 for 3 channels);
    input noise (InputNoise) before every conv and linear layer, the raw image and the
    output layer included. Their step is where(x > 0, sign x, 0): our Heaviside."""
    def act() -> nn.Module:
        return make_activation(activation)
    layers = OrderedDict(
        noise1=InputNoise(noise_std), conv1=nn.Conv2d(in_channels, 16, 5), act1=act(), pool1=nn.MaxPool2d(2, 2),
        noise2=InputNoise(noise_std), conv2=nn.Conv2d(16, 16, 5), act2=act(), pool2=nn.MaxPool2d(2, 2),
        flatten=nn.Flatten(),
        noise3=InputNoise(noise_std), fc1=nn.Linear(256 if in_channels == 1 else 400, 120), act3=act(),
        drop1=nn.Dropout(dropout),
        noise4=InputNoise(noise_std), fc2=nn.Linear(120, 84), act4=act(), drop2=nn.Dropout(dropout),
        noise5=InputNoise(noise_std), classifier=nn.Linear(84, num_classes),
    )
    size = (28, 28) if in_channels == 1 else (32, 32)
    return init_weights(ImageSizeCheckedSequential(layers, size), init)


SURROGATES = ("atan", "none")


class SpikeFunction(torch.autograd.Function):
    """Heaviside spike of (membrane - threshold). Backward: the arctan surrogate derivative
    (alpha / 2) / (1 + (pi / 2 * alpha * v)^2) as snnTorch, or "none": the true derivative,
    zero almost everywhere (plain gradient through the step)."""

    @staticmethod
    def forward(ctx, v, surrogate, alpha):
        ctx.save_for_backward(v)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        if ctx.surrogate == "none":
            return torch.zeros_like(grad), None, None
        a = ctx.alpha
        return grad * (a / 2) / (1 + (math.pi / 2 * a * v) ** 2), None, None


LIF_RESETS = ("decayed", "snntorch")


class LIF(nn.Module):
    """Leaky integrate-and-fire units; spike when mem > threshold, reset by subtraction
    (detached). Stateful over the time steps of one forward pass; the owning net calls
    reset() first. Marked as an activation so reward-based rules pass their reward from the
    spikes to the input current.

    reset "decayed": mem_t = beta (mem_{t-1} - thr s_{t-1}) + I_t (the threshold is taken off
    right after the spike, and the subtraction decays with the membrane).
    reset "snntorch": mem_t = beta mem_{t-1} + I_t - thr H(mem_{t-1} - thr), snnTorch 1.0's
    Leaky with reset_mechanism "subtract" and reset_delay True (leaky.py:196-244,
    neurons.py:102-108), which the LFP authors' spiking nets use."""

    bpfree_activation = True
    bpfree_membrane = True  # exposes (mem_before, mem, reset_term) of its last step to reward rules

    def __init__(self, beta: float = 0.9, threshold: float = 1.0, surrogate: str = "atan", alpha: float = 2.0,
                 reset: str = "decayed"):
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"unknown surrogate {surrogate!r}; choices: {', '.join(SURROGATES)}")
        if reset not in LIF_RESETS:
            raise ValueError(f"unknown LIF reset {reset!r}; choices: {', '.join(LIF_RESETS)}")
        self.beta, self.threshold, self.surrogate, self.alpha = float(beta), float(threshold), surrogate, float(alpha)
        self.reset_mode = reset
        self.mem: torch.Tensor | None = None
        self.step = 0
        self.last_step: tuple | None = None

    def reset(self) -> None:
        self.mem, self.step, self.last_step = None, 0, None

    def forward(self, current: torch.Tensor) -> torch.Tensor:
        if self.reset_mode == "snntorch":
            before = torch.zeros_like(current) if self.mem is None else self.mem
            reset_term = (before > self.threshold).to(current.dtype) * self.threshold
            mem = self.beta * before + current - reset_term
            self.mem, self.last_step = mem, (before.detach(), mem.detach(), reset_term)
            self.step += 1
            return SpikeFunction.apply(mem - self.threshold, self.surrogate, self.alpha)
        mem = current if self.mem is None else self.beta * self.mem + current
        spikes = SpikeFunction.apply(mem - self.threshold, self.surrogate, self.alpha)
        self.mem = mem - spikes.detach() * self.threshold
        self.step += 1
        return spikes

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}, surrogate={self.surrogate}, reset={self.reset_mode}"


class SumOverTime(nn.Module):
    """Sum of a (T, ...) stack over time (spike counts). A module, not a tensor op, so that
    reward-based rules split the reward over time steps in proportion to each step's share."""

    bpfree_proportional_pool = True

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked.sum(0)


READOUTS = ("count", "steps")


class SpikingNet(nn.Module):
    """Static input presented for `steps` time steps to Linear/Conv2d + LIF layers.

    readout "count": logits = the output neurons' spike counts (spike rate x steps), shape
    (batch, classes). readout "steps": the output spike train itself, shape (batch, classes,
    steps), for losses and rewards defined per time step (snnTorch's ce_rate_loss, the LFP
    authors' rate-coded reward); the predicted class is still the one with the most spikes."""

    def __init__(self, body: nn.Sequential, steps: int, readout: str = "count"):
        super().__init__()
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if readout not in READOUTS:
            raise ValueError(f"unknown spiking readout {readout!r}; choices: {', '.join(READOUTS)}")
        self.body, self.steps, self.readout_mode = body, int(steps), readout
        self.readout = SumOverTime()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in self.body.modules():
            if isinstance(m, LIF):
                m.reset()
        outputs = [self.body(x) for _ in range(self.steps)]
        if self.readout_mode == "steps":
            return torch.stack(outputs, dim=-1)
        return self.readout(torch.stack(outputs))


@register_model("spiking_mlp")
def spiking_mlp(num_classes: int = 10, in_features: int = 784, depth: int = 1, width: int = 256,
                steps: int = 25, beta: float = 0.9, surrogate: str = "atan", init: str = "default",
                reset: str = "decayed", readout: str = "count") -> nn.Module:
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    features = in_features
    for i in range(1, depth + 1):
        layers[f"fc{i}"] = nn.Linear(features, width)
        layers[f"lif{i}"] = LIF(beta, surrogate=surrogate, reset=reset)
        features = width
    layers["classifier"] = nn.Linear(features, num_classes)
    layers["lif_out"] = LIF(beta, surrogate=surrogate, reset=reset)
    return init_weights(SpikingNet(nn.Sequential(layers), steps, readout), init)


@register_model("spiking_convnet")
def spiking_convnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, steps: int = 25,
                    beta: float = 0.9, surrogate: str = "atan", init: str = "default") -> nn.Module:
    """conv 12 5x5 - pool - LIF - conv 64 5x5 - pool - LIF - fc - LIF (snnTorch tutorial net)."""
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for two 5x5 convs and two pools")
    layers = OrderedDict(
        conv1=nn.Conv2d(in_channels, 12, 5), pool1=nn.MaxPool2d(2), lif1=LIF(beta, surrogate=surrogate),
        conv2=nn.Conv2d(12, 64, 5), pool2=nn.MaxPool2d(2), lif2=LIF(beta, surrogate=surrogate),
        flatten=nn.Flatten(), classifier=nn.Linear(64 * side * side, num_classes),
        lif_out=LIF(beta, surrogate=surrogate),
    )
    return init_weights(SpikingNet(nn.Sequential(layers), steps), init)


@register_model("deepersnn")
def deepersnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, steps: int = 25,
              beta: float = 0.9, surrogate: str = "atan", reset: str = "snntorch",
              readout: str = "count", init: str = "default") -> nn.Module:
    """The LFP authors' DeeperSNN (lfprop 1.0.0 model/spiking_networks.py:353-487): five
    bias-free 3x3 convs (30, 150, 250, 200, 100 channels; padding 2, 1, 1, 2, 2), a 2x2
    max-pool after each of the first four, a bias-free linear head (2500 inputs at 32x32),
    a LIF after every conv and the head. Their NoisyWrapper noise is off in every SNN config
    (config_generator_snn_training.py: SNN_APPLY_NOISE [False]), so it is left out."""
    side = image_size
    for padding, pooled in ((2, True), (1, True), (1, True), (2, True), (2, False)):
        side = side + 2 * padding - 2
        side = side // 2 if pooled else side
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for deepersnn's four pools")

    def lif() -> LIF:
        return LIF(beta, surrogate=surrogate, reset=reset)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = [in_channels, 30, 150, 250, 200, 100]
    for i, (padding, pooled) in enumerate(((2, True), (1, True), (1, True), (2, True), (2, False)), start=1):
        layers[f"conv{i}"] = nn.Conv2d(channels[i - 1], channels[i], 3, padding=padding, bias=False)
        layers[f"lif{i}"] = lif()
        if pooled:
            layers[f"pool{i}"] = nn.MaxPool2d(2, 2)
    layers["flatten"] = nn.Flatten()
    layers["classifier"] = nn.Linear(100 * side * side, num_classes, bias=False)
    layers["lif_out"] = lif()
    body = ImageSizeCheckedSequential(layers, (image_size, image_size))
    return init_weights(SpikingNet(body, steps, readout), init)


# ---------------------------------------------------------------------------- ResNets

class ChannelPadShortcut(nn.Module):
    """He et al. 2016 option-A shortcut: subsample and zero-pad channels, no weights.

    Parameter-free, so every weighted layer of a CIFAR ResNet lies on the main path and
    a feedback rule never has to train a projection the paper's network does not have.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("a zero-padding shortcut cannot reduce the channel count")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; attribute names match torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.downsample: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.downsample = ChannelPadShortcut(in_channels, out_channels, stride)
        elif shortcut == "B":
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid shortcuts: A, B")
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.downsample(x)))


class ResNet(nn.Module):
    """Stem, stages of BasicBlocks, global pool, classifier; one forward for every ResNet here."""

    def __init__(
        self,
        stage_channels: tuple[int, ...],
        blocks_per_stage: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        shortcut: str = "B",
        stem: str = "cifar",
    ):
        super().__init__()
        first = stage_channels[0]
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, first, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            raise ValueError(f"unknown stem {stem!r}; valid stems: cifar, imagenet")
        self.bn1 = nn.BatchNorm2d(first)
        self.relu = nn.ReLU()
        self.num_stages = len(stage_channels)
        channels = first
        for index, (out_channels, blocks) in enumerate(zip(stage_channels, blocks_per_stage), start=1):
            stride = 1 if index == 1 else 2
            stage = []
            for block_index in range(blocks):
                stage.append(BasicBlock(channels, out_channels, stride if block_index == 0 else 1, shortcut))
                channels = out_channels
            setattr(self, f"layer{index}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def _cifar_resnet(num_classes: int, blocks: int, in_channels: int, shortcut: str, init: str) -> ResNet:
    model = ResNet((16, 32, 64), (blocks,) * 3, num_classes, in_channels, shortcut, stem="cifar")
    return init_weights(model, init)


@register_model("resnet20")
def resnet20(
    num_classes: int = 10, in_channels: int = 3, shortcut: str = "A", init: str = "default"
) -> nn.Module:
    """He et al. 2016 CIFAR ResNet-20 (0.27M params).

    Defaults to the paper's option-A (zero-padding) shortcut, which keeps all 20 weighted
    layers on the main path; shortcut="B" uses 1x1 conv + BN projections instead.
    """
    return _cifar_resnet(num_classes, 3, in_channels, shortcut, init)


@register_model("resnet56")
def resnet56(
    num_classes: int = 10, in_channels: int = 3, shortcut: str = "A", init: str = "default"
) -> nn.Module:
    """He et al. 2016 CIFAR ResNet-56 (0.85M params); shortcut as in resnet20."""
    return _cifar_resnet(num_classes, 9, in_channels, shortcut, init)


@register_model("resnet18")
def resnet18(
    num_classes: int = 10, in_channels: int = 3, cifar_stem: bool = True, init: str = "default"
) -> nn.Module:
    """torchvision's ResNet-18 with explicit Add modules; cifar_stem keeps small images' resolution.

    The weights are drawn by ``torchvision.models.resnet18(weights=None)`` and loaded
    strictly, so the init and state_dict keys are torchvision's; cifar_stem=True swaps
    the 7x7/2 conv + max-pool stem for a 3x3/1 conv (the usual CIFAR/Tiny-ImageNet variant).
    """
    stem = "cifar" if cifar_stem else "imagenet"
    model = ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, "B", stem)
    reference = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if cifar_stem or in_channels != 3:
        reference.conv1 = model.conv1  # no torchvision equivalent: initialise it the torchvision way
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.load_state_dict(reference.state_dict())
    return init_weights(model, init)


# ------------------------------------------------------------------------ Transformer

class SelfAttention(nn.Module):
    """Multi-head self-attention with its four projections as real nn.Linear calls.

    nn.MultiheadAttention uses its out_proj weight functionally, which a rule swapping
    Linear layers by class would silently miss.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` (B, T): true/1 for real tokens; padding keys get no attention."""
        batch, length, dim = x.shape
        keep = None
        if attention_mask is not None:
            if attention_mask.shape != (batch, length):
                raise ValueError(f"attention_mask must have shape {(batch, length)}, got {tuple(attention_mask.shape)}")
            keep = attention_mask.bool()[:, None, None, :]
        attended = F.scaled_dot_product_attention(
            self._split_heads(self.q_proj(x)),
            self._split_heads(self.k_proj(x)),
            self._split_heads(self.v_proj(x)),
            attn_mask=keep,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, dim))


class TransformerEncoderBlock(nn.Module):
    """Post-LN encoder block as in BERT: norm(x + attention(x)), then norm(x + ffn(x))."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.1):
        super().__init__()
        self.attention = SelfAttention(dim, heads, dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_residual = Add()
        self.attention_norm = nn.LayerNorm(dim)
        self.ffn1 = nn.Linear(dim, ffn_dim)
        self.ffn_activation = nn.GELU()
        self.ffn2 = nn.Linear(ffn_dim, dim)
        self.ffn_dropout = nn.Dropout(dropout)
        self.ffn_residual = Add()
        self.ffn_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        attended = self.attention_dropout(self.attention(x, attention_mask))
        x = self.attention_norm(self.attention_residual(attended, x))
        transformed = self.ffn_dropout(self.ffn2(self.ffn_activation(self.ffn1(x))))
        return self.ffn_norm(self.ffn_residual(transformed, x))


def trim_padding(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the columns past a batch's longest sequence (the last tensor is the attention mask).

    A split is padded to its longest sentence, a batch of SST-2 phrases rarely needs half of
    that, and attention and the feed-forward cost grow with the length: trimming makes a step
    2-4x cheaper. It changes no output: the trimmed columns are padding keys that receive no
    attention, each token's layers are per-token, and only the first token is read out.
    Only trailing padding is trimmed; a mask with a hole after a real token is left alone."""
    mask = tensors[-1]
    longest = int(mask.ne(0).sum(1).max())
    if longest == mask.shape[1] or bool(mask[:, longest:].ne(0).any()):
        return tensors
    return tuple(t[:, :max(longest, 1)] for t in tensors)


class BertClassifier(nn.Module):
    """A small BERT: embeddings, post-LN encoder blocks, tanh pooler on the first token."""

    def __init__(
        self,
        num_classes: int,
        vocab_size: int = 1000,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        ffn_dim: int = 128,
        max_len: int = 64,
        dropout: float = 0.1,
        type_vocab_size: int = 2,
    ):
        super().__init__()
        self.max_len = max_len
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.segment_embedding = nn.Embedding(type_vocab_size, dim)
        self.position_embedding = nn.Embedding(max_len, dim)
        self.embedding_norm = nn.LayerNorm(dim)
        self.embedding_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerEncoderBlock(dim, heads, ffn_dim, dropout) for _ in range(depth))
        self.pooler = nn.Linear(dim, dim)
        self.pooler_activation = nn.Tanh()
        self.classifier_dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``input_ids`` may also be the trainer's packed (B, 3, T) ids / segments / mask."""
        if input_ids.dim() == 3 and input_ids.shape[1] == 3 and token_type_ids is None and attention_mask is None:
            input_ids, token_type_ids, attention_mask = input_ids.unbind(1)
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be a (B, T) integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is not None and length > 1:
            input_ids, token_type_ids, attention_mask = trim_padding(input_ids, token_type_ids, attention_mask)
            length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.segment_embedding(token_type_ids) + self.position_embedding(positions)
        x = self.embedding_dropout(self.embedding_norm(x))
        for block in self.blocks:
            x = block(x, attention_mask)
        pooled = self.pooler_activation(self.pooler(x[:, 0]))
        return self.classifier(self.classifier_dropout(pooled))


@register_model("bert_classifier")
def bert_classifier(
    num_classes: int,
    vocab_size: int = 1000,
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    ffn_dim: int = 128,
    max_len: int = 64,
    dropout: float = 0.1,
    init: str = "default",
) -> nn.Module:
    """Small BERT-style sequence classifier; forward(input_ids, token_type_ids=None, attention_mask=None)."""
    model = BertClassifier(num_classes, vocab_size, dim, depth, heads, ffn_dim, max_len, dropout)
    return init_weights(model, init)
