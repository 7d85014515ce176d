"""Pruning curves, Gini coefficients and sign-flip fractions (LFP paper E3/E5 measures)."""
import pytest
import torch
from torch import nn

from bpfree.pruning import (gini, layer_gini, pruning_curve, pruning_masks, relevance_scores,
                            sign_flip_fraction)


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5), nn.ReLU(),
                         nn.Linear(5, 2))


def test_gini_known_values():
    assert gini(torch.ones(10)) == pytest.approx(0.0)
    one_hot = torch.zeros(100)
    one_hot[3] = 5.0
    assert gini(one_hot) == pytest.approx(0.99)
    assert gini(torch.tensor([1.0, 3.0])) == pytest.approx(0.25)  # (|1-3|) / (2 * 2 * mean 2)
    assert gini(-torch.ones(4)) == pytest.approx(0.0)  # of |w|
    assert gini(torch.zeros(3)) == 0.0


@pytest.mark.parametrize("method", ["global_magnitude", "layer_magnitude"])
def test_masks_remove_exactly_the_fraction_and_the_smallest(method):
    model = net()
    masks = pruning_masks(model, 0.3, method)
    total = sum(m.numel() for m in masks.values())
    removed = sum(int((~m).sum()) for m in masks.values())
    assert removed == round(0.3 * total) or method == "layer_magnitude"
    layers = dict((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    if method == "global_magnitude":
        kept = torch.cat([layers[n].weight.detach().abs()[m] for n, m in masks.items()])
        gone = torch.cat([layers[n].weight.detach().abs()[~m] for n, m in masks.items()])
        assert gone.max() <= kept.min()
    else:
        for n, m in masks.items():
            assert int((~m).sum()) == round(0.3 * m.numel())


def test_curve_restores_the_model_and_starts_unpruned():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 1, 6, 6)
    ref = model(x).detach()

    def evaluate(m):
        return float((m(x) - ref).abs().sum().detach())

    curve = pruning_curve(model, evaluate, "global_magnitude", fractions=[0.0, 0.5, 1.0])
    assert [c["fraction"] for c in curve] == [0.0, 0.5, 1.0]
    assert curve[0]["value"] == 0.0 and curve[1]["value"] > 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_relevance_scores_prune_the_least_relevant_and_leave_no_trace():
    model = net()
    x, y = torch.randn(16, 1, 6, 6), torch.randint(0, 2, (16,))
    scores = relevance_scores(model, x, y)
    assert set(scores) == {"0", "3", "5"}
    assert all(p.grad is None for p in model.parameters())
    assert type(model[0]) is nn.Conv2d  # the rule was removed again
    masks = pruning_masks(model, 0.5, "relevance", scores)
    flat = torch.cat([scores[n][~m] for n, m in masks.items()])
    kept = torch.cat([scores[n][m] for n, m in masks.items()])
    assert flat.max() <= kept.min()


def test_sign_flip_fraction():
    a = {"0.weight": torch.tensor([[1.0, -1.0], [2.0, 3.0]]), "0.bias": torch.tensor([1.0, 1.0])}
    b = {"0.weight": torch.tensor([[1.0, 1.0], [-2.0, 3.0]]), "0.bias": torch.tensor([-1.0, -1.0])}
    assert sign_flip_fraction(a, b) == 0.5  # biases are not counted
    assert sign_flip_fraction(a, a) == 0.0


def test_layer_gini_and_bad_method():
    model = net()
    g = layer_gini(model)
    assert set(g) == {"0", "3", "5"} and all(0 <= v < 1 for v in g.values())
    with pytest.raises(ValueError, match="unknown pruning method"):
        pruning_masks(model, 0.1, "random")
    with pytest.raises(ValueError, match="needs scores"):
        pruning_masks(model, 0.1, "relevance")


def test_pruning_test_draw_is_seeded_and_spans_classes():
    from bpfree.summary import pruning_test_indices
    labels = torch.arange(10).repeat_interleave(200)  # a test subset ordered by class
    pick = pruning_test_indices(len(labels), 500)
    assert torch.equal(pick, pruning_test_indices(len(labels), 500))  # same draw every time
    assert len(pick) == 500 and len(set(pick.tolist())) == 500
    assert torch.equal(pick, pick.sort().values)
    assert set(labels[pick].tolist()) == set(range(10))  # the first 500 would be 2.5 classes
    assert len(pruning_test_indices(len(labels), 10**6)) == len(labels)
