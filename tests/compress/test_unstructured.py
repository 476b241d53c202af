"""Magnitude pruning by masks, and the lottery-ticket procedure with rewinding."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.compress.unstructured import (
    lottery_ticket,
    magnitude_prune,
    remove_masks,
    sparsity_report,
)


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [model[0].weight, model[3].weight]


def test_global_prune_exact_sparsity_keeps_largest():
    model = _net()
    before = copy.deepcopy(model)
    pruned = magnitude_prune(model, 0.6)
    n = sum(w.numel() for w in _weights(model))  # 72 + 320
    n_zero = sum(int((w == 0).sum()) for w in _weights(pruned))
    assert n_zero == round(0.6 * n)
    # the kept weights are the n - k largest magnitudes of all layers together
    mags = torch.cat([w.detach().abs().flatten() for w in _weights(model)])
    kept = torch.cat([w.detach().abs().flatten()[w.flatten() != 0] for w in _weights(pruned)])
    torch.testing.assert_close(kept.sort().values, mags.sort().values[n_zero:])
    # survivors are untouched, the biases are not pruned, the input model is not modified
    for w0, w1 in zip(_weights(model), _weights(pruned), strict=True):
        torch.testing.assert_close(w1[w1 != 0], w0[w1 != 0])
    assert (pruned[0].bias != 0).all() and not hasattr(model[0], "weight_mask")
    torch.testing.assert_close(model.state_dict(), before.state_dict())
    rep = sparsity_report(pruned)
    assert rep["total"] == dict(numel=n, zeros=n_zero, sparsity=n_zero / n)
    assert set(rep["layers"]) == {"0.weight", "3.weight"}


def test_layer_scope_and_bias():
    pruned = magnitude_prune(_net(), 0.25, scope="layer", include_bias=True)
    for m in (pruned[0], pruned[3]):
        for t in (m.weight, m.bias):
            assert int((t == 0).sum()) == round(0.25 * t.numel())
        # each layer keeps its own largest entries
        assert m.weight[m.weight_mask == 0].abs().max() <= m.weight[m.weight_mask == 1].abs().min()


def test_masks_accumulate_and_never_shrink():
    p1 = magnitude_prune(_net(), 0.5)
    p2 = magnitude_prune(p1, 0.75)
    for a, b in ((p1[0], p2[0]), (p1[3], p2[3])):
        assert ((a.weight_mask == 0) <= (b.weight_mask == 0)).all()  # pruned stay pruned
    assert sparsity_report(p2)["total"]["zeros"] == round(0.75 * 392)
    with pytest.raises(ValueError, match="masks only grow"):
        magnitude_prune(p2, 0.5)
    with pytest.raises(ValueError, match="choose one of"):
        magnitude_prune(_net(), 0.5, scope="channel")


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=0.05),
], ids=["sgd-momentum", "adam"])
@pytest.mark.parametrize("copied", [False, True], ids=["pruned", "deepcopy-of-pruned"])
def test_pruned_weights_stay_zero_under_optimizer(make_opt, copied):
    model = magnitude_prune(_net(), 0.7)
    if copied:  # a deep copy loses tensor hooks: the masks must re-attach them
        model = copy.deepcopy(model)
    masks = [m.weight_mask.clone() for m in (model[0], model[3])]
    opt = make_opt(model.parameters())  # built on the pruned model's own parameters
    x, y = torch.randn(16, 2, 6, 6), torch.randint(0, 5, (16,))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for w, m in zip(_weights(model), masks, strict=True):
            assert (w.grad[m == 0] == 0).all()
        opt.step()
        for w, m in zip(_weights(model), masks, strict=True):  # read without a forward
            assert (w[m == 0] == 0).all() and (w[m == 1] != 0).all()


def test_remove_masks_keeps_outputs_and_keys():
    model = _net()
    pruned = magnitude_prune(model, 0.8, include_bias=True)
    x = torch.randn(3, 2, 6, 6)
    plain = remove_masks(pruned)
    torch.testing.assert_close(plain(x), pruned(x), rtol=0, atol=0)
    assert plain.state_dict().keys() == model.state_dict().keys()
    assert all(not m._forward_pre_hooks for m in plain.modules())
    fresh = _net()
    fresh.load_state_dict(plain.state_dict())  # strict
    assert sparsity_report(fresh)["total"]["sparsity"] == pytest.approx(0.8, abs=1e-2)
    # a dense-shaped pruned state dict loads into a model prepared with all-ones masks
    again = magnitude_prune(_net(), 0.0, include_bias=True)
    again.load_state_dict(pruned.state_dict())
    torch.testing.assert_close(again(x), pruned(x), rtol=0, atol=0)
    # no gradient masking remains: the freed weights can move again
    plain(x).sum().backward()
    assert (plain[3].weight.grad[plain[3].weight == 0] != 0).any()


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # 128 + 64 weights


class _Recorder:
    """A train_fn: records the weights it receives and after every step, trains 6 SGD steps."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        self.x, self.y = torch.randn(64, 8), torch.randint(0, 4, (64,))
        self.entry: list[dict] = []
        self.steps: list[dict] = []

    def __call__(self, model: nn.Module) -> float:
        self.entry.append({k: v.clone() for k, v in model.state_dict().items()})
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        for _ in range(6):
            model.train()
            loss = F.cross_entropy(model(self.x), self.y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.steps.append({k: v.clone() for k, v in model.state_dict().items()})
        model.eval()
        with torch.no_grad():
            return (model(self.x).argmax(1) == self.y).float().mean().item()


@pytest.mark.parametrize("k", [0, 3])
def test_lottery_ticket_rewinds_survivors(k):
    torch.manual_seed(0)
    init = _tiny().state_dict()
    rec = _Recorder()

    def build() -> nn.Module:
        torch.manual_seed(0)
        return _tiny()

    model, history = lottery_ticket(build, rec, rounds=2, sparsity_per_round=0.5,
                                    rewind_iteration=k)
    assert [h["round"] for h in history] == [0, 1, 2]
    assert [h["sparsity"] for h in history] == [0.0, 0.5, 0.75]
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in history)
    # the rewind point: the initialisation, or the weights after k steps of round 0
    rewind = init if k == 0 else rec.steps[k - 1]
    assert len(rec.entry) == 3
    for r in (1, 2):
        start = rec.entry[r]
        for name in ("0.weight", "2.weight", "0.bias", "2.bias"):
            mask = start.get(name + "_mask", torch.ones_like(start[name]))
            torch.testing.assert_close(start[name], rewind[name] * mask, rtol=0, atol=0)
    # masks accumulate: round 2 keeps a subset of round 1, and training kept the zeros
    m1, m2 = rec.entry[1]["0.weight_mask"], rec.entry[2]["0.weight_mask"]
    assert (m2 <= m1).all()
    assert sparsity_report(model)["total"]["sparsity"] == 0.75


def test_lottery_ticket_errors():
    with pytest.raises(ValueError, match="rewind"):
        lottery_ticket(_tiny, _Recorder(), rounds=1, sparsity_per_round=0.5, rewind_iteration=6)
    with pytest.raises(ValueError, match="sparsity_per_round"):
        lottery_ticket(_tiny, _Recorder(), rounds=1, sparsity_per_round=1.0)
