"""Segmentation losses: analytic values, cross-entropy equivalence, ignore_index, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from cnnkit.tasks.losses import LOSS_KINDS, SegmentationLoss, dice_loss, focal_loss


def pixels(probs: list[list[float]]) -> torch.Tensor:
    """Logits [1, K, 1, N] whose softmax at pixel n is probs[n]."""
    return torch.tensor(probs, dtype=torch.float64).log().T[None, :, None, :]


def test_focal_gamma_zero_is_cross_entropy():
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, :3] = 255
    ce = F.cross_entropy(logits, target, ignore_index=255)
    assert focal_loss(logits, target, gamma=0.0).item() == pytest.approx(ce.item(), rel=1e-6)


def test_focal_analytic_two_class_pixel():
    logits = pixels([[1 / 4, 3 / 4]])  # p = (1/4, 3/4)
    one, zero = torch.ones(1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, dtype=torch.long)
    # -(1 - p_t)^2 log p_t
    assert focal_loss(logits, one).item() == pytest.approx((1 / 4) ** 2 * -math.log(3 / 4))
    assert focal_loss(logits, zero).item() == pytest.approx((3 / 4) ** 2 * math.log(4))
    # alpha = 0.25 weighs the foreground class 1 by 0.25 and the background by 0.75
    assert focal_loss(logits, one, alpha=0.25).item() == pytest.approx(
        0.25 * (1 / 4) ** 2 * -math.log(3 / 4))
    assert focal_loss(logits, zero, alpha=0.25).item() == pytest.approx(
        0.75 * (3 / 4) ** 2 * math.log(4))
    assert focal_loss(logits, zero, gamma=1.0, alpha=[2.0, 5.0]).item() == pytest.approx(
        2.0 * (3 / 4) * math.log(4))
    with pytest.raises(ValueError, match="one per class"):
        focal_loss(logits, zero, alpha=[1.0, 1.0, 1.0])


def test_dice_zero_for_perfect_logits():
    target = torch.randint(0, 3, (2, 4, 4))
    logits = 30.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).double()
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-9)
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(0.0, abs=1e-9)


def test_dice_analytic_and_absent_class_left_out():
    # Three pixels, three classes, target (0, 0, 1); class 2 absent.
    logits = pixels([[1 / 2, 1 / 4, 1 / 4], [1 / 2, 1 / 4, 1 / 4], [1 / 4, 1 / 2, 1 / 4]])
    target = torch.tensor([[[0, 0, 1]]])
    # class 0: inter 1, sum p 5/4, sum g 2 -> (2 + 1) / (13/4 + 1) = 12/17
    # class 1: inter 1/2, sum p 1, sum g 1 -> (1 + 1) / (2 + 1) = 2/3
    expected = 1 - (12 / 17 + 2 / 3) / 2
    assert dice_loss(logits, target).item() == pytest.approx(expected)
    # smooth = 0: class 0 2/(13/4) = 8/13, class 1 1/2
    assert dice_loss(logits, target, smooth=0.0).item() == pytest.approx(1 - (8 / 13 + 1 / 2) / 2)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_ignore_index_does_not_affect_loss_or_gradient(kind):
    crit = SegmentationLoss(kind)
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    target = torch.randint(0, 3, (2, 4, 5))
    ignored = torch.rand(2, 4, 5) < 0.3
    target[ignored] = 255
    x = logits.clone().requires_grad_(True)
    loss = crit(x, target)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.movedim(1, -1)[ignored] == 0).all()
    assert (x.grad.movedim(1, -1)[~ignored] != 0).any()
    # Arbitrary logits at ignored pixels leave the loss unchanged.
    other = logits.clone()
    other.movedim(1, -1)[ignored] = 100.0 * torch.randn(int(ignored.sum()), 3,
                                                        dtype=torch.float64)
    assert crit(other, target).item() == pytest.approx(loss.item(), rel=1e-12)
    # ... and equal the loss on the counted pixels alone, laid out as a [1, K, 1, N] strip.
    strip = logits.movedim(1, -1)[~ignored].T[None, :, None, :]
    assert crit(strip, target[~ignored][None, None]).item() == pytest.approx(loss.item(),
                                                                            rel=1e-10)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_all_ignored_gives_zero_with_finite_gradient(kind):
    x = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = SegmentationLoss(kind)(x, torch.full((1, 2, 2), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(x.grad).all()


def test_gradients_finite_for_confident_logits():
    target = torch.randint(0, 3, (2, 4, 4))
    x = (50.0 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()).requires_grad_(True)
    for kind in LOSS_KINDS:
        x.grad = None
        SegmentationLoss(kind, gamma=0.5)(x, target).backward()
        assert torch.isfinite(x.grad).all(), kind


def test_sums_and_label_smoothing():
    logits = torch.randn(2, 4, 3, 3)
    target = torch.randint(0, 4, (2, 3, 3))
    target[1, 1, 1] = 255
    ce = F.cross_entropy(logits, target, ignore_index=255, label_smoothing=0.1)
    dice = dice_loss(logits, target)
    focal = focal_loss(logits, target, gamma=2.0)
    assert SegmentationLoss("ce", label_smoothing=0.1)(logits, target).item() == pytest.approx(
        ce.item())
    assert SegmentationLoss("ce+dice", label_smoothing=0.1)(logits, target).item() == \
        pytest.approx((ce + dice).item())
    assert SegmentationLoss("focal+dice")(logits, target).item() == pytest.approx(
        (focal + dice).item())
    assert SegmentationLoss("dice")(logits, target.to(torch.uint8)).item() == pytest.approx(
        dice.item())


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match="ce, dice, focal, ce\\+dice, focal\\+dice"):
        SegmentationLoss("bce")
    with pytest.raises(ValueError, match="outside"):
        dice_loss(torch.randn(1, 2, 2, 2), torch.full((1, 2, 2), 3))
