"""Tests of tiramisu_brats.metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from scipy.spatial.distance import cdist

from tiramisu_brats.metrics import (
    HD95_EMPTY,
    METRIC_COLUMNS,
    REGIONS,
    Confusion,
    dice,
    evaluate_case,
    hd95,
    region_dice,
    region_mask,
    sensitivity,
    specificity,
    surface_voxels,
    volumes_ml,
)


def _cube(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def _hd95_brute(pred, ref, spacing):
    """Full-volume reference: surfaces by erosion, all pairwise distances with cdist."""
    cross = ndimage.generate_binary_structure(3, 1)
    ps = pred & ~ndimage.binary_erosion(pred, structure=cross)
    rs = ref & ~ndimage.binary_erosion(ref, structure=cross)
    pc = np.argwhere(ps) * np.asarray(spacing)
    rc = np.argwhere(rs) * np.asarray(spacing)
    d = cdist(pc, rc)
    return float(np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95))


# --------------------------------------------------------------------------- regions


def test_regions_constant():
    assert REGIONS == {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}


def test_region_mask():
    labels = np.array([0, 1, 2, 4, 3], dtype=np.uint8).reshape(1, 1, 5)
    assert region_mask(labels, "WT").ravel().tolist() == [False, True, True, True, False]
    assert region_mask(labels, "TC").ravel().tolist() == [False, True, False, True, False]
    assert region_mask(labels, "ET").ravel().tolist() == [False, False, False, True, False]
    assert region_mask(labels, (2,)).ravel().tolist() == [False, False, True, False, False]
    assert region_mask(labels, "WT").dtype == bool
    with pytest.raises(ValueError, match="unknown region"):
        region_mask(labels, "XX")


# --------------------------------------------------------------------------- confusion


def test_confusion_two_cubes():
    shape = (10, 10, 10)
    pred = _cube(shape, (0, 0, 0), (4, 4, 4))  # 64 voxels
    ref = _cube(shape, (2, 0, 0), (6, 4, 4))  # 64 voxels, overlap 2*4*4 = 32
    c = Confusion.from_masks(pred, ref)
    assert c == Confusion(tp=32, fp=32, fn=32, tn=1000 - 96)
    assert c.dice == pytest.approx(2 * 32 / (2 * 32 + 32 + 32))  # 0.5
    assert c.dice == pytest.approx(0.5)
    assert c.sensitivity == pytest.approx(0.5)
    assert c.specificity == pytest.approx(904 / 936)
    assert dice(pred, ref) == pytest.approx(0.5)
    assert sensitivity(pred, ref) == pytest.approx(0.5)
    assert specificity(pred, ref) == pytest.approx(904 / 936)


def test_confusion_subset():
    shape = (6, 6, 6)
    ref = _cube(shape, (0, 0, 0), (2, 2, 4))  # 16
    pred = _cube(shape, (0, 0, 0), (2, 2, 2))  # 8, inside ref
    c = Confusion.from_masks(pred, ref)
    assert (c.tp, c.fp, c.fn, c.tn) == (8, 0, 8, 216 - 16)
    assert c.dice == pytest.approx(16 / 24)
    assert c.sensitivity == pytest.approx(0.5)
    assert c.specificity == 1.0


def test_empty_rules():
    empty = np.zeros((5, 5, 5), dtype=bool)
    some = empty.copy()
    some[2, 2, 2] = True
    both = Confusion.from_masks(empty, empty)
    assert both.dice == 1.0
    assert both.sensitivity == 1.0
    assert both.specificity == 1.0
    assert hd95(empty, empty, (1, 1, 1)) == 0.0

    fp_only = Confusion.from_masks(some, empty)
    assert fp_only.dice == 0.0
    assert fp_only.sensitivity == 0.0
    assert fp_only.specificity == pytest.approx(124 / 125)
    fn_only = Confusion.from_masks(empty, some)
    assert fn_only.dice == 0.0
    assert fn_only.sensitivity == 0.0
    assert fn_only.specificity == 1.0
    diagonal = round(float(np.linalg.norm([240, 240, 155])), 2)  # of the BraTS volume, in mm
    assert hd95(some, empty, (1, 1, 1)) == HD95_EMPTY == diagonal == 373.13
    assert hd95(empty, some, (1, 1, 1)) == diagonal


def test_specificity_without_negatives():
    full = np.ones((2, 2, 2), dtype=bool)
    c = Confusion.from_masks(full, full)
    assert c.tn == 0 and c.fp == 0
    assert c.specificity == 1.0


def test_shape_mismatch():
    a = np.zeros((2, 2, 2), dtype=bool)
    b = np.zeros((2, 2, 3), dtype=bool)
    with pytest.raises(ValueError, match="shapes differ"):
        Confusion.from_masks(a, b)
    with pytest.raises(ValueError, match="shapes differ"):
        hd95(a, b, (1, 1, 1))
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate_case(a.astype(np.uint8), b.astype(np.uint8), (1, 1, 1))


def test_bad_spacing():
    a = np.ones((2, 2, 2), dtype=bool)
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        volumes_ml(a, (1, 0, 1))


# --------------------------------------------------------------------------- hd95


def test_surface_of_cube_and_border():
    cube = _cube((7, 7, 7), (1, 1, 1), (6, 6, 6))  # 5^3, interior 3^3
    assert np.count_nonzero(surface_voxels(cube)) == 125 - 27
    full = np.ones((3, 3, 3), dtype=bool)  # touches the border everywhere
    assert np.count_nonzero(surface_voxels(full)) == 26  # only the center is interior


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_single_voxels_shifted(axis):
    spacing = (0.8, 1.5, 3.0)
    shape = (12, 12, 12)
    pred = np.zeros(shape, dtype=bool)
    ref = np.zeros(shape, dtype=bool)
    pred[3, 3, 3] = True
    pos = [3, 3, 3]
    pos[axis] += 5
    ref[tuple(pos)] = True
    assert hd95(pred, ref, spacing) == pytest.approx(5 * spacing[axis])


def test_hd95_cubes_shifted_anisotropic():
    spacing = (1.0, 2.0, 0.5)
    shape = (20, 20, 20)
    pred = _cube(shape, (2, 2, 2), (8, 8, 8))
    ref = _cube(shape, (2, 5, 2), (8, 11, 8))  # shifted 3 voxels along Y
    # The faces perpendicular to Y are 3 voxels (3 * 2.0 = 6 mm) from the other surface and
    # hold more than 5 % of the surface voxels; nothing is farther.
    assert hd95(pred, ref, spacing) == pytest.approx(6.0)
    assert hd95(pred, ref, spacing) == pytest.approx(_hd95_brute(pred, ref, spacing))
    # Identical masks: 0.
    assert hd95(pred, pred, spacing) == 0.0


def test_hd95_parallel_slabs():
    # Two one-voxel-thick slabs 4 voxels apart along Z: every voxel is a surface voxel and its
    # nearest voxel of the other slab is straight across, 4 * 1.25 mm away.
    spacing = (0.9, 1.1, 1.25)
    pred = np.zeros((8, 9, 12), dtype=bool)
    ref = np.zeros_like(pred)
    pred[:, :, 3] = True  # touches the X and Y borders
    ref[:, :, 7] = True
    assert hd95(pred, ref, spacing) == pytest.approx(5.0)


def test_hd95_identical_and_nested():
    spacing = (1.0, 1.0, 1.0)
    outer = _cube((15, 15, 15), (2, 2, 2), (13, 13, 13))
    inner = _cube((15, 15, 15), (4, 4, 4), (11, 11, 11))
    # Every inner surface voxel is 2 voxels from the outer surface along an axis, and every
    # outer face voxel is at least 2 from the inner surface; corners farther.
    value = hd95(inner, outer, spacing)
    assert value == pytest.approx(_hd95_brute(inner, outer, spacing))
    assert value >= 2.0


def test_hd95_touching_volume_border_matches_brute_force():
    rng = np.random.default_rng(3)
    shape = (9, 8, 7)
    for _ in range(5):
        pred = rng.random(shape) < 0.3
        ref = rng.random(shape) < 0.3
        pred[0, :, :] = True  # on the border
        ref[:, :, -1] |= rng.random(shape[:2]) < 0.5
        spacing = (1.0, 0.7, 2.5)
        assert hd95(pred, ref, spacing) == pytest.approx(_hd95_brute(pred, ref, spacing))


def test_hd95_crop_equals_brute_force_random():
    rng = np.random.default_rng(0)
    shape = (24, 22, 20)
    for i in range(12):
        pred = np.zeros(shape, dtype=bool)
        ref = np.zeros(shape, dtype=bool)
        # Random blobs somewhere inside the volume, smoothed so they have interiors.
        lo = rng.integers(0, 12, size=3)
        hi = lo + rng.integers(3, 10, size=3)
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        pred[sl] = rng.random(pred[sl].shape) < 0.7
        lo2 = np.clip(lo + rng.integers(-4, 5, size=3), 0, None)
        sl2 = tuple(slice(int(a), int(a) + 8) for a in lo2)
        ref[sl2] = rng.random(ref[sl2].shape) < 0.6
        if i % 3 == 0:
            pred = ndimage.binary_closing(pred, iterations=1)
        spacing = tuple(float(s) for s in rng.uniform(0.5, 3.0, size=3))
        assert hd95(pred, ref, spacing) == pytest.approx(_hd95_brute(pred, ref, spacing))


def test_inputs_not_modified():
    rng = np.random.default_rng(1)
    pred = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=(10, 11, 12))
    ref = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), size=(10, 11, 12))
    pred_copy, ref_copy = pred.copy(), ref.copy()
    evaluate_case(pred, ref, (1.0, 1.0, 1.0))
    volumes_ml(pred, (1.0, 1.0, 1.0))
    pm, rm = pred > 0, ref > 0
    pm_copy, rm_copy = pm.copy(), rm.copy()
    hd95(pm, rm, (1.0, 2.0, 1.0))
    Confusion.from_masks(pm, rm)
    surface_voxels(pm)
    np.testing.assert_array_equal(pred, pred_copy)
    np.testing.assert_array_equal(ref, ref_copy)
    np.testing.assert_array_equal(pm, pm_copy)
    np.testing.assert_array_equal(rm, rm_copy)


# --------------------------------------------------------------------------- evaluate_case


def test_metric_columns():
    assert METRIC_COLUMNS == [
        "dice_WT", "dice_TC", "dice_ET",
        "sensitivity_WT", "sensitivity_TC", "sensitivity_ET",
        "specificity_WT", "specificity_TC", "specificity_ET",
        "hd95_WT", "hd95_TC", "hd95_ET",
        "volume_pred_WT_ml", "volume_pred_TC_ml", "volume_pred_ET_ml",
        "volume_ref_WT_ml", "volume_ref_TC_ml", "volume_ref_ET_ml",
    ]  # fmt: skip


def test_evaluate_case_values():
    shape = (10, 10, 10)
    spacing = (1.0, 2.0, 1.5)  # 3 mm^3 per voxel
    ref = np.zeros(shape, dtype=np.uint8)
    ref[2:6, 2:6, 2:6] = 2  # edema 64
    ref[3:5, 3:5, 3:5] = 4  # enhancing 8 inside
    pred = ref.copy()
    pred[3:5, 3:5, 3:5] = 1  # predicted necrosis where the reference has enhancing
    out = evaluate_case(pred, ref, spacing)
    assert list(out) == METRIC_COLUMNS
    assert all(isinstance(v, float) for v in out.values())
    assert out["dice_WT"] == 1.0
    assert out["dice_TC"] == 1.0
    assert out["dice_ET"] == 0.0  # prediction has no ET, reference has 8 voxels
    assert out["sensitivity_ET"] == 0.0
    assert out["specificity_ET"] == 1.0
    assert out["hd95_WT"] == 0.0
    assert out["hd95_ET"] == HD95_EMPTY
    assert out["volume_pred_WT_ml"] == pytest.approx(64 * 3 / 1000)
    assert out["volume_ref_TC_ml"] == pytest.approx(8 * 3 / 1000)
    assert out["volume_pred_ET_ml"] == 0.0
    assert out["volume_ref_ET_ml"] == pytest.approx(8 * 3 / 1000)


def test_evaluate_case_both_empty():
    z = np.zeros((4, 4, 4), dtype=np.uint8)
    out = evaluate_case(z, z, (1, 1, 1))
    for r in REGIONS:
        assert out[f"dice_{r}"] == 1.0
        assert out[f"sensitivity_{r}"] == 1.0
        assert out[f"specificity_{r}"] == 1.0
        assert out[f"hd95_{r}"] == 0.0


def test_volumes_ml():
    labels = np.zeros((5, 5, 5), dtype=np.uint8)
    labels[0, 0, :3] = 1  # 3
    labels[1, :, :] = 2  # 25
    labels[2, 0, :4] = 4  # 4
    v = volumes_ml(labels, (0.5, 2.0, 4.0))  # 4 mm^3 per voxel
    assert v == pytest.approx(
        {
            "necrosis_ml": 0.012,
            "edema_ml": 0.1,
            "enhancing_ml": 0.016,
            "WT_ml": 0.128,
            "TC_ml": 0.028,
            "ET_ml": 0.016,
        }
    )


# --------------------------------------------------------------------------- properties

_masks = hnp.arrays(dtype=bool, shape=(5, 6, 4))
_spacings = st.tuples(*[st.floats(0.5, 3.0) for _ in range(3)])


@settings(max_examples=60, deadline=None)
@given(pred=_masks, ref=_masks, spacing=_spacings)
def test_property_symmetry_and_ranges(pred, ref, spacing):
    d = dice(pred, ref)
    assert 0.0 <= d <= 1.0
    assert d == dice(ref, pred)
    h = hd95(pred, ref, spacing)
    assert h >= 0.0
    assert h == pytest.approx(hd95(ref, pred, spacing))
    if pred.any() and ref.any():
        assert h == pytest.approx(_hd95_brute(pred, ref, spacing))
    c = Confusion.from_masks(pred, ref)
    assert c.tp + c.fp + c.fn + c.tn == pred.size
    assert 0.0 <= c.sensitivity <= 1.0
    assert 0.0 <= c.specificity <= 1.0


def test_region_dice_gives_each_region_of_two_label_maps():
    pred = np.array([[[0, 1, 2, 4]]], np.uint8)
    ref = np.array([[[2, 1, 4, 4]]], np.uint8)
    # WT 3 vs 4 voxels, 3 shared; TC {1, 4} 2 vs 3, 2 shared; ET 1 vs 2, 1 shared
    assert region_dice(pred, ref) == pytest.approx({"WT": 6 / 7, "TC": 4 / 5, "ET": 2 / 3})
    assert region_dice(pred * 0, ref * 0) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}


def test_label_maps_with_other_values_than_0_1_2_4_are_refused():
    ref = np.array([[[0, 1, 2, 4]]], np.uint8)
    numbered_2023 = np.array([[[0, 1, 2, 3]]], np.uint8)  # enhancing as 3: would score 0
    with pytest.raises(ValueError, match=r"prediction: label values \[3\] are not among"):
        evaluate_case(numbered_2023, ref, (1, 1, 1))
    with pytest.raises(ValueError, match=r"reference: label values \[5\]"):
        region_dice(ref, np.array([[[0, 1, 2, 5]]], np.uint8))
    with pytest.raises(ValueError, match=r"labels: label values \[-1.0, nan\]"):
        volumes_ml(np.array([[[0, -1, np.nan, 4]]]), (1, 1, 1))
    assert volumes_ml(ref.astype(np.int64), (1, 1, 1))["WT_ml"] == pytest.approx(0.003)


def test_metrics_of_2d_label_maps_and_a_spacing_that_is_no_sequence():
    pred = np.zeros((6, 6), np.uint8)
    pred[1:4, 1:4] = 2
    ref = np.zeros((6, 6), np.uint8)
    ref[1:4, 2:5] = 2
    row = evaluate_case(pred, ref, (1.0, 2.0))
    # shifted by one voxel along the axis of 2 mm voxels
    assert row["dice_WT"] == pytest.approx(2 * 6 / 18) and row["hd95_WT"] == pytest.approx(2.0)
    assert row["volume_pred_WT_ml"] == pytest.approx(9 * 2 / 1000)
    with pytest.raises(ValueError, match=r"spacing must be 2 positive finite numbers, got 1\.0"):
        evaluate_case(pred, ref, 1.0)
