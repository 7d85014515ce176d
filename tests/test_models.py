"""Architecture checks: the benchmark's numbers are only comparable if the nets match the papers."""
import pytest
import torch
import torchvision
from torch import nn

from bpfree.models import (
    ACTIVATIONS,
    Add,
    build_model,
    init_weights,
    list_models,
    model_options,
)

ALL_MODELS = (
    "mlp", "lenet_mnist", "lenet_cifar", "vgg_cifar",
    "resnet20", "resnet56", "resnet18", "bert_classifier",
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def weighted_layers(model, cls=(nn.Linear, nn.Conv2d)):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def parameter_count(model):
    return sum(p.numel() for p in model.parameters())


def example_input(name, batch=2):
    if name == "mlp":
        return (torch.randn(batch, 1, 28, 28),)
    if name == "lenet_mnist":
        return (torch.randn(batch, 1, 32, 32),)
    if name == "bert_classifier":
        input_ids = torch.randint(0, 1000, (batch, 8))
        token_type_ids = torch.zeros_like(input_ids)
        token_type_ids[:, 4:] = 1
        return (input_ids, token_type_ids)
    return (torch.randn(batch, 3, 32, 32),)


def test_registry_lists_every_model():
    assert set(ALL_MODELS) <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_shape_and_options(name):
    model = build_model(name, 7)
    assert model(*example_input(name, batch=3)).shape == (3, 7)
    assert "init" in model_options(name)


def test_resnet18_tiny_imagenet_shape():
    model = build_model("resnet18", 200)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 200)
    imagenet_stem = build_model("resnet18", 5, cifar_stem=False)
    assert imagenet_stem(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_gradients_reach_every_parameter(name):
    model = build_model(name, 5)
    model.train()
    model(*example_input(name, batch=4)).square().sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", ALL_MODELS)
def test_only_swappable_layer_types(name):
    allowed = (
        nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm, nn.Embedding,
        nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity,
        nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU,
    )
    for module in build_model(name, 3).modules():
        assert not isinstance(module, nn.MultiheadAttention)
        if not list(module.children()):
            assert isinstance(module, allowed) or type(module).__name__ in {"Add", "ChannelPadShortcut"}
            assert not getattr(module, "inplace", False), "in-place ops break backward hooks"


def test_no_layer_module_is_shared():
    """A rule keeps per-layer state (feedback, cached inputs): each layer must run once per pass."""
    for name in ALL_MODELS:
        model = build_model(name, 3)
        ids = [id(m) for _, m in model.named_modules(remove_duplicate=False)]
        assert len(ids) == len(set(ids)), name


# --------------------------------------------------------------------------- exact shapes

def conv_spec(model):
    return [(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
            for _, m in weighted_layers(model, nn.Conv2d)]


def linear_spec(model):
    return [(m.in_features, m.out_features) for _, m in weighted_layers(model, nn.Linear)]


def test_lenet_mnist_layers():
    model = build_model("lenet_mnist", 10)
    assert conv_spec(model) == [
        (1, 6, (5, 5), (1, 1), (0, 0)),
        (6, 16, (5, 5), (1, 1), (0, 0)),
        (16, 120, (5, 5), (1, 1), (0, 0)),
    ]
    assert linear_spec(model) == [(120, 84), (84, 10)]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 2
    assert any(isinstance(m, nn.Flatten) for m in model.modules())


def test_lenet_mnist_rejects_28x28_clearly():
    with pytest.raises(ValueError, match="32, 32"):
        build_model("lenet_mnist", 10)(torch.randn(2, 1, 28, 28))


def test_lenet_cifar_layers():
    model = build_model("lenet_cifar", 10)
    assert conv_spec(model) == [
        (3, 32, (3, 3), (1, 1), (0, 0)),
        (32, 64, (3, 3), (1, 1), (0, 0)),
        (64, 128, (3, 3), (1, 1), (0, 0)),
    ]
    assert linear_spec(model) == [(128, 256), (256, 10)]
    assert any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


def test_vgg_cifar_layers():
    model = build_model("vgg_cifar", 10, dropout=0.3)
    channels = [3, 32, 64, 128, 128, 256, 256]
    assert conv_spec(model) == [
        (cin, cout, (3, 3), (1, 1), (1, 1)) for cin, cout in zip(channels, channels[1:])
    ]
    assert linear_spec(model) == [(4096, 1024), (1024, 512), (512, 10)]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 3


# -------------------------------------------------------------------------------- ResNets

@pytest.mark.parametrize("name, blocks, params", [("resnet20", 9, 269_722), ("resnet56", 27, 853_018)])
def test_cifar_resnet_depth_and_size(name, blocks, params):
    model = build_model(name, 10)
    main_path = [n for n, _ in weighted_layers(model) if "downsample" not in n]
    assert len(main_path) == int(name[len("resnet"):])
    assert parameter_count(model) == params  # 0.27M / 0.85M as in He et al. 2016, option A
    assert len(weighted_layers(model)) == len(main_path), "option A shortcuts carry no weights"
    assert sum(isinstance(m, Add) for m in model.modules()) == blocks
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == len(main_path) - 1


def test_resnet20_option_b_adds_projections_off_the_main_path():
    model = build_model("resnet20", 10, shortcut="B")
    projections = [n for n, _ in weighted_layers(model) if "downsample" in n]
    assert len(projections) == 2
    assert len(weighted_layers(model)) == 22
    assert 0.26e6 < parameter_count(model) < 0.28e6
    with pytest.raises(ValueError, match="A, B"):
        build_model("resnet20", 10, shortcut="C")


def test_residual_adds_run_as_modules():
    model = build_model("resnet20", 10)
    calls = []
    for module in model.modules():
        if isinstance(module, Add):
            module.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 3, 32, 32))
    assert len(calls) == 9


def test_resnet18_matches_torchvision():
    reference = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    imagenet = build_model("resnet18", 10, cifar_stem=False).state_dict()
    assert {k: v.shape for k, v in imagenet.items()} == {k: v.shape for k, v in reference.items()}
    cifar = build_model("resnet18", 10)
    assert set(cifar.state_dict()) == set(reference)
    assert conv_spec(cifar)[0] == (3, 64, (3, 3), (1, 1), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity)
    assert sum(isinstance(m, Add) for m in cifar.modules()) == 8


# ---------------------------------------------------------------------------- Transformer

def test_bert_linear_count_and_blocks():
    depth = 3
    model = build_model("bert_classifier", 4, depth=depth, dim=32, heads=2, ffn_dim=48)
    assert len(weighted_layers(model, nn.Linear)) == depth * 6 + 2
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == depth
    block = model.blocks[0]
    assert [block.attention.q_proj.in_features, block.ffn1.out_features, block.ffn2.out_features] == [32, 48, 32]


def test_bert_padding_mask_hides_padding():
    """A padded sequence with its mask must score exactly like the unpadded sequence."""
    model = build_model("bert_classifier", 3, dim=32, heads=4, max_len=16).eval()
    short = torch.randint(1, 1000, (1, 5))
    padded = torch.cat([short, torch.randint(1, 1000, (1, 4))], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 4])
    batch = torch.cat([padded, torch.randint(1, 1000, (1, 9))])
    batch_mask = torch.cat([mask, torch.ones(1, 9, dtype=torch.long)])
    logits = model(batch, attention_mask=batch_mask)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits[:1], model(short))
    assert not torch.allclose(model(padded), model(short)), "without the mask padding must matter"


def test_bert_input_validation():
    model = build_model("bert_classifier", 2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="divisible"):
        build_model("bert_classifier", 2, dim=30, heads=4)


# ------------------------------------------------------------------------------------ MLP

@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_mlp_depth(depth):
    model = build_model("mlp", 10, depth=depth, width=16)
    layers = linear_spec(model)
    assert len(layers) == depth + 1
    assert layers[0][0] == 784 and layers[-1][1] == 10
    assert model(torch.randn(2, 784)).shape == (2, 10)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_activations(activation):
    model = build_model("mlp", 3, in_features=12, depth=2, width=8, activation=activation, bias=False)
    assert model(torch.randn(2, 3, 4)).shape == (2, 3)
    assert all(m.bias is None for _, m in weighted_layers(model))


def test_mlp_leaky_relu_slope():
    model = build_model("mlp", 2, depth=1, activation="leaky_relu", negative_slope=0.2)
    assert [m.negative_slope for m in model.modules() if isinstance(m, nn.LeakyReLU)] == [0.2]


# ----------------------------------------------------------------------- errors and init

def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'alexnet'") as info:
        build_model("alexnet", 10)
    for name in ALL_MODELS:
        assert name in str(info.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(ValueError, match="'widht'") as info:
        build_model("mlp", 10, widht=100)
    for option in ("in_features", "depth", "width", "activation", "bias", "init"):
        assert option in str(info.value)


def test_unknown_activation_lists_choices():
    with pytest.raises(ValueError, match="swish") as info:
        build_model("mlp", 10, activation="swish")
    for activation in ACTIVATIONS:
        assert activation in str(info.value)


def test_bad_num_classes_and_init_scheme():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("mlp", 0)
    with pytest.raises(ValueError, match="xavier_uniform"):
        build_model("mlp", 10, init="orthogonal")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_xavier_init_zeroes_biases(name):
    model = build_model(name, 4, init="xavier_uniform")
    layers = weighted_layers(model)
    assert layers
    for layer_name, layer in layers:
        if layer.bias is not None:
            assert torch.count_nonzero(layer.bias) == 0, layer_name
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        assert layer.weight.abs().max() <= bound + 1e-6, layer_name


def test_init_weights_default_keeps_weights():
    model = build_model("lenet_cifar", 10)
    before = [p.clone() for p in model.parameters()]
    assert init_weights(model, "default") is model
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_noisy_lenet_is_the_authors_net():
    """NoisyLeNet (LFP notebook, cell 9): 16-16 convs, 256-120-84-10, noise before every layer
    in training only, step units."""
    from bpfree.models import Heaviside, InputNoise
    torch.manual_seed(0)
    model = build_model("noisy_lenet", num_classes=10, noise_std=0.1)
    names = [n for n, _ in model.named_children()]
    layers = [n for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for layer in layers:  # every conv and linear layer has its noise right before it
        assert isinstance(getattr(model, names[names.index(layer) - 1]), InputNoise)
    assert [getattr(model, n).weight.shape[0] for n in layers] == [16, 16, 120, 84, 10]
    assert sum(isinstance(m, Heaviside) for m in model.modules()) == 4
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    assert torch.equal(model(x), model(x))  # no noise, no dropout at evaluation
    model.train()
    assert not torch.equal(model.noise1(x), x)
    with pytest.raises(ValueError, match="28, 28"):
        model(torch.randn(2, 1, 32, 32))


def test_bert_trims_a_batch_to_its_longest_sentence_without_changing_any_output():
    """Padding keys get no attention and only the first token is read out, so a batch cut at
    its longest sentence gives each sentence's own unpadded output (float64)."""
    from bpfree.models import build_model, trim_padding
    torch.manual_seed(0)
    model = build_model("bert_classifier", 3, vocab_size=100, dim=16, depth=2, heads=4, ffn_dim=32,
                        max_len=20, dropout=0.0).double().eval()
    lengths = [3, 7, 5, 2]
    mask = torch.zeros(4, 20, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = torch.randint(5, 100, (4, 20)) * mask
    segments = torch.zeros_like(ids)
    trimmed = trim_padding(ids, segments, mask)
    assert [t.shape[1] for t in trimmed] == [7, 7, 7]
    alone = torch.cat([model(ids[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(model(torch.stack([ids, segments, mask], 1)), alone, rtol=0, atol=1e-12)
    holed = mask.clone()
    holed[0, 10] = 1  # a real token after padding: nothing may be cut
    assert trim_padding(ids, segments, holed)[0].shape[1] == 20
