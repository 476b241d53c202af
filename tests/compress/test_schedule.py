"""Pruning with training: iterative prune / fine-tune stages and MaskSparsity."""

import json

import pytest
import torch
from torch import nn

from cnnkit.compress.graph import dependency_groups
from cnnkit.compress.prune import apply_history, prune
from cnnkit.compress.schedule import MaskSparsity, iterative_prune
from cnnkit.models import create_model
from cnnkit.training import TrainConfig, Trainer

X32 = (2, 3, 32, 32)


def _perturb(model: nn.Module) -> nn.Module:
    """A stand-in for fine-tuning: every weight changes, so stages are told apart."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1).add_(0.01)
    return model


def _out_channels(model: nn.Module) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("global_ranking", [False, True])
def test_iterative_prune_follows_the_geometric_schedule(global_ranking):
    model = create_model("resnet18", img_size=32, num_classes=10, stem="small")
    x = torch.randn(1, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def finetune(m: nn.Module) -> nn.Module:
        seen.append(m)
        return _perturb(m)

    final = iterative_prune(model, 0.6, 3, finetune, "l2", x, global_ranking=global_ranking)
    assert len(seen) == 3 and final is seen[-1]
    assert {h["step"] for h in final.pruning_history} == {0, 1, 2}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    groups = [g for g in dependency_groups(model, x) if g.prunable]
    original = sum(g.channels for g in groups)
    if global_ranking:
        # The total after stage s is total - int((1 - 0.4 ** (s / 3)) * total) (last: 0.6).
        for s, m in enumerate(seen, 1):
            g_now = [g for g in dependency_groups(m, x) if g.prunable]
            removed = 0.6 if s == 3 else 1 - 0.4 ** (s / 3)
            assert sum(g.channels for g in g_now) == original - int(removed * original)
    else:
        # Every group lands where one-shot pruning puts it, through 0.4 ** (1/3) per stage.
        one_shot = prune(model, 0.6, "l2", x)
        assert _out_channels(final) == _out_channels(one_shot)
        for s, m in enumerate(seen, 1):
            removed = 0.6 if s == 3 else 1 - 0.4 ** (s / 3)
            assert sorted(g.channels for g in dependency_groups(m, x) if g.prunable) == sorted(
                g.channels - int(removed * g.channels) for g in groups)


def test_iterative_history_replays_the_final_model_exactly():
    kwargs = dict(img_size=32, num_classes=10, stem="small")
    model = create_model("resnet18", **kwargs).eval()
    x = torch.randn(*X32)
    final = iterative_prune(model, 0.5, 2, _perturb, "l1", x[:1]).eval()
    history = json.loads(json.dumps(final.pruning_history))  # JSON-safe
    assert {h["step"] for h in history} == {0, 1}
    rebuilt = apply_history(create_model("resnet18", **kwargs), history).eval()
    rebuilt.load_state_dict(final.state_dict())  # strict: every shape matches
    with torch.no_grad():
        assert torch.equal(rebuilt(x), final(x))
    # Without fine-tuning, replaying on the original weights is the same network.
    same = iterative_prune(model, 0.5, 2, lambda m: m, "l1", x[:1])
    replayed = apply_history(model, same.pruning_history)
    want, got = same.state_dict(), replayed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_iterative_prune_rejects_bad_arguments():
    model, x = create_model("tinyvgg", img_size=32), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        iterative_prune(model, 1.0, 2, lambda m: m, example_inputs=x)
    with pytest.raises(ValueError, match="steps"):
        iterative_prune(model, 0.5, 0, lambda m: m, example_inputs=x)
    with pytest.raises(ValueError, match="must return"):
        iterative_prune(model, 0.5, 2, lambda m: None, example_inputs=x)


def _bn_net() -> nn.Module:
    """Two conv-BN-ReLU blocks on 1x8x8 digits, 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 16, 10))


def _selected(reg: MaskSparsity) -> dict[str, list[int]]:
    """Layer index -> selected channels, read from the plan (pruning-history entries)."""
    out = {}
    for entry in reg.plan:
        drop = sorted(set(range(entry["channels"])) - set(entry["kept"]))
        for name, kind, _, _ in entry["members"]:
            if kind in ("bn", "out"):
                out[name] = drop
    return out


def test_mask_sparsity_penalises_only_the_selected_bn_scales():
    net = _bn_net()
    with torch.no_grad():
        for i in (1, 5):
            net[i].weight.copy_(torch.tensor([-1.5, -0.9, -0.4, 0.1, 0.6, 1.1, 1.6, 2.1]))
    reg = MaskSparsity(net, 0.5, "bn_scale", torch.randn(1, 1, 8, 8), strength=0.3)
    selected = _selected(reg)
    assert selected["1"] == selected["5"] == [1, 2, 3, 4]  # |gamma| 0.9, 0.4, 0.1, 0.6
    expected = 0.3 * sum(net[i].weight[selected[str(i)]].abs().sum() for i in (1, 5))
    penalty = reg(net)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for i in (1, 5):
        grad, sign = net[i].weight.grad, net[i].weight.detach().sign()
        mask = torch.zeros(8, dtype=torch.bool)
        mask[selected[str(i)]] = True
        torch.testing.assert_close(grad[mask], 0.3 * sign[mask])
        assert torch.equal(grad[~mask], torch.zeros(4))  # unselected: exactly no pull
    assert net[0].weight.grad is None and net[4].weight.grad is None  # only BN scales
    pruned = reg.prune(net)
    assert [h["kept"] for h in pruned.pruning_history] == [[0, 5, 6, 7]] * 2


def test_mask_sparsity_without_bn_uses_filter_norms():
    model = create_model("tinyvgg", img_size=32, width=6)
    reg = MaskSparsity(model, 0.5, "l1", strength=2.0)
    selected = _selected(reg)
    convs = [f"features.conv_{b}_{c}" for b in (1, 2) for c in (1, 2)]
    assert sorted(selected) == convs and all(len(v) == 3 for v in selected.values())
    expected = 2.0 * sum(model.get_submodule(n).weight[selected[n]].flatten(1).norm(dim=1).sum()
                         for n in convs)
    penalty = reg(model)
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    for n in convs:
        grad = model.get_submodule(n).weight.grad
        keep = sorted(set(range(6)) - set(selected[n]))
        assert torch.equal(grad[keep], torch.zeros_like(grad[keep]))
        assert grad[selected[n]].flatten(1).norm(dim=1).min() > 0
    assert model.fc.weight.grad is None


@pytest.mark.parametrize("kind", ["bn", "filter"])
def test_trainer_regularizer_shrinks_only_the_selected_channels(kind, tmp_path):
    """One epoch on digits with a strong MaskSparsity penalty through Trainer(regularizer=)."""
    # Registered models, as the Trainer must be able to rebuild what it saves.
    name, kwargs = ("wide_resnet", {"depth": 10, "widen_factor": 1}) if kind == "bn" else (
        "tinyvgg", {})
    model = create_model(name, num_classes=10, in_chans=1, img_size=8, **kwargs)
    reg = MaskSparsity(model, 0.5, criterion="l1" if kind == "filter" else "bn_scale",
                       example_inputs=torch.randn(1, 1, 8, 8), strength=1.0)

    def sizes() -> dict[str, torch.Tensor]:  # |gamma| or filter norm per channel
        weights = {n: model.get_submodule(n).weight.detach() for n, _, _ in reg.targets}
        return {n: w.reshape(len(w), -1).norm(dim=1) for n, w in weights.items()}

    start = sizes()
    cfg = TrainConfig(model=name, model_kwargs=kwargs, data="digits", epochs=1, batch_size=64,
                      optimizer="sgd", warmup_epochs=0, runs_dir=str(tmp_path))
    trainer = Trainer(cfg, progress=False, model=model, regularizer=reg)
    trainer.fit()
    end = sizes()
    assert {k for _, k, _ in reg.targets} == {kind}
    for name, _, index in reg.targets:
        ratio = end[name] / start[name]
        chosen = torch.zeros(len(ratio), dtype=torch.bool)
        chosen[index] = True
        assert ratio[chosen].max() < 0.25, name  # pulled to about 0
        assert ratio[~chosen].min() > 0.75, name  # left to the task loss
