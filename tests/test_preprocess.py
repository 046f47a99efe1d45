import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiramisu_brats.preprocess as pp
from tiramisu_brats.preprocess import (
    brain_windows,
    compute_geometry,
    extract,
    preprocess,
    uncrop,
    zscore,
)


def _volume(shape=(60, 70, 20), box=((10, 40), (8, 60), (3, 17)), seed=0):
    rng = np.random.default_rng(seed)
    image = np.zeros((4, *shape), np.float32)
    (a, b), (c, d), (e, f) = box
    image[:, a:b, c:d, e:f] = rng.uniform(50, 500, (4, b - a, d - c, f - e))
    return image


def test_crop_puts_the_long_side_along_the_longer_brain_extent():
    image = _volume()  # brain extent 30 along X, 52 along Y
    slices, g = preprocess(image, crop=(64, 32))
    assert slices.shape == (14, 4, 64, 32) and slices.dtype == np.float32
    assert not g.h_is_x and (g.size_y, g.size_x) == (64, 32) and (g.z0, g.z1) == (3, 17)


def test_brats_sized_volume_gives_192x160_slices():
    image = _volume((240, 240, 155), ((50, 190), (30, 200), (10, 150)))
    slices, _ = preprocess(image)
    assert slices.shape == (140, 4, 192, 160)


def test_a_brain_wider_than_the_crop_grows_it_to_a_multiple_of_32():
    image = _volume((240, 240, 20), ((5, 235), (20, 200), (0, 20)))
    _, g = preprocess(image)
    assert g.h_is_x and g.slice_shape == (256, 192)


def test_zscore_is_mean_0_std_1_in_the_brain_and_0_outside():
    image = _volume()
    slices, _ = preprocess(image, crop=(64, 64))
    for c in range(4):
        brain = slices[:, c][slices[:, c] != 0]
        assert abs(brain.mean()) < 1e-5 and abs(brain.std() - 1) < 1e-5
    assert np.count_nonzero(slices) == np.count_nonzero(image)


def test_preprocess_does_not_change_its_input():
    image = _volume()
    before = image.copy()
    preprocess(image, crop=(64, 64))
    np.testing.assert_array_equal(image, before)


def test_integer_volume_gives_the_slices_of_its_float32_copy():
    """What ``io.read_case(keep_dtype=True)`` hands over: int16, each modality X fastest."""
    image = np.round(_volume((60, 70, 20))).astype(np.int16)
    f_order = np.empty((4, 20, 70, 60), np.int16).transpose(0, 3, 2, 1)
    f_order[...] = image
    want, g = preprocess(image.astype(np.float32), crop=(64, 32))
    for variant in (image, f_order):
        got, g2 = preprocess(variant, crop=(64, 32))
        assert got.dtype == np.float32 and g2 == g
        np.testing.assert_array_equal(got, want)
    # Voxels float32 cannot hold exactly are z-scored as given, as by zscore.
    wide = _volume((60, 70, 20)).astype(np.float64) + 1e-9
    got, g3 = preprocess(wide, crop=(64, 32))
    np.testing.assert_array_equal(got, zscore(extract(wide, g3)))
    np.testing.assert_array_equal(extract(image, g, np.dtype(np.float32)), extract(image, g))
    assert extract(image, g).dtype == np.int16
    assert extract(image, g, np.dtype(np.float32)).dtype == np.float32


def test_all_zero_volume_is_refused():
    with pytest.raises(ValueError, match="no brain"):
        compute_geometry(np.zeros((4, 8, 8, 8), np.float32))


def test_zscore_of_a_constant_modality_stays_finite():
    s = np.zeros((2, 1, 4, 4), np.float32)
    s[:, :, 1:3, 1:3] = 7
    out = zscore(s)
    assert np.isfinite(out).all() and np.count_nonzero(out) == 0


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(3, 70), st.integers(3, 70), st.integers(1, 12)),
    data=st.data(),
)
def test_extract_then_uncrop_gives_back_the_grid(shape, data):
    lo = [data.draw(st.integers(0, s - 1)) for s in shape]
    hi = [data.draw(st.integers(lo_ + 1, s)) for lo_, s in zip(lo, shape)]
    crop = (data.draw(st.sampled_from([32, 64])), data.draw(st.sampled_from([32, 64])))
    rng = np.random.default_rng(0)
    labels = np.zeros(shape, np.uint8)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    labels[box] = rng.integers(1, 5, [b - a for a, b in zip(lo, hi)])
    image = np.stack([labels.astype(np.float32)] * 4)
    image[:, lo[0], lo[1], lo[2]] = 1  # make sure the brain box is exactly lo:hi
    image[:, hi[0] - 1, hi[1] - 1, hi[2] - 1] = 1
    g = compute_geometry(image, crop)
    slices = extract(labels, g)
    assert slices.shape == (g.n_slices, *g.slice_shape)
    assert g.slice_shape[0] % 32 == 0 and g.slice_shape[1] % 32 == 0
    back = uncrop(slices, g)
    assert back.shape == labels.shape and back.dtype == labels.dtype
    np.testing.assert_array_equal(back, labels)  # nothing inside the brain box was cut
    multi = extract(np.stack([labels, labels * 2]), g)
    np.testing.assert_array_equal(uncrop(multi, g)[1], labels * 2)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.tuples(st.integers(3, 70), st.integers(3, 70), st.integers(1, 12)),
    data=st.data(),
)
def test_uncrop_of_a_box_is_that_part_of_the_whole_uncrop(shape, data):
    rng = np.random.default_rng(1)
    image = np.zeros((4, *shape), np.float32)
    brain = tuple(slice(n // 4, max(3 * n // 4, n // 4 + 1)) for n in shape)
    image[(slice(None), *brain)] = rng.uniform(1, 5, (4, *(s.stop - s.start for s in brain)))
    g = compute_geometry(image, (32, 32))
    lo = [data.draw(st.integers(0, n - 1)) for n in shape]
    box = tuple(slice(a, data.draw(st.integers(a + 1, n))) for a, n in zip(lo, shape))
    slices = rng.integers(1, 5, (g.n_slices, 2, *g.slice_shape)).astype(np.uint8)
    part = pp.uncrop(slices[pp.box_slices(g, box)], g, box)
    np.testing.assert_array_equal(part, pp.uncrop(slices, g)[(slice(None), *box)])


def test_a_box_seen_along_a_plane_holds_the_same_voxels():
    volume = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    box = (slice(1, 3), slice(2, 6), slice(0, 4))
    for plane in pp.PLANES:
        np.testing.assert_array_equal(pp.to_plane(volume, plane)[pp.plane_box(box, plane)],
                                      pp.to_plane(volume[box], plane))


def test_a_box_window_is_the_brain_window_of_its_rectangle():
    image = _volume()  # brain 10:40 x 8:60 x 3:17: H along Y
    g = compute_geometry(image, (64, 32))
    box = (slice(20, 26), slice(30, 41), slice(0, 20))
    rect = np.zeros((1, 1, *g.slice_shape), bool)
    rect[0, 0, 30 - g.y0 : 41 - g.y0, 20 - g.x0 : 26 - g.x0] = True
    window = pp.box_window(g, box, margin=8)
    assert window == brain_windows(rect, margin=8)[0]
    assert (window[0].stop - window[0].start, window[1].stop - window[1].start) == (32, 32)
    assert pp.box_window(g, (slice(0, 1), slice(0, 1), slice(0, 20)), margin=8) is None
    assert pp.box_slices(g, (slice(0, 5), slice(0, 5), slice(10, 30))) == slice(7, 14)
    assert pp.box_slices(g, (slice(0, 5), slice(0, 5), slice(18, 30))) == slice(14, 14)


def test_brain_windows_hold_each_slices_brain_with_its_margin():
    slices = np.zeros((4, 2, 192, 160), np.float32)
    slices[0, 1, 90:100, 70:75] = 1.0  # a small brain: the smallest window
    slices[1, 0, 10:150, 5:150] = 2.0  # 140 + 16 -> 160 rows, 145 + 16 -> 160 columns
    slices[3, :, 0:192, 100:101] = 3.0  # touches the top and bottom: the whole height
    before = slices.copy()
    windows = brain_windows(slices, margin=8, shape_cost=0)
    np.testing.assert_array_equal(slices, before)
    assert windows[2] is None
    assert windows[0] == (slice(79, 111), slice(56, 88))  # centred on the brain
    assert windows[1] == (slice(0, 160), slice(0, 160))  # kept inside the slice
    assert windows[3] == (slice(0, 192), slice(84, 116))
    for s, w in zip(slices, windows):
        if w is None:
            continue
        assert all((part.stop - part.start) % 32 == 0 for part in w)
        inside = np.zeros(s.shape[1:], bool)
        inside[w] = True
        assert not (s.any(axis=0) & ~inside).any()  # no brain pixel left out
    assert brain_windows(slices, margin=0, shape_cost=0)[1] == (slice(0, 160), slice(0, 160))
    with pytest.raises(ValueError, match="multiples of 32"):
        brain_windows(np.zeros((1, 4, 100, 96), np.float32))


def test_rare_window_sizes_grow_into_larger_ones_in_use():
    slices = np.zeros((7, 1, 192, 160), np.float32)
    for k in range(4):  # 4 slices of 112 x 112 rows/columns of brain: windows 128 x 128
        slices[k, 0, 40:152, 20:132] = 1.0
    slices[4, 0, 60:100, 50:80] = 1.0  # one of 64 x 64: 12,288 px more as 128 x 128
    slices[5, 0, 10:180, 0:150] = 1.0  # 192 x 160 ...
    slices[6, 0, 20:160, 60:76] = 1.0  # ... and 160 x 32: 25,600 px more as 192 x 160

    def sizes(windows):
        return [(w[0].stop - w[0].start, w[1].stop - w[1].start) for w in windows]

    small = sizes(brain_windows(slices, margin=8, shape_cost=0))
    assert small == [(128, 128)] * 4 + [(64, 64), (192, 160), (160, 32)]
    # 12,288 < 13,000: the lone 64 x 64 joins 128 x 128, 160 x 32 stays.
    assert sizes(brain_windows(slices, margin=8, shape_cost=13_000)) == (
        [(128, 128)] * 5 + [(192, 160), (160, 32)])
    # Then 25,600: 160 x 32 into 192 x 160; 128 x 128 (5 slices: 5 x 14,336) stays.
    grown = brain_windows(slices, margin=8, shape_cost=30_000)
    assert sizes(grown) == [(128, 128)] * 5 + [(192, 160)] * 2
    for s, w in zip(slices, grown):  # still centred on the brain, which it holds with margin
        rows, cols = np.flatnonzero(s[0].any(1)), np.flatnonzero(s[0].any(0))
        assert w[0].start <= max(rows[0] - 8, 0) and w[0].stop >= min(rows[-1] + 9, 192)
        assert w[1].start <= max(cols[0] - 8, 0) and w[1].stop >= min(cols[-1] + 9, 160)


@pytest.mark.parametrize("plane", pp.PLANES)
def test_planes_round_trip_and_put_the_plane_normal_last(plane):
    volume = np.arange(2 * 5 * 6 * 7).reshape(2, 5, 6, 7)
    view = pp.to_plane(volume, plane)
    normal = {"axial": 7, "coronal": 6, "sagittal": 5}[plane]
    assert view.shape[0] == 2 and view.shape[-1] == normal
    assert np.shares_memory(view, volume)
    np.testing.assert_array_equal(pp.from_plane(view, plane), volume)
    # A coronal slice is the volume at one Y, a sagittal one at one X.
    if plane == "coronal":
        np.testing.assert_array_equal(view[..., 3], volume[:, :, 3, :])
    if plane == "sagittal":
        np.testing.assert_array_equal(view[..., 2], volume[:, 2, :, :])


def test_unknown_plane_is_refused():
    with pytest.raises(ValueError, match="unknown plane 'oblique'"):
        pp.to_plane(np.zeros((1, 2, 2, 2)), "oblique")
    with pytest.raises(ValueError, match="unknown plane 'oblique'"):
        pp.from_plane(np.zeros((1, 2, 2, 2)), "oblique")


def _reoriented(volume: np.ndarray, affine: np.ndarray, ornt: np.ndarray):
    """``volume`` (C, X, Y, Z) stored in another axis orientation, as nibabel would."""
    import nibabel as nib

    img = nib.Nifti1Image(np.moveaxis(volume, 0, -1), affine).as_reoriented(ornt)
    return np.moveaxis(np.asarray(img.dataobj), -1, 0), img.affine


def _all_orientations():
    import itertools

    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.array([[perm[i], flips[i]] for i in range(3)], float)


def test_every_axis_orientation_gives_the_same_network_grid_and_maps_back_exactly():
    rng = np.random.default_rng(0)
    volume = rng.random((2, 5, 6, 7)).astype(np.float32)
    brats = np.diag([-1.0, -1.0, 1.0, 1.0])
    reference = pp.to_network(volume, pp.network_grid(brats, (5, 6, 7)))
    np.testing.assert_array_equal(reference, volume)  # BraTS: already the trained one
    seen = set()
    for ornt in _all_orientations():
        stored, affine = _reoriented(volume, brats, ornt)
        grid = pp.network_grid(affine, stored.shape[1:])
        seen.add(grid.axes)
        np.testing.assert_array_equal(pp.to_network(stored, grid), reference)
        np.testing.assert_array_equal(pp.to_input(reference[0], grid), stored[0])
        assert grid.oblique_deg == 0 and not grid.resampled
    assert len(seen) == 48


def test_oblique_affine_uses_the_closest_axes_and_says_how_far():
    theta = np.radians(12.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                    [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0])
    grid = pp.network_grid(affine, (4, 5, 6))
    assert grid.axes == ("L", "P", "S") and grid.oblique_deg == pytest.approx(12.0, abs=0.01)


def test_anisotropic_voxels_are_resampled_to_1mm_and_labels_come_back_by_nearest():
    affine = np.diag([-0.5, -0.5, 3.0, 1.0])
    grid = pp.network_grid(affine, (40, 30, 6))
    assert grid.resampled and grid.network_shape == (20, 15, 18)
    assert pp.network_grid(affine, (40, 30, 6), resample=False).network_shape == (40, 30, 6)
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None, None], (40, 30, 6))
    up = pp.to_network(ramp[None], grid)[0]
    # Linear along X: the corner voxels coincide, values in between interpolated.
    np.testing.assert_allclose(up[:, 0, 0], np.linspace(0, 39, 20), atol=1e-4)
    labels = np.zeros(grid.network_shape, np.uint8)
    labels[5:15, 3:12, 4:14] = 2
    back = pp.to_input(labels, grid)
    assert back.shape == (40, 30, 6)
    # Each input voxel takes the label of the network voxel nearest to it.
    ix = np.rint(np.arange(40) * 19 / 39).astype(int)
    iy = np.rint(np.arange(30) * 14 / 29).astype(int)
    iz = np.rint(np.arange(6) * 17 / 5).astype(int)
    np.testing.assert_array_equal(back, labels[np.ix_(ix, iy, iz)])


def test_an_affine_that_maps_nothing_is_refused():
    with pytest.raises(ValueError, match="does not map voxels"):
        pp.network_grid(np.diag([1.0, 0.0, 1.0, 1.0]), (2, 2, 2))


def test_implausible_voxel_sizes_are_refused_before_resampling():
    # A header in metres, or an affine scaled by 10: a grid of one voxel, or of gigabytes.
    with pytest.raises(ValueError, match=r"voxels of 0\.01x0\.01x0\.01 mm \(from the affine\) "
                       r"are implausibly small for an MRI \(under 0\.05 mm\)"):
        pp.network_grid(np.diag([0.01, 0.01, 0.01, 1.0]), (100, 90, 40))
    with pytest.raises(ValueError, match=r"voxels of 10x10x10 mm \(from the affine\) on a "
                       r"\(100, 90, 40\) grid span 1000x900x400 mm, implausibly large"):
        pp.network_grid(np.diag([10.0, 10.0, 10.0, 1.0]), (100, 90, 40))
    # Kept as they are, such voxels cost nothing: left to the caller who asked for that.
    kept = pp.network_grid(np.diag([10.0, 10.0, 10.0, 1.0]), (100, 90, 40), resample=False)
    assert kept.network_shape == (100, 90, 40)
    # The largest plausible grids pass: 0.5 mm over 512 mm, 5 mm slices over 200 mm; and
    # 1 mm axes of any size, kept as they are (a zero-padded image).
    assert pp.network_grid(np.diag([0.5, 0.5, 5.0, 1.0]), (1024, 1024, 40)).network_shape == (
        512, 512, 200)
    assert pp.network_grid(np.diag([1.0, 1.0, 3.0, 1.0]), (700, 600, 40)).network_shape == (
        700, 600, 120)


def test_probabilities_come_back_to_a_resampled_input_grid_linearly():
    grid = pp.network_grid(np.diag([-0.5, -0.5, 3.0, 1.0]), (40, 30, 6))
    ramp = np.broadcast_to(np.linspace(0, 1, 20, dtype=np.float32)[:, None, None],
                           grid.network_shape)
    back = pp.to_input(np.stack([ramp, 1 - ramp]), grid, linear=True)
    assert back.shape == (2, 40, 30, 6) and back.dtype == np.float32
    np.testing.assert_allclose(back[0, :, 0, 0], np.linspace(0, 1, 40), atol=1e-5)
    np.testing.assert_allclose(back.sum(0), 1, atol=1e-5)


@pytest.mark.parametrize("spacing, shape", [((1.6, 1.0, 1.0), (77, 8, 8)),
                                            ((2.0, 1.0, 1.0), (110, 8, 8)),
                                            ((0.7, 1.0, 1.0), (80, 8, 8))])
def test_probabilities_brought_back_keep_their_sum_to_the_input_grids_last_voxels(
        spacing, shape):
    # At these sizes scipy's zoom put the last input voxels a rounding error outside the
    # network grid, and filled them with 0: probabilities 0 for every class, which the
    # region-probability labels read as tumor (accurate mode's edema on the last planes; found
    # on a 1.503 x 1.503 x 1 mm copy of a real case, 160 x 160 voxels).
    grid = pp.network_grid(np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]), shape)
    probs = np.zeros((4, *grid.network_shape), np.float32)
    probs[0] = 1  # background everywhere
    back = pp.to_input(probs, grid, linear=True)
    assert back.shape == (4, *shape)
    np.testing.assert_allclose(back[0], 1, atol=1e-6)
    up = pp.to_network(np.ones((1, *shape), np.float32), grid)
    np.testing.assert_allclose(up, 1, atol=1e-6)


def test_in_plane_voxels_up_to_1_5_mm_are_kept_and_the_others_brought_to_1_mm():
    def grid(spacing, shape):
        return pp.network_grid(np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]), shape)

    kept = grid((1.5, 1.2, 1.0), (160, 200, 155))
    assert not kept.resampled and kept.network_spacing() == pytest.approx((1.5, 1.2, 1.0))
    assert not kept.unlike_training()
    # within the tolerance of 1 mm an axis is kept whatever the others (1.02 mm slices were
    # resampled, and the case ran every slice, as soon as an in-plane axis was 1.5 mm)
    for spacing, shape in (((1.5, 1.5, 1.02), (160, 160, 155)),
                           ((1.5, 0.97, 1.0), (160, 240, 155))):
        assert not grid(spacing, shape).resampled
    single = grid((1.5, 1.5, 3.0), (160, 160, 1))  # one slice: its own thickness
    assert single.network_spacing() == pytest.approx((1.5, 1.5, 3.0))
    as_is = pp.network_grid(np.diag([-0.5, -0.5, 1.0, 1.0]), (480, 480, 155), resample=False)
    assert as_is.unlike_training()  # half-millimetre voxels the network never saw
    # the slice axis and in-plane axes outside 1-1.5 mm are resampled, the others kept
    thick = grid((1.5, 1.0, 3.0), (160, 240, 52))
    assert thick.network_shape == (160, 240, 156)
    assert thick.network_spacing() == pytest.approx((1.5, 1.0, 153 / 155))
    assert grid((2.0, 0.5, 1.0), (120, 480, 155)).network_shape == (240, 240, 155)
    # stored in another orientation: X and Y are the network's (the axial slices' axes)
    sagittal = pp.network_grid(np.array([[0, 0, -1.0, 0], [0, -1.5, 0, 0], [1.5, 0, 0, 0],
                                         [0, 0, 0, 1]]), (100, 160, 155))
    assert sagittal.oriented_spacing() == (1.0, 1.5, 1.5)
    assert sagittal.network_shape == (155, 160, 150)
    assert grid((1.5, 1.5, 1.0), (160, 160, 155)).network_shape == (160, 160, 155)
    assert grid((1.5, 1.5, 1.0), (160, 160, 155)) == pp.network_grid(
        np.diag([-1.5, -1.5, 1.0, 1.0]), (160, 160, 155), resample=False)
