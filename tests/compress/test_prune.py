"""Structured pruning: dependency groups, surgery invariant, criteria and history replay."""

import copy
import json

import pytest
import torch
from torch import nn

from cnnkit.compress.graph import Member, dependency_groups
from cnnkit.compress.prune import (
    apply_history,
    criteria,
    get_criterion,
    prune,
    register_criterion,
)
from cnnkit.layers.ops import UnknownOperator
from cnnkit.models import create_model

X32 = (2, 3, 32, 32)
MODELS = {
    "resnet18": dict(img_size=32, num_classes=10, stem="small"),
    "vgg11_bn": dict(img_size=32, num_classes=10),
    "mobilenet_v2": dict(img_size=32, num_classes=10),
    "densenet121": dict(img_size=32, num_classes=10),
    "tinyvgg": dict(img_size=32),
    "resnet50": dict(img_size=32, num_classes=10, stem="small"),  # bottlenecks
    "segnet": dict(img_size=32),  # max-unpool pairs encoder and decoder channels
}


def _zeroed(model: nn.Module, history: list[dict]) -> nn.Module:
    """The unpruned model with the removed channels' filters, biases and BN affine zeroed,
    so each removed channel is exactly 0 wherever it flows."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for entry in history:
            drop = torch.tensor(sorted(set(range(entry["channels"])) - set(entry["kept"])))
            for name, kind, offset, _ in entry["members"]:
                m = modules[name]
                if kind in ("out", "bn", "dw"):
                    m.weight[offset + drop] = 0
                    if m.bias is not None:
                        m.bias[offset + drop] = 0
    return ref


def _groups_by_out(groups):
    return {m.name: g for g in groups for m in g.members if m.kind == "out"}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_equals_zeroed_original(name, randomise_bn):
    model = randomise_bn(create_model(name, **MODELS[name]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(*X32)
    pruned = prune(model, 0.5, example_inputs=x).eval()
    with torch.no_grad():
        expected = _zeroed(model, pruned.pruning_history)(x)
        got = pruned(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-2  # the comparison is not between two zero tensors
    # A real dense shrink (both conv dims halved: about 4x), and the original untouched.
    assert _params(pruned) < _params(model) / 2.3
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if name != "segnet":  # the Classifier contract still describes the pruned network
        with torch.no_grad():
            feats = pruned.forward_features(x)
        assert feats.shape[1] == pruned.feature_info[-1]["num_chs"]
        assert feats.shape[1] < model.feature_info[-1]["num_chs"]


def test_resnet_residual_stream_is_one_group():
    model = create_model("resnet18", **MODELS["resnet18"]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = dependency_groups(model, torch.randn(1, 3, 32, 32))
    # Read-only: the training flag and every BN statistic are as they were.
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    stem = _groups_by_out(groups)["conv1"]
    # conv1 and both layer1 blocks' conv2 write into one residual stream, read by every
    # layer1 conv1 and by layer2's first block (main path and downsample).
    assert set(stem.members) == {
        Member("conv1", "out"), Member("bn1", "bn"),
        Member("layer1.0.conv2", "out"), Member("layer1.0.bn2", "bn"),
        Member("layer1.1.conv2", "out"), Member("layer1.1.bn2", "bn"),
        Member("layer1.0.conv1", "in"), Member("layer1.1.conv1", "in"),
        Member("layer2.0.conv1", "in"), Member("layer2.0.downsample.0", "in"),
    }
    assert stem.channels == 64 and stem.prunable
    last = _groups_by_out(groups)["layer4.0.downsample.0"]
    assert {m.name for m in last.members if m.kind == "out"} == {
        "layer4.0.downsample.0", "layer4.0.conv2", "layer4.1.conv2"}
    assert Member("fc", "in") in last.members  # global pool: one feature per channel
    # 1 stem stream + 3 later streams + 8 block-internal groups prunable; the logits not.
    assert sum(g.prunable for g in groups) == 12
    assert not _groups_by_out(groups)["fc"].prunable


def test_densenet_concat_offsets():
    model = create_model("densenet121", **MODELS["densenet121"])
    groups = _groups_by_out(dependency_groups(model, torch.randn(1, 3, 32, 32)))
    block = "features.denseblock1"
    g = groups[f"{block}.denselayer3.conv2"]
    # Block 1 starts with 64 channels; layer k's 32 new maps sit at 64 + 32 (k - 1) in the
    # concatenation read by layers k+1..6 and by the transition.
    expected = {Member(f"{block}.denselayer3.conv2", "out")}
    for k in range(4, 7):
        expected |= {Member(f"{block}.denselayer{k}.norm1", "bn", 128),
                     Member(f"{block}.denselayer{k}.conv1", "in", 128)}
    expected |= {Member("features.transition1.norm", "bn", 128),
                 Member("features.transition1.conv", "in", 128)}
    assert set(g.members) == expected and g.channels == 32
    # The last layer of the last block feeds norm5 and the classifier at 512 + 15 * 32.
    head = groups["features.denseblock4.denselayer16.conv2"]
    assert set(head.members) == {Member("features.denseblock4.denselayer16.conv2", "out"),
                                 Member("features.norm5", "bn", 992),
                                 Member("classifier", "in", 992)}


def test_mobilenet_depthwise_coupling():
    model = create_model("mobilenet_v2", **MODELS["mobilenet_v2"])
    groups = _groups_by_out(dependency_groups(model, torch.randn(1, 3, 32, 32)))
    g = groups["features.2.conv.0.0"]  # expansion 16 -> 96, depthwise, projection
    assert set(g.members) == {
        Member("features.2.conv.0.0", "out"), Member("features.2.conv.0.1", "bn"),
        Member("features.2.conv.1.0", "dw"), Member("features.2.conv.1.1", "bn"),
        Member("features.2.conv.2", "in")}
    assert g.channels == 96
    # Block 1 has no expansion: its depthwise conv shares the stem's channels.
    assert Member("features.1.conv.0.0", "dw") in groups["features.0.0"].members
    # Blocks 2 and 3 (24 channels, stride 1) share a residual stream.
    assert Member("features.3.conv.2", "out") in groups["features.2.conv.2"].members


def _small_vgg() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def test_parameter_count_after_half_pruning():
    pruned = prune(_small_vgg(), 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    # 8 -> 4 and 16 -> 8 channels; each kept channel is 16 flattened features.
    expected = (3 * 4 * 9 + 4) + 2 * 4 + (4 * 8 * 9 + 8) + 2 * 8 + (8 * 16 * 10 + 10)
    assert _params(pruned) == expected
    assert pruned[8].in_features == 128 and pruned[8].out_features == 10


def _hand_set_net() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(2, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                        nn.Conv2d(3, 1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[3.0, -4.0], [1.0, 1.0], [0.0, -6.0]])[..., None, None])
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    return net


def test_criterion_values_on_hand_set_weights():
    net = _hand_set_net()
    x = torch.randn(1, 2, 4, 4)
    group = next(g for g in dependency_groups(net, x) if g.prunable)
    torch.testing.assert_close(get_criterion("l1")(group, net, None),
                               torch.tensor([7.0, 2.0, 6.0]))
    torch.testing.assert_close(get_criterion("l2")(group, net, None),
                               torch.tensor([5.0, 2.0 ** 0.5, 6.0]))
    torch.testing.assert_close(get_criterion("bn_scale")(group, net, None),
                               torch.tensor([0.5, 2.0, 1.0]))
    # Pruning one of three channels drops the lowest score's channel.
    assert prune(net, 0.34, "l1", x).pruning_history[0]["kept"] == [0, 2]
    assert prune(net, 0.34, "bn_scale", x).pruning_history[0]["kept"] == [1, 2]


def test_random_criterion_is_seeded_and_registry_guards():
    net, x = _small_vgg(), torch.randn(1, 3, 8, 8)
    a = prune(net, 0.5, "random", x, data=1).pruning_history
    assert a == prune(net, 0.5, "random", x, data=1).pruning_history
    assert a != prune(net, 0.5, "random", x, data=2).pruning_history
    assert {"l1", "l2", "bn_scale", "random"} <= set(criteria())
    with pytest.raises(ValueError, match="already registered"):
        register_criterion("l1")(lambda g, m, d: torch.ones(g.channels))
    with pytest.raises(ValueError, match="choose from"):
        prune(net, 0.5, "nope", x)


def test_global_ranking_threshold_and_round_to():
    model = create_model("tinyvgg", img_size=32, width=16)
    x = torch.randn(1, 3, 32, 32)
    pruned = prune(model, 0.5, example_inputs=x, global_ranking=True)
    kept = [len(h["kept"]) for h in pruned.pruning_history]
    # Four groups of 16: one threshold removes 32 of 64 channels, at least one kept each.
    removed = sum(h["channels"] - len(h["kept"]) for h in pruned.pruning_history)
    assert removed == 32 and all(k >= 1 for k in kept)
    rounded = prune(model, 0.3, example_inputs=x, round_to=8)
    assert rounded.features.conv_1_1.out_channels == 16  # 16 - 4 = 12 rounds up to 16
    assert prune(model, 0.6, example_inputs=x, round_to=4).features.conv_1_1.out_channels == 8


def test_global_ranking_on_hand_set_scores():
    net = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.ReLU(),
                        nn.Conv2d(4, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.ones(4, 1, 1, 1))  # l1 [1, 1, 1, 1] -> normalised 1 each
        net[2].weight.copy_(torch.diag(torch.tensor([1.0, 2, 3, 10]))[..., None, None])
    # Second group normalised by its mean 4: [0.25, 0.5, 0.75, 2.5]. Removing 4 of 8 takes
    # those three and one tied 1.0 (ties keep the earlier channel: group one loses channel 3).
    history = prune(net, 0.5, example_inputs=torch.randn(1, 1, 2, 2),
                    global_ranking=True).pruning_history
    assert [h["kept"] for h in history] == [[0, 1, 2], [3]]


def test_apply_history_rebuilds_identical_state_dict():
    kwargs = MODELS["resnet18"]
    model = create_model("resnet18", **kwargs)
    x = torch.randn(1, 3, 32, 32)
    pruned = prune(prune(model, 0.3, example_inputs=x), 0.25, "l2", x, global_ranking=True)
    history = json.loads(json.dumps(pruned.pruning_history))  # JSON-safe, no pickle
    assert {h["step"] for h in history} == {0, 1}
    base = create_model("resnet18", **kwargs)
    base.load_state_dict(model.state_dict())
    rebuilt = apply_history(base, history)
    want, got = pruned.state_dict(), rebuilt.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_unknown_ops_keep_channels_whole(randomise_bn):
    # An SE gate multiplies the stream by a per-channel scale: the analysis cannot pair it,
    # so the gated channels stay, and pruning still matches the zeroed reference.
    model = randomise_bn(create_model("mobilenet_v2", attn="se", **MODELS["mobilenet_v2"]))
    x = torch.randn(*X32)
    groups = _groups_by_out(dependency_groups(model, x))
    assert not groups["features.2.conv.0.0"].prunable  # expansion feeds the gated dw output
    assert groups["features.2.conv.3"].prunable  # the projection after the gate
    pruned = prune(model, 0.5, example_inputs=x).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(model, pruned.pruning_history)(x),
                                   atol=1e-5, rtol=0)


class _SharedConv(nn.Module):
    """``c2`` is called on two different producers' outputs (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.c2, self.c4 = nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(5, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.c1(x))) + self.c2(torch.relu(self.c3(x)))
        return self.c4(torch.relu(y))


def test_weight_sharing_blocks_conflicting_plans():
    net, x = _SharedConv().eval(), torch.randn(2, 3, 8, 8)
    groups = _groups_by_out(dependency_groups(net, x))
    # c2's input channels cannot follow both c1's and c3's plans: both stay whole.
    assert not groups["c1"].prunable and not groups["c3"].prunable
    assert groups["c2"].prunable and not groups["c4"].prunable  # c4 writes the output
    pruned = prune(net, 0.4, example_inputs=x)
    assert (pruned.c1.out_channels, pruned.c2.out_channels, pruned.c4.in_channels) == (6, 3, 3)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(net, pruned.pruning_history)(x),
                                   atol=1e-5, rtol=0)


def test_bad_arguments_and_mismatched_history_raise():
    net, x = _small_vgg(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        prune(net, 1.0, example_inputs=x)
    with pytest.raises(ValueError, match="example_inputs"):
        prune(net, 0.5)  # a plain Sequential has no default_cfg
    history = prune(create_model("tinyvgg", img_size=32), 0.5).pruning_history
    with pytest.raises(ValueError, match="lacks"):
        apply_history(net, history)



# -- data-driven criteria -------------------------------------------------------------------


def _batch(n: int, shape: tuple, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _linear_conv_net() -> nn.Module:
    """conv0 (3 channels, the one prunable group) -> conv1 -> global pool: linear in x."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _gate_importance(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(2 dL/dz)^2 for a gate z = 1 multiplying conv0's output channels."""
    gate = torch.ones(1, 3, 1, 1, requires_grad=True)
    logits = net[3](net[2](net[1](net[0](x) * gate)))
    (dz,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), gate)
    return (2 * dz.flatten()) ** 2


def test_taylor_equals_gate_gradient_reference():
    # Molchanov et al. 2019: sum_s g_s w_s over a channel's parameters is the gradient of a
    # multiplicative gate z_c = 1 on that channel. Removing channel c deletes conv0's row c
    # (weight and bias) and conv1's input column c; each sum equals dL/dz_c here (linear
    # in between), so one batch's importance is (2 dL/dz_c)^2, averaged over batches.
    net, batches = _linear_conv_net(), [_batch(5, (2, 6, 6), 4, s) for s in (1, 2)]
    group = next(g for g in dependency_groups(net, batches[0][0]) if g.prunable)
    assert {m.kind for m in group.members} == {"out", "in"} and group.channels == 3
    expected = sum(_gate_importance(net, x, y) for x, y in batches) / 2
    got = get_criterion("taylor")(group, net, iter(batches))  # a loader: any iterable
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)
    assert expected.min() > 0 and len(set(expected.tolist())) == 3
    one = get_criterion("taylor")(group, net, batches[0])  # an (images, labels) tuple
    torch.testing.assert_close(one, _gate_importance(net, *batches[0]), rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="needs labels"):
        get_criterion("taylor")(group, net, batches[0][0])  # images only
    kept = prune(net, 0.34, "taylor", batches[0][0], data=batches).pruning_history[0]["kept"]
    assert kept == sorted(expected.argsort()[1:].tolist())



def _beta_reference(conv: nn.Conv2d, xs: list[torch.Tensor]) -> torch.Tensor:
    """Beta-Rank in matrix form: receptive fields by unfold, spreads by torch.std over the
    samples of all batches, then min-max normalised."""
    x, w = torch.cat(xs).double(), conv.weight.detach().double()
    y = nn.functional.conv2d(x, w, conv.bias.detach().double(), conv.stride, conv.padding,
                             conv.dilation).flatten(2)  # [N, out, P]
    fields = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding,
                                  conv.stride)  # [N, in * kh * kw, P]
    sd_in = torch.stack([fields[:, :, p].std(unbiased=False) for p in range(y.shape[2])])
    raw = w.abs().flatten(1).mean(1) * (y.std(0, unbiased=False) / sd_in).sum(1)
    return ((raw - raw.min()) / (raw.max() - raw.min())).float()


def _strided_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), nn.BatchNorm2d(5),
                         nn.ReLU(), nn.Conv2d(5, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_beta_rank_matches_matrix_form_and_ranks_a_dead_channel_lowest(randomise_bn):
    net = randomise_bn(_strided_net())
    batches = [_batch(6, (3, 9, 9), 4, s) for s in (3, 4)]
    group = next(g for g in dependency_groups(net, batches[0][0]) if g.prunable)
    got = get_criterion("beta_rank")(group, net, batches)  # a list of batches
    torch.testing.assert_close(got, _beta_reference(net[0], [x for x, _ in batches]),
                               rtol=1e-5, atol=1e-6)
    # Channel 3 with zero weights and bias: no magnitude and a constant (zero) output.
    with torch.no_grad():
        net[0].weight[3] = 0
        net[0].bias[3] = 0
    got = get_criterion("beta_rank")(group, net, batches)
    assert got[3] == 0 and (got[[0, 1, 2, 4]] > 0).all()
    pruned = prune(net, 0.2, "beta_rank", batches[0][0], data=batches)
    assert pruned.pruning_history[0]["kept"] == [0, 1, 2, 4]


@pytest.mark.parametrize("criterion", ["taylor", "beta_rank"])
def test_data_criteria_leave_no_trace(criterion):
    net, (x, y) = _strided_net().train(), _batch(4, (3, 9, 9), 4, 0)
    group = next(g for g in dependency_groups(net, x) if g.prunable)
    net[1].eval()  # a mix of flags must come back as it was, not all-train
    net[3].weight.grad = torch.ones_like(net[3].weight)  # a caller's gradient stays as is
    flags = [m.training for m in net.modules()]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert get_criterion(criterion)(group, net, (x, y)).shape == (5,)
    assert [m.training for m in net.modules()] == flags
    net.train()  # dependency_groups itself restores one flag for the whole model
    assert prune(net, 0.4, criterion, x, data=(x, y))[0].out_channels == 3
    assert all(m.training for m in net.modules())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # BN stats too
    grads = {name: p.grad for name, p in net.named_parameters()}
    assert torch.equal(grads.pop("3.weight"), torch.ones_like(net[3].weight))
    assert all(g is None for g in grads.values())
    for m in net.modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
    for bad in (None, 3):
        with pytest.raises(ValueError, match=rf"criterion '{criterion}' needs data: pass "
                                             r"data=\(images, labels\) or a loader"):
            prune(net, 0.4, criterion, x, data=bad)
    assert all(m.training for m in net.modules())  # also after an error
    assert all(not m._forward_hooks for m in net.modules())


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "random", "taylor",
                                       "beta_rank"])
def test_every_criterion_prunes_mobilenet_like_the_zeroed_original(criterion, randomise_bn):
    assert criterion in criteria()
    model = randomise_bn(create_model("mobilenet_v2", **MODELS["mobilenet_v2"]))
    x, y = _batch(2, (3, 32, 32), 10, 5)
    pruned = prune(model, 0.5, criterion, x, data=(x, y)).eval()
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), _zeroed(model, pruned.pruning_history)(x),
                                   atol=1e-5, rtol=0)
    assert _params(pruned) < _params(model) / 2.3


# -- 1D and 3D: the same groups, the same surgery, read from the registry's channels fact --
ND_MODELS = {  # (name, builder options): one network in 1, 2 and 3 spatial dims
    "resnet18_1d": ("resnet18", dict(num_classes=3, input_size=(1, 32))),
    "resnet18_2d": ("resnet18", dict(num_classes=3, input_size=(1, 32, 32))),
    "resnet18_3d": ("resnet18", dict(num_classes=3, input_size=(1, 12, 12, 12))),
    "unet3d": ("unet3d", dict(num_classes=3, input_size=(1, 16, 16, 16), width=4)),
}


def _randomise_norms(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1, 1)
    return model.eval()


def _zeroed_nd(model: nn.Module, history: list[dict]) -> nn.Module:
    """As :func:`_zeroed`, and a transposed convolution's outputs are its weight's dim 1."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for entry in history:
            drop = torch.tensor(sorted(set(range(entry["channels"])) - set(entry["kept"])))
            for name, kind, offset, _ in entry["members"]:
                m = modules[name]
                if kind in ("out", "bn", "dw"):
                    if getattr(m, "transposed", False):
                        m.weight[:, offset + drop] = 0
                    else:
                        m.weight[offset + drop] = 0
                    if m.bias is not None:
                        m.bias[offset + drop] = 0
    return ref


@pytest.mark.parametrize("key", list(ND_MODELS))
def test_nd_pruned_equals_zeroed_original(key):
    name, kwargs = ND_MODELS[key]
    torch.manual_seed(0)
    model = _randomise_norms(create_model(name, **kwargs))
    x = torch.randn(2, *kwargs["input_size"])
    pruned = prune(model, 0.5, example_inputs=x[:1]).eval()
    with torch.no_grad():
        expected = _zeroed_nd(model, pruned.pruning_history)(x)
        got = pruned(x)
        assert got.shape == model(x).shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert expected.abs().max() > 1e-2
    assert _params(pruned) < _params(model) / 2.3


def test_nd_channel_counts_are_the_2d_ones():
    counts = {}
    for dims in (1, 2, 3):
        name, kwargs = ND_MODELS[f"resnet18_{dims}d"]
        model = create_model(name, **kwargs)
        groups = dependency_groups(model, torch.randn(1, *kwargs["input_size"]))
        pruned = prune(model, 0.5)
        counts[dims] = ([(g.channels, len(g.members), g.prunable) for g in groups],
                        [(n, m.weight.shape[:2]) for n, m in pruned.named_modules()
                         if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))])
    assert counts[1] == counts[2] == counts[3]
    assert dict(counts[3][1])["layer1.0.conv1"] == (32, 32)


def test_unet3d_transposed_convolutions_are_pruned():
    name, kwargs = ND_MODELS["unet3d"]
    model = create_model(name, **kwargs)
    pruned = prune(model, 0.5)
    assert [(u.in_channels, u.out_channels) for u in pruned.up] == [(32, 32), (16, 16), (8, 8)]
    assert [(u.in_channels, u.out_channels) for u in model.up] == [(64, 64), (32, 32), (16, 16)]
    again = apply_history(create_model(name, **kwargs), pruned.pruning_history)
    assert again.state_dict().keys() == pruned.state_dict().keys()


def test_unknown_operator_refused_by_pruning(unknown_layer):
    Scale = unknown_layer
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Scale(), nn.Conv2d(8, 8, 3))
    with pytest.raises(UnknownOperator) as err:
        dependency_groups(model, torch.randn(1, 3, 8, 8))
    assert "Scale" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UnknownOperator, match="Scale"):
        prune(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8))


def test_unknown_function_refused_by_pruning():
    class Spectral(nn.Module):  # a container calling a function the registry does not know
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 3)

        def forward(self, x):
            return torch.fft.fft(self.conv(x)).real

    with pytest.raises(UnknownOperator, match="'fft_fft'"):
        dependency_groups(Spectral(), torch.randn(1, 3, 8))
