"""Tests for tiramisu_brats.postprocess."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage as ndi

from tiramisu_brats.postprocess import ball, postprocess


def _sphere(shape, centre, radius):
    grid = np.indices(shape)
    d2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return d2 <= radius**2


def _tumor(shape=(40, 36, 30), centre=(20, 18, 15)):
    """A clean nested tumor: necrosis (1) inside enhancing rim (4) inside edema (2)."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[_sphere(shape, centre, 9)] = 2
    labels[_sphere(shape, centre, 6)] = 4
    labels[_sphere(shape, centre, 3)] = 1
    return labels


def _closed_mask(labels, radius):
    """Reference closing on an infinite grid (pad generously, close, crop)."""
    pad = radius + 2
    closed = ndi.binary_closing(np.pad(labels > 0, pad), structure=ball(radius))
    return closed[(slice(pad, -pad),) * 3] | (labels > 0)


def test_ball():
    assert ball(0).shape == (1, 1, 1) and ball(0).all()
    cross = ball(1)
    assert cross.sum() == 7 and cross[1, 1, 1] and not cross[0, 0, 0]
    assert ball(2).shape == (5, 5, 5)
    with pytest.raises(ValueError):
        ball(-1)


def test_empty_in_empty_out():
    labels = np.zeros((10, 12, 8), dtype=np.uint8)
    out = postprocess(labels)
    assert out.dtype == np.uint8 and out.shape == labels.shape and not out.any()
    assert out is not labels


def test_clean_blob_unchanged():
    labels = _tumor()
    out = postprocess(labels)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)
    np.testing.assert_array_equal(postprocess(out), out)  # idempotent on its own output


def test_far_speck_removed_main_tumor_kept():
    labels = _tumor(shape=(60, 40, 30))
    labels[52:54, 30:32, 25:27] = 2  # 8 voxels, far from the tumor
    out = postprocess(labels)
    assert not out[50:56, 28:34, 23:29].any()
    np.testing.assert_array_equal(out[:45], labels[:45])


def test_big_second_component_kept():
    labels = _tumor(shape=(70, 40, 30))
    second = _sphere(labels.shape, (60, 20, 15), 5)  # ~515 voxels vs ~3050: > 10 %
    labels[second] = 2
    out = postprocess(labels)
    np.testing.assert_array_equal(out, labels)
    assert not postprocess(labels, keep_fraction=0.5)[second].any()
    np.testing.assert_array_equal(postprocess(labels, keep_fraction=0.0), labels)


def test_one_voxel_hole_filled_with_surrounding_label():
    labels = _tumor()
    labels[20, 18, 15] = 0  # inside the necrosis
    labels[20, 18, 20] = 0  # inside the enhancing rim (distance 5 from the centre)
    labels[20, 18, 23] = 0  # inside the edema
    out = postprocess(labels)
    assert out[20, 18, 15] == 1
    assert out[20, 18, 20] == 4
    assert out[20, 18, 23] == 2
    np.testing.assert_array_equal(out, _tumor())


def test_closing_radius_zero_only_removes_components():
    labels = _tumor()
    labels[20, 18, 15] = 0
    out = postprocess(labels, closing_radius=0)
    np.testing.assert_array_equal(out, labels)


def test_tumor_touching_the_border_is_not_eroded():
    labels = np.zeros((20, 20, 20), dtype=np.uint8)
    labels[:5, 5:15, 5:15] = 2
    labels[0, 9:11, 9:11] = 4
    labels[:3, 10, 10] = 1
    out = postprocess(labels, closing_radius=2)
    np.testing.assert_array_equal(out, labels)


def test_gap_bridged_by_closing_gets_neighbour_labels():
    labels = np.zeros((30, 20, 20), dtype=np.uint8)
    labels[5:14, 5:15, 5:15] = 2
    labels[15:24, 5:15, 5:15] = 4  # one-voxel gap at x = 14
    out = postprocess(labels, closing_radius=1)
    assert (out[14, 6:14, 6:14] > 0).all()
    assert set(np.unique(out[14, 6:14, 6:14])) <= {2, 4}
    closed = _closed_mask(labels, 1)
    assert not (out.astype(bool) & ~closed).any()


def test_input_not_modified_and_other_dtypes():
    labels = _tumor().astype(np.int64)
    labels[20, 18, 15] = 0
    before = labels.copy()
    out = postprocess(labels)
    np.testing.assert_array_equal(labels, before)
    assert out.dtype == np.uint8 and out[20, 18, 15] == 1


@pytest.mark.parametrize(
    ("labels", "kwargs"),
    [
        (np.zeros((4, 4), dtype=np.uint8), {}),
        (np.zeros((4, 4, 4), dtype=np.float32), {}),
        (np.full((4, 4, 4), 3, dtype=np.uint8), {}),
        (np.full((4, 4, 4), 5, dtype=np.uint8), {}),
        (np.full((4, 4, 4), -1, dtype=np.int16), {}),
        (np.zeros((4, 4, 4), dtype=np.uint8), {"closing_radius": -1}),
        (np.zeros((4, 4, 4), dtype=np.uint8), {"keep_fraction": 1.5}),
    ],
)
def test_bad_input_raises(labels, kwargs):
    with pytest.raises(ValueError):
        postprocess(labels, **kwargs)


label_maps = arrays(
    np.uint8,
    st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    elements=st.sampled_from([0, 0, 0, 1, 2, 4]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=label_maps, radius=st.integers(0, 2), keep=st.floats(0.0, 1.0))
def test_property_within_closed_mask_and_input_unchanged(labels, radius, keep):
    before = labels.copy()
    out = postprocess(labels, closing_radius=radius, keep_fraction=keep)
    np.testing.assert_array_equal(labels, before)
    assert out.shape == labels.shape and out.dtype == np.uint8
    assert set(np.unique(out).tolist()) <= {0, 1, 2, 4}
    closed = _closed_mask(labels, radius)
    assert not (out.astype(bool) & ~closed).any()
    # Surviving input tumor voxels keep their label.
    same = (out > 0) & (labels > 0)
    np.testing.assert_array_equal(out[same], labels[same])
    if labels.any():
        # The largest component of the closed mask always survives.
        comp, _ = ndi.label(closed, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(comp.ravel())
        sizes[0] = 0
        assert (out[comp == sizes.argmax()] > 0).all()
    else:
        assert not out.any()


@settings(max_examples=60, deadline=None)
@given(labels=label_maps, radius=st.integers(1, 2))
def test_property_keep_all_equals_closing(labels, radius):
    """With keep_fraction=0 the output's tumor is exactly the closed mask."""
    out = postprocess(labels, closing_radius=radius, keep_fraction=0.0)
    np.testing.assert_array_equal(out > 0, _closed_mask(labels, radius))
