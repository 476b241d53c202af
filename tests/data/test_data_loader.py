"""TensorLoader: coverage, reproducibility by (seed, epoch), normalisation, drop_last."""

import pytest
import torch

from cnnkit.data import TensorLoader, channel_stats

N = 37


def _data(c=3):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, c, 8, 8), generator=g, dtype=torch.uint8)
    return images, torch.arange(N)  # labels are sample ids, so coverage is checkable


def _batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_covers_every_sample_once_per_epoch():
    images, ids = _data()
    loader = TensorLoader(images, ids, 8, shuffle=True, augment="flip_crop", seed=1)
    assert len(loader) == 5 and loader.num_samples == N
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = _batches(loader)
        seen = torch.cat([y for _, y in batches])
        assert torch.equal(torch.sort(seen)[0], ids)
        assert [len(y) for _, y in batches] == [8, 8, 8, 8, 5]
        assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in batches)


def test_unshuffled_order_and_values():
    images, ids = _data()
    x, y = next(iter(TensorLoader(images, ids, 10)))
    assert torch.equal(y, ids[:10])
    assert torch.allclose(x, images[:10].float() / 255)


def test_set_epoch_reproduces_and_epochs_differ():
    images, ids = _data()

    def run(epoch, seed=1):
        loader = TensorLoader(images, ids, 8, shuffle=True, augment="flip_crop", seed=seed)
        loader.set_epoch(epoch)
        return _batches(loader)

    a, b, c, d = run(4), run(4), run(5), run(4, seed=2)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb)
               for (xa, ya), (xb, yb) in zip(a, b, strict=True))
    assert not torch.equal(a[0][1], c[0][1]) and not torch.equal(a[0][1], d[0][1])
    # Augmentation is reproduced too, not just the order: same ids, different pixels
    # would mean the randomness leaked from elsewhere.
    plain = TensorLoader(images, ids, 8, shuffle=True, augment="none", seed=1)
    plain.set_epoch(4)
    raw = _batches(plain)
    assert all(torch.equal(ya, yr) for (_, ya), (_, yr) in zip(a, raw, strict=True))
    assert any(not torch.equal(xa, xr) for (xa, _), (xr, _) in zip(a, raw, strict=True))


def test_iterating_without_set_epoch_advances():
    images, ids = _data()
    loader = TensorLoader(images, ids, N, shuffle=True, seed=0)
    first, second = next(iter(loader))[1], next(iter(loader))[1]
    assert not torch.equal(first, second)
    loader.set_epoch(0)
    assert torch.equal(next(iter(loader))[1], first)


def test_normalisation_zero_mean_unit_std():
    images, ids = _data()
    mean, std = channel_stats(images)
    loader = TensorLoader(images, ids, 10, shuffle=True, mean=mean, std=std)
    x = torch.cat([x for x, _ in loader])
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5)


def test_drop_last():
    images, ids = _data()
    loader = TensorLoader(images, ids, 8, shuffle=True, drop_last=True)
    batches = _batches(loader)
    assert len(loader) == len(batches) == 4 and all(len(y) == 8 for _, y in batches)


def test_float_images_and_channels_last():
    images, ids = _data()
    loader = TensorLoader(images.float() / 255, ids, 16, channels_last=True)
    x, _ = next(iter(loader))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, images[:16].float() / 255)


def test_errors():
    images, ids = _data()
    with pytest.raises(ValueError, match="37 images but 36 labels"):
        TensorLoader(images, ids[:-1], 8)
    with pytest.raises(ValueError, match="mean has 1 values for 3-channel"):
        TensorLoader(images, ids, 8, mean=[0.5], std=[0.2, 0.2, 0.2])
    with pytest.raises(ValueError, match="unknown augmentation"):
        TensorLoader(images, ids, 8, augment="cutmix")
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(images, ids, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_equal_cpu_batches():
    images, ids = _data()
    kw = dict(shuffle=True, augment="flip_crop", seed=3, mean=[0.5] * 3, std=[0.25] * 3)
    cpu = _batches(TensorLoader(images, ids, 8, **kw))
    gpu = _batches(TensorLoader(images, ids, 8, device="cuda", **kw))
    for (xc, yc), (xg, yg) in zip(cpu, gpu, strict=True):
        assert xg.device.type == "cuda"
        assert torch.equal(yc, yg.cpu()) and torch.allclose(xc, xg.cpu(), atol=1e-6)


# ---------------------------------------------------------------- any spatial dims
@pytest.mark.parametrize("spatial", [(), (10,), (4, 6, 6)])
def test_batches_of_any_shape_are_normalised_per_channel(spatial):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (12, 2, *spatial), generator=g, dtype=torch.uint8)
    mean, std = channel_stats(x)
    loader = TensorLoader(x, torch.arange(12) % 3, 12, mean=mean, std=std)
    (batch, labels), = list(loader)
    assert batch.shape == (12, 2, *spatial) and labels.tolist() == (torch.arange(12) % 3).tolist()
    dims = [0, *range(2, batch.ndim)]
    assert torch.allclose(batch.mean(dims), torch.zeros(2), atol=1e-5)
    assert torch.allclose(batch.std(dims, correction=0), torch.ones(2), atol=1e-4)


@pytest.mark.parametrize("spatial", [(16,), (6, 6, 6)])
def test_masks_ride_every_axis_of_the_augmentation(spatial):
    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 4, (8, *spatial), generator=g, dtype=torch.uint8)
    inputs = (masks * 50)[:, None]
    moved = 0
    for epoch in range(3):
        loader = TensorLoader(inputs, masks, 8, shuffle=True, augment="shapes", seed=2)
        loader.set_epoch(epoch)
        for x, y in loader:
            assert y.dtype == torch.long and y.shape == (len(x), *spatial)
            # the input is still 50 x the mask wherever the augmentation moved them
            assert torch.allclose(x[:, 0] * 255, y.float() * 50, atol=1e-3)
            moved += int(not torch.equal(y.sort(0).values, masks.long().sort(0).values))
    assert moved


def test_one_dimensional_values_are_not_masks():
    # float [N, K] targets are values, even when K equals the series length
    x = torch.rand(4, 1, 3)
    _, y = next(iter(TensorLoader(x, torch.rand(4, 3), 4)))
    assert y.dtype == torch.float32 and y.shape == (4, 3)


def test_volumes_come_channels_last_3d():
    x = torch.rand(2, 3, 4, 4, 4)
    batch, _ = next(iter(TensorLoader(x, torch.zeros(2), 2, channels_last=True)))
    assert batch.is_contiguous(memory_format=torch.channels_last_3d)
