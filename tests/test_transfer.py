"""Transfer with sign preservation (LFP E5): shared pre-training, head swap, sign-flip count."""
import copy

import pytest
import torch
from torch import nn

from bpfree.config import ConfigError, resolve_experiment, run_configs, validate_params
from bpfree.models import build_model
from bpfree.pruning import sign_flip_fraction
from bpfree.transfer import output_layer_name, replace_output_layer, train_transfer


def tiny_run(rule="bp", seed=0, lr=0.05):
    return {"dataset": "mnist", "seed": seed, "threads": 1, "device": "cpu", "data_seed": 0,
            "model": {"name": "mlp", "options": {"in_features": 784, "depth": 1, "width": 16}},
            "rule": {"name": rule, "options": {}},
            "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.0, "weight_decay": 0.0, "nesterov": False},
            "schedule": {"name": "none"}, "batch_size": 256, "epochs": 1, "val_size": 0,
            "selection": "final", "preprocess": {"normalize": True, "resize": None},
            "train_subset": 2048, "test_subset": 1000, "diagnostics": {"every": 0, "batch": 1},
            "transfer": {"source_classes": [0, 1, 2, 3, 4], "target_classes": [5, 6, 7, 8, 9],
                         "source_epochs": 1}}


def test_head_swap_replaces_only_the_last_linear_deterministically():
    torch.manual_seed(0)
    model = build_model("lenet_mnist", num_classes=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = replace_output_layer(model, 3, seed=7)
    assert name == output_layer_name(model)
    head = model.get_submodule(name)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith(name + "."):
            assert torch.equal(v, after[k])
    other = build_model("lenet_mnist", num_classes=5)
    replace_output_layer(other, 3, seed=7)
    assert torch.equal(other.get_submodule(name).weight, head.weight)  # the seed fixes the new head
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_every_rule_of_a_seed_fine_tunes_the_same_pretrained_net(mnist):
    bp, lfp = train_transfer(tiny_run("bp"), mnist, "cpu"), train_transfer(tiny_run("lfp_eps"), mnist, "cpu")
    assert bp["status"] == lfp["status"] == "OK"
    assert bp["scalars"]["source_test_acc_pct"] == lfp["scalars"]["source_test_acc_pct"] > 80.0
    assert bp["final_test_acc"] > 60.0  # the new 5-way head learnt digits 5-9
    assert bp["sizes"]["source"]["train"] == bp["sizes"]["target"]["train"] == 2048
    for m in (bp, lfp):
        assert 0.0 <= m["scalars"]["sign_flip_pct"] <= 100.0
        assert m["transfer"]["replaced_head"] == output_layer_name(build_model("mlp", num_classes=5, in_features=784, depth=1, width=16))


def test_sign_flips_count_only_weights_and_can_be_large():
    a = {"w.weight": torch.tensor([[1.0, -1.0], [2.0, 0.0]]), "w.bias": torch.tensor([1.0, 1.0])}
    b = {"w.weight": torch.tensor([[-1.0, -1.0], [2.0, 3.0]]), "w.bias": torch.tensor([-1.0, -1.0])}
    assert sign_flip_fraction(a, b) == pytest.approx(2 / 4)  # biases are not counted


def test_a_large_gradient_step_flips_more_signs_than_a_tiny_one(mnist):
    big = train_transfer(tiny_run("bp", lr=0.5), mnist, "cpu")
    small = train_transfer(tiny_run("bp", lr=1e-5), mnist, "cpu")
    assert small["scalars"]["sign_flip_pct"] < big["scalars"]["sign_flip_pct"]
    assert small["scalars"]["sign_flip_pct"] < 0.5


@pytest.mark.parametrize("change, field", [
    ({"target_classes": [4, 5, 6]}, "target_classes"),       # overlaps the source classes
    ({"source_classes": [0, 10]}, "source_classes[1]"),      # MNIST has classes 0..9
    ({"source_classes": [3]}, "source_classes"),             # one class is no task
    ({"source_epochs": 0}, "source_epochs"),
    ({"source_rule": "nope"}, "source_rule"),
])
def test_bad_transfer_specs_name_the_field(params, change, field):
    p = copy.deepcopy(params)
    p["experiments"]["E5_mnist_transfer"]["transfer"].update(change)
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_params(p)


def test_transfer_experiment_resolves_with_its_spec(params):
    exp = resolve_experiment(params, "E5_mnist_transfer", "cpu")
    runs = run_configs(params, "E5_mnist_transfer", "cpu")
    assert {r["rule"]["name"] for r in runs} == {"bp", "lfp_eps"}
    assert all(r["transfer"] == exp["transfer"] for r in runs)


def test_cub_layout_is_read_with_its_official_split(tmp_path):
    from PIL import Image

    from bpfree import data

    root = tmp_path / "raw" / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    rows, labels, split = [], [], []
    image_id = 0
    for c, name in enumerate(classes):
        (root / "images" / name).mkdir(parents=True)
        for i, size in enumerate([(300, 200), (180, 260)]):
            image_id += 1
            rel = f"{name}/img_{i}.jpg"
            Image.new("RGB", size, (c * 120, i * 50, 9)).save(root / "images" / rel)
            rows.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if i == 0 else 0}")
    (root / "images.txt").write_text("\n".join(rows) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i + 1} {n}" for i, n in enumerate(classes)) + "\n")

    with pytest.raises(data.ChecksumError):  # no pinned release yet: refused unless asked
        data.prepare_dataset("cub200", tmp_path / "out", raw_dir=tmp_path / "raw")
    manifest = data.prepare_dataset("cub200", tmp_path / "out", raw_dir=tmp_path / "raw", allow_unpinned=True)
    assert manifest["class_names"] == ["Black footed Albatross", "Laysan Albatross"]
    loaded = data.load_prepared(tmp_path / "out")
    assert loaded.x_train.shape == (2, 3, 224, 224) and loaded.x_test.shape == (2, 3, 224, 224)
    assert loaded.y_train.tolist() == [0, 1] and loaded.y_test.tolist() == [0, 1]


def test_missing_or_corrupt_weights_give_one_clear_error(tmp_path, monkeypatch):
    from bpfree.data import ChecksumError, MissingDataError
    from bpfree.data import weights

    monkeypatch.setenv("BPFREE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingDataError, match="resnet18-f37072fd.pth"):
        weights.locate_weights("resnet18_imagenet", tmp_path)
    bad = tmp_path / "weights" / "resnet18-f37072fd.pth"
    bad.parent.mkdir()
    bad.write_bytes(b"not weights")
    with pytest.raises(ChecksumError, match="f37072fd"):
        weights.locate_weights("resnet18_imagenet", tmp_path)
    with pytest.raises(MissingDataError, match="unknown pre-trained weights"):
        weights.locate_weights("vgg_nope", tmp_path)


def test_pretrained_transfer_loads_every_weight_then_swaps_the_head(tmp_path, monkeypatch, mnist):
    """A stand-in weights file (an MLP's state dict, registered with its own hash) takes the
    same path as the ImageNet ResNet-18: located, hash-checked, loaded strictly."""
    import hashlib

    from bpfree.data import weights

    torch.manual_seed(3)
    source = build_model("mlp", num_classes=10, in_features=784, depth=1, width=16)
    path = tmp_path / "weights" / "mlp-test.pth"
    path.parent.mkdir()
    torch.save(source.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    fake = weights.PretrainedWeights("mlp_test", "mlp", {}, 10, "mlp-test.pth", "https://example.invalid", digest)
    monkeypatch.setitem(weights.PRETRAINED, "mlp_test", fake)
    monkeypatch.setenv("BPFREE_DATA_DIR", str(tmp_path))
    run = tiny_run("bp", lr=1e-6)
    run["transfer"] = {"pretrained": "mlp_test", "target_classes": [5, 6, 7, 8, 9]}
    m = train_transfer(run, mnist, "cpu")
    assert m["status"] == "OK" and "source_test_acc_pct" not in m["scalars"]
    assert m["scalars"]["sign_flip_pct"] < 0.5  # a tiny lr barely moves the loaded weights
    assert m["transfer"]["pretrained"] == "mlp_test" and m["sizes"].keys() == {"target"}


def test_transfer_needs_exactly_one_source(params):
    p = copy.deepcopy(params)
    p["experiments"]["E5_mnist_transfer"]["transfer"]["pretrained"] = "resnet18_imagenet"
    with pytest.raises(ConfigError, match="exactly one"):
        validate_params(p)
    p = copy.deepcopy(params)
    p["experiments"]["E5_cub_resnet18"]["model"] = {"name": "vgg_cifar", "options": {}}
    with pytest.raises(ConfigError, match="holds resnet18 weights"):
        validate_params(p)


def test_torchvision_resnet18_weights_load_strictly_into_the_imagenet_stem_model():
    """The layout the ImageNet file has: every key and shape of torchvision's ResNet-18."""
    import torchvision

    from bpfree.data.weights import PRETRAINED

    spec = PRETRAINED["resnet18_imagenet"]
    reference = torchvision.models.resnet18(weights=None, num_classes=spec.num_classes)
    model = build_model(spec.model, num_classes=spec.num_classes, **spec.model_options)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    reference.eval(), model.eval()
    assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_weights_are_pinned_by_their_whole_sha256(tmp_path, monkeypatch):
    """A file whose sha256 shares the name's 8 hex digits but not the rest is refused: the
    prefix torchvision checks is not a pin."""
    import hashlib
    from dataclasses import replace

    from bpfree.data import ChecksumError
    from bpfree.data import weights

    monkeypatch.setenv("BPFREE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert len(weights.PRETRAINED["resnet18_imagenet"].sha256) == 64
    blob = b"stand-in weights"
    digest = hashlib.sha256(blob).hexdigest()
    spec = replace(weights.PRETRAINED["resnet18_imagenet"], file="w.pth", sha256=digest[:8] + "0" * 56)
    monkeypatch.setitem(weights.PRETRAINED, "resnet18_imagenet", spec)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(blob)
    with pytest.raises(ChecksumError, match="is not"):
        weights.locate_weights("resnet18_imagenet", tmp_path)
    monkeypatch.setitem(weights.PRETRAINED, "resnet18_imagenet", replace(spec, sha256=digest))
    assert weights.locate_weights("resnet18_imagenet", tmp_path).name == "w.pth"
