"""NIfTI volumes from the user's folders: axis order, intensities, pairs, limits, writing."""

import gzip

import numpy as np
import pytest
import torch

nib = pytest.importorskip("nibabel")

from cnnkit.data import load_data, load_input  # noqa: E402
from cnnkit.data.volumes import file_stem, read_volume, save_volume  # noqa: E402


def _save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def test_voxels_come_as_channel_z_y_x(tmp_path):
    a = np.zeros((4, 5, 6), dtype=np.uint8)  # NIfTI order (x, y, z)
    a[1, 2, 3] = 200
    _save(tmp_path / "v.nii.gz", a)
    v = read_volume(tmp_path / "v.nii.gz")
    assert v.shape == (1, 6, 5, 4) and v[0, 3, 2, 1] == 200 and v.sum() == 200


def test_a_class_folder_of_volumes_is_read_with_its_labels(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("healthy", "lesion"):
        for i in range(3):
            _save(tmp_path / cls / f"{i}.nii.gz", rng.integers(0, 256, (8, 8, 8), dtype=np.uint8))
    d = load_data(tmp_path)
    assert d.classes == ["healthy", "lesion"] and d.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.images.dtype == torch.uint8 and d.input_size == (1, 8, 8, 8)
    first = read_volume(tmp_path / "healthy" / "0.nii.gz")
    assert torch.equal(d.images[0], torch.from_numpy(first))  # uint8 voxels kept as they are


def test_other_intensities_are_clipped_to_percentiles_and_scaled(tmp_path):
    ct = np.linspace(-1000, 2000, 1000, dtype=np.float32).reshape(10, 10, 10).astype(np.int16)
    ct[0, 0, 0] = 30000  # a metal artefact: clipped away, not stretching the scale
    for cls in ("a", "b"):
        for i in range(2):
            _save(tmp_path / cls / f"{i}.nii", ct)
    d = load_data(tmp_path)
    x = d.images[0, 0]
    assert d.images.dtype == torch.float32 and float(x.min()) == 0.0 and float(x.max()) == 1.0
    lo, hi = np.percentile(ct.astype(np.float32), (0.5, 99.5))
    mid = read_volume(tmp_path / "a" / "0.nii")[0, 5, 5, 5]
    assert abs(float(x[5, 5, 5]) - (mid - lo) / (hi - lo)) < 1e-5


def test_segmentation_pairs_of_volumes(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        vol = rng.integers(0, 256, (12, 10, 8), dtype=np.uint8)
        mask = np.zeros((12, 10, 8), dtype=np.uint8)
        mask[2:6, 2:5, 1:4] = 1 + i % 2
        _save(tmp_path / "images" / f"case{i}.nii.gz", vol)
        _save(tmp_path / "masks" / f"case{i}.nii.gz", mask)
    (tmp_path / "classes.txt").write_text("background\nliver\ntumour\n")
    d = load_data(tmp_path, targets="masks")
    assert d.input_size == (1, 8, 10, 12) and d.masks.shape == (4, 8, 10, 12)
    assert d.mask_classes == ["background", "liver", "tumour"]
    assert d.labels.tolist() == [1, 2, 1, 2]  # each volume's dominant foreground class
    assert int(d.masks[0].sum()) == 4 * 3 * 3


@pytest.mark.parametrize("break_it, why", [
    (lambda root: (root / "masks" / "case0.nii.gz").unlink(), "has no partner in masks/"),
    (lambda root: _save(root / "masks" / "case0.nii.gz", np.zeros((6, 6, 6), np.uint8)),
     "a mask must have its volume's shape"),
    (lambda root: _save(root / "masks" / "case0.nii.gz", np.full((8, 8, 8), 0.5, np.float32)),
     "fractional"),
    (lambda root: _save(root / "masks" / "case0.nii.gz", np.full((8, 8, 8), 300, np.int16)),
     "class index 300"),
    (lambda root: (root / "images" / "case1.nii.gz").write_bytes(b"not a nifti"),
     "cannot read volume"),
])
def test_broken_volume_pairs_fail_in_one_line(tmp_path, break_it, why):
    for i in range(2):
        _save(tmp_path / "images" / f"case{i}.nii.gz", np.zeros((8, 8, 8), np.uint8))
        _save(tmp_path / "masks" / f"case{i}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    break_it(tmp_path)
    with pytest.raises(ValueError, match=why):
        load_data(tmp_path, targets="masks", strict=True)


def test_the_voxel_limit_is_checked_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_MAX_IMAGE_PIXELS", "100")
    _save(tmp_path / "big.nii", np.zeros((8, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="512 voxels per channel, over the limit"):
        read_volume(tmp_path / "big.nii")


def test_load_input_reads_a_volume_for_a_volume_model_only(tmp_path):
    _save(tmp_path / "v.nii.gz", np.full((6, 6, 6), 255, np.uint8))
    x = load_input(tmp_path / "v.nii.gz", (1, 4, 4, 4))
    assert x.shape == (1, 4, 4, 4) and int(x.min()) == 255
    assert load_input(tmp_path / "v.nii.gz", (1, 4, 4, 4), keep_size=True).shape == (1, 6, 6, 6)
    with pytest.raises(ValueError, match="is a volume, but the model takes images"):
        load_input(tmp_path / "v.nii.gz", (1, 8, 8))
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="not a NIfTI volume"):
        load_input(tmp_path / "a.png", (1, 4, 4, 4))


def test_saved_masks_keep_the_source_grid_and_never_overwrite(tmp_path):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    _save(tmp_path / "scan.nii.gz", np.zeros((4, 5, 6), np.uint8), affine)
    labels = np.arange(6 * 5 * 4).reshape(6, 5, 4) % 3  # [D, H, W]
    out = tmp_path / "scan_mask.nii.gz"
    save_volume(out, labels, like=tmp_path / "scan.nii.gz")
    assert gzip.decompress(out.read_bytes())[:4]  # gzipped NIfTI
    back = nib.load(str(out))
    assert np.allclose(back.affine, affine) and back.get_data_dtype() == np.uint8
    assert np.array_equal(read_volume(out)[0], labels)
    with pytest.raises(FileExistsError):
        save_volume(out, labels)
    assert file_stem(out) == "scan_mask"
