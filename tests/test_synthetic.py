"""Tests for tiramisu_brats.synthetic."""

from __future__ import annotations

import inspect
from functools import cache

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from tiramisu_brats.synthetic import (
    BRATS_SHAPE,
    CONTRAST_MEAN,
    CONTRAST_STD,
    LAYOUTS,
    MODALITIES,
    SYNTHETIC_CALIBRATION,
    TISSUES,
    SyntheticCase,
    brats_affine,
    calibration_slices,
    make_case,
    write_case,
)

SMALL = (48, 40, 32)
CROSS = ndi.generate_binary_structure(3, 1)


@cache
def _case(seed: int = 0, shape: tuple[int, int, int] = SMALL) -> SyntheticCase:
    return make_case(seed, shape, case_id=f"syn-{seed}")


def _z_means(image: np.ndarray, masks: dict) -> dict:
    """Mean z-value per modality inside each mask, z-scoring every modality over the brain
    (its nonzero voxels) as the pipeline does: ``{name: (4,) array}``."""
    brain = (image > 0).any(axis=0)
    out = {name: np.zeros(image.shape[0]) for name in masks}
    for m in range(image.shape[0]):
        v = image[m][brain].astype(np.float64)
        mu, sd = v.mean(), v.std()
        for name, mask in masks.items():
            out[name][m] = (image[m][mask].astype(np.float64).mean() - mu) / sd
    return out


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def test_contrast_tables():
    assert CONTRAST_MEAN.shape == CONTRAST_STD.shape == (len(TISSUES), len(MODALITIES))
    assert (CONTRAST_STD > 0).all()
    mean = dict(zip(TISSUES, CONTRAST_MEAN, strict=True))
    t1, t1ce, t2, flair = range(4)
    assert mean["wm"][t1] > mean["gm"][t1] > mean["csf"][t1]
    assert mean["csf"][t2] > mean["gm"][t2] > mean["wm"][t2]
    assert mean["edema"][flair] > mean["wm"][flair] + 1
    assert mean["enhancing"][t1ce] > mean["necrosis"][t1ce] + 1


def test_shapes_and_dtypes():
    case = _case()
    assert case.image.shape == (4, *SMALL) and case.image.dtype == np.float32
    assert case.labels.shape == SMALL and case.labels.dtype == np.uint8
    assert case.affine.shape == (4, 4) and case.affine.dtype == np.float64
    np.testing.assert_array_equal(case.affine, brats_affine(SMALL))
    assert case.case_id == "syn-0"


def test_affine_is_brats_like_and_centred():
    affine = brats_affine(BRATS_SHAPE)
    np.testing.assert_array_equal(np.diag(affine), [-1.0, -1.0, 1.0, 1.0])
    centre = affine @ np.array([119.5, 119.5, 77.0, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0)


def test_deterministic():
    a = _case(3)
    b = make_case(3, SMALL, case_id="other")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.affine, b.affine)


def test_different_seeds_put_the_tumor_elsewhere():
    centres = [_centroid(_case(seed).labels > 0) for seed in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert np.linalg.norm(centres[i] - centres[j]) > 1.0
    assert not np.array_equal(_case(0).image, _case(1).image)


def _check_nesting(labels: np.ndarray) -> None:
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 4}
    wt = labels > 0
    tc = (labels == 1) | (labels == 4)
    # The necrosis sits inside the enhancing rim: its neighbours are tumor core.
    assert not (ndi.binary_dilation(labels == 1, CROSS) & ~tc).any()
    # Edema surrounds the core: no core voxel touches healthy brain or background.
    assert not (ndi.binary_dilation(tc, CROSS) & ~wt).any()
    # Edema is larger than the core, and the tumor is one piece.
    assert (labels == 2).sum() > tc.sum() > (labels == 1).sum() > 0
    assert ndi.label(wt, structure=np.ones((3, 3, 3)))[1] == 1


@pytest.mark.parametrize("seed", range(4))
def test_labels_present_and_nested(seed):
    _check_nesting(_case(seed).labels)


@pytest.mark.parametrize("seed", range(4))
def test_brain_background_and_tumor_inside(seed):
    case = _case(seed)
    brain = (case.image > 0).any(axis=0)
    # Every modality has the same brain; outside it everything is exactly 0.
    np.testing.assert_array_equal((case.image > 0).all(axis=0), brain)
    assert (case.image[:, ~brain] == 0).all()
    assert not (case.labels.astype(bool) & ~brain).any()
    # MRI-like: positive integers, hundreds on average.
    inside = case.image[:, brain]
    assert inside.min() >= 1
    np.testing.assert_array_equal(inside, np.round(inside))
    assert all(100 < np.median(v) < 3000 for v in inside)
    # The brain is an ellipsoid-ish blob in the middle of the grid, not touching its faces.
    assert not (brain[0].any() or brain[-1].any() or brain[:, 0].any() or brain[:, -1].any())
    assert 0.1 < brain.mean() < 0.3  # BraTS: ~1.5 M brain voxels of 8.9 M


def test_contrasts_after_zscoring():
    case = _case(0, (64, 64, 40))
    brain = (case.image > 0).any(axis=0)
    masks = {k: case.labels == k for k in (1, 2, 4)}
    masks[0] = brain & (case.labels == 0)
    mean = _z_means(case.image, masks)
    t1, t1ce, t2, flair = range(4)
    assert mean[2][flair] > mean[0][flair] + 1.0  # edema bright on FLAIR
    assert mean[2][t2] > mean[0][t2] + 0.3  # and on T2
    assert mean[1][t2] > mean[0][t2] + 1.0  # necrosis bright on T2
    assert mean[1][t2] > mean[2][t2] + 0.5  # brighter than edema
    assert mean[1][t1] < mean[2][t1] - 0.2  # and darker on T1
    assert mean[4][t1ce] > mean[1][t1ce] + 0.8  # enhancing rim brighter than necrosis
    assert mean[4][t1ce] > mean[2][t1ce] + 0.8  # and than edema
    # Each tumor label sits at the measured z-values on small grids too.
    for row, label in ((3, 1), (4, 2), (5, 4)):
        np.testing.assert_allclose(mean[label], CONTRAST_MEAN[row], atol=0.15)


def test_full_size_case_matches_the_measured_contrasts():
    case = make_case(0)
    assert case.image.shape == (4, *BRATS_SHAPE) and case.labels.shape == BRATS_SHAPE
    brain = case.image[0] > 0
    # Brain extent like BraTS: ~140 mm left-right, ~170 mm front-back, ~130 mm high.
    idx = np.argwhere(brain)
    extent = idx.max(axis=0) - idx.min(axis=0) + 1
    assert 125 <= extent[0] <= 160 and 150 <= extent[1] <= 190 and 115 <= extent[2] <= 150
    # Tumor sizes like real glioblastomas (voxels of 1 mm^3).
    wt, tc = (case.labels > 0).sum(), np.isin(case.labels, (1, 4)).sum()
    et = (case.labels == 4).sum()
    assert 20_000 < wt < 300_000 and 5_000 < tc < wt and 2_000 < et < tc
    # After z-scoring, the tumor sits at the measured z-values.
    mean = _z_means(case.image, {k: case.labels == k for k in (1, 2, 4)})
    for row, label in ((3, 1), (4, 2), (5, 4)):
        np.testing.assert_allclose(mean[label], CONTRAST_MEAN[row], atol=0.15)
    # Anatomy scales with the grid: the brain fills the same share of a small grid.
    small = _case(0).image[0] > 0
    assert brain.mean() == pytest.approx(small.mean(), rel=0.15)


@pytest.mark.slow
def test_calibration_slices_are_network_input_and_their_default_is_named():
    slices = calibration_slices(seeds=(0,), every=8)
    assert slices.dtype == np.float32 and slices.shape[1:] == (4, 192, 160)
    assert 10 <= len(slices) <= 20  # every 8th of the brain's 100-150 axial slices
    assert all(s.any() for s in slices)  # brain slices only
    defaults = inspect.signature(calibration_slices).parameters
    seeds, every = defaults["seeds"].default, defaults["every"].default
    assert SYNTHETIC_CALIBRATION == f"synthetic:seeds={','.join(map(str, seeds))}:every={every}"


@pytest.mark.parametrize("shape", [(24, 24, 24), (32, 72, 40)])
def test_other_shapes(shape):
    case = make_case(5, shape)
    assert case.image.shape == (4, *shape) and case.labels.shape == shape
    _check_nesting(case.labels)
    assert not (case.labels.astype(bool) & (case.image[0] == 0)).any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shape": (10, 40, 32)}, "shape"),
        ({"shape": (48, 40)}, "shape"),
        ({"shape": (48.5, 40, 32)}, "shape"),
        ({"case_id": "a/b"}, "case_id"),
        ({"case_id": ""}, "case_id"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_case(**kwargs)


_NAMES = {
    "brats2021": (["_t1", "_t1ce", "_t2", "_flair"], "_seg"),
    "brats2023": (["-t1n", "-t1c", "-t2w", "-t2f"], "-seg"),
    "nnunet": (["_0000", "_0001", "_0002", "_0003"], "_seg"),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_write_case_layouts(tmp_path, layout):
    case = _case(1)
    folder = write_case(case, tmp_path, layout)
    assert folder == tmp_path / case.case_id and folder.is_dir()
    suffixes, seg_suffix = _NAMES[layout]
    expected = {f"{case.case_id}{s}.nii.gz" for s in [*suffixes, seg_suffix]}
    assert {p.name for p in folder.iterdir()} == expected  # no temporary files left over
    for m, suffix in enumerate(suffixes):
        img = nib.load(folder / f"{case.case_id}{suffix}.nii.gz")
        assert img.shape == SMALL
        assert img.get_data_dtype() == np.int16
        np.testing.assert_allclose(img.affine, case.affine)
        np.testing.assert_array_equal(np.asarray(img.dataobj), case.image[m])
    seg = nib.load(folder / f"{case.case_id}{seg_suffix}.nii.gz")
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(seg.affine, case.affine)
    data = np.asarray(seg.dataobj)
    if layout == "brats2023":
        assert set(np.unique(data).tolist()) == {0, 1, 2, 3}
        np.testing.assert_array_equal(data == 3, case.labels == 4)
    else:
        np.testing.assert_array_equal(data, case.labels)


def test_write_case_without_seg_and_overwrite(tmp_path):
    case = _case(2)
    folder = write_case(case, str(tmp_path), "brats2021", with_seg=False)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{case.case_id}_{m}.nii.gz" for m in MODALITIES
    )
    write_case(case, tmp_path)  # writing again replaces the files
    assert (folder / f"{case.case_id}_seg.nii.gz").exists()


def test_write_case_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        write_case(_case(), tmp_path, "nifti")
    assert not any(tmp_path.iterdir())
