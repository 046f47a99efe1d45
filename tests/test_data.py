import re

import numpy as np
import pytest
import torch

from tiramisu_brats import data, io


def test_quantization_round_trip_is_within_half_a_step_and_keeps_background_zero():
    z = np.array([0.0, -3.9, 1.234, 7.77, 11.9], np.float32)
    back = data.dequantize(data.quantize(z))
    assert back[0] == 0.0
    np.testing.assert_allclose(back, z, atol=data.QUANT_STEP / 2 + 1e-6)


def test_cache_is_built_once_and_reused(small_cases, tmp_path):
    cases = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    assert [(c.case_id, c.plane) for c in cases] == [
        (f"syn-{i}", p) for i in range(3) for p in ("axial", "coronal", "sagittal")]
    c = cases[0]
    assert c.images.dtype == np.uint8 and c.images.shape[1:] == (4, 64, 64)
    assert c.classes.shape == (c.images.shape[0], 64, 64)
    assert set(np.unique(c.classes)) == {0, 1, 2, 3}
    assert len(c.tumor_slices) > 0
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    np.testing.assert_array_equal(again[0].images, c.images)
    assert data.is_cache(tmp_path) and len(data.open_cache(tmp_path)) == 9


def test_a_cache_of_another_version_is_refused_with_what_to_do(small_cases, tmp_path):
    import json

    data.build_cache(small_cases, tmp_path, crop=(64, 64))
    meta = tmp_path / "syn-0.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "version": -1}))
    with pytest.raises(io.InputError, match=rf"^{tmp_path}: cache of version -1, this is "
                       rf"version {data.CACHE_VERSION}: build it anew$"):
        data.load_cached(tmp_path, "syn-0")


def test_each_plane_holds_the_same_tumor_voxels(small_cases, tmp_path):
    cases = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    syn0 = [c for c in cases if c.case_id == "syn-0"]
    counts = {c.plane: np.bincount(np.asarray(c.classes).ravel(), minlength=4)[1:]
              for c in syn0}
    # The synthetic brain fits each crop: every tumor voxel is in every plane's slices.
    assert counts["axial"].sum() > 0
    np.testing.assert_array_equal(counts["coronal"], counts["axial"])
    np.testing.assert_array_equal(counts["sagittal"], counts["axial"])
    from tiramisu_brats.preprocess import brain_mask
    from tiramisu_brats.synthetic import make_case

    brain = brain_mask(make_case(0, shape=(48, 40, 32)).image)
    extent = [int(brain.any(axis=tuple(a for a in range(3) if a != k)).sum()) for k in range(3)]
    shapes = {c.plane: c.images.shape[0] for c in syn0}  # slices: the brain's extent along
    assert shapes == {"axial": extent[2], "coronal": extent[1], "sagittal": extent[0]}


def test_several_data_folders_and_a_case_in_two_of_them(small_cases, tmp_path):
    from tiramisu_brats.synthetic import make_case, write_case

    other = tmp_path / "more"
    write_case(make_case(5, shape=(48, 40, 32), case_id="syn-5"), other)
    cases = data.build_cache([small_cases, other], tmp_path / "cache", crop=(64, 64),
                             planes=("axial",))
    assert [c.case_id for c in cases] == ["syn-0", "syn-1", "syn-2", "syn-5"]
    assert data.find_training_cases([other, small_cases]) == {
        **{f"syn-{i}": small_cases / f"syn-{i}" for i in range(3)}, "syn-5": other / "syn-5"}
    write_case(make_case(1, shape=(48, 40, 32), case_id="syn-1"), other)
    with pytest.raises(io.InputError, match="syn-1 is in both"):
        data.build_cache([small_cases, other], tmp_path / "cache2", crop=(64, 64))


def test_labelled_cases_of_a_data_root_in_the_order_asked_and_unknown_ids_refused(
        small_cases, tmp_path):
    root = tmp_path / "data"
    for folder, case in (("brats-labeled", "syn-2"), ("brats-labeled-extra", "syn-0"),
                         ("brats-labeled-extra", "syn-1")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / case).symlink_to(small_cases / case)
    everything = data.labelled_cases(root)
    assert list(everything) == ["syn-0", "syn-1", "syn-2"]
    assert everything["syn-2"] == root / "brats-labeled" / "syn-2"
    first, second = "syn-0", "syn-2"
    assert data.labelled_cases(root, f" {second}, {first} ") == {
        second: everything[second], first: everything[first]}
    for ids, said in ((f"{first},nope", "nope"), (" , ", "(none given)")):
        with pytest.raises(io.InputError, match=re.escape(f"not labelled cases of {root}: {said}")):
            data.labelled_cases(root, ids)
    with pytest.raises(io.InputError, match="not a folder"):
        data.labelled_cases(tmp_path / "nowhere")


def test_cases_are_found_by_their_names_and_an_unlabelled_one_writes_no_cache(tmp_path):
    from tiramisu_brats.synthetic import make_case, write_case

    root = tmp_path / "cases"
    for i in (0, 1):
        write_case(make_case(i, shape=(24, 24, 24), case_id=f"c{i}"), root)
    (root / "c0" / "c0_t1.nii.gz").write_bytes(b"not read")  # the names are enough
    assert data.find_training_cases(root) == {"c0": root / "c0", "c1": root / "c1"}
    write_case(make_case(2, shape=(24, 24, 24), case_id="c2"), root, with_seg=False)
    with pytest.raises(io.InputError, match=r"c2: no segmentation \(_seg\) for training"):
        data.build_cache(root, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_case_folder_missing_a_modality_is_an_error_not_left_out(tmp_path):
    from tiramisu_brats.synthetic import make_case, write_case

    root = tmp_path / "cases"
    for i in (0, 1):
        write_case(make_case(i, shape=(24, 24, 24), case_id=f"c{i}"), root)
    (root / "c1" / "c1_t1ce.nii.gz").unlink()  # labelled, but one image short
    with pytest.raises(io.InputError, match=rf"^{re.escape(str(root / 'c1'))}: no t1ce image "
                                            r"\(expected <case>_t1ce.nii.gz"):
        data.find_training_cases(root)
    with pytest.raises(io.InputError, match="c1: no t1ce image"):
        data.build_cache(root, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_kfold_partitions_the_cases():
    ids = [f"c{i}" for i in range(17)]
    folds = [data.kfold(ids, i, 5) for i in range(5)]
    assert sorted(i for f in folds for i in f) == sorted(ids)
    assert [len(f) for f in folds] == [4, 4, 3, 3, 3]
    # The index counts from 0, whatever the number of cases.
    with pytest.raises(ValueError, match=r"^fold 5 of 5: the fold index counts from 0, so it "
                                         r"must be below 5$"):
        data.kfold(ids[:2], 5, 5)
    with pytest.raises(ValueError, match=r"fold -1 of 5: .* so it must be 0 or more$"):
        data.kfold(ids, -1, 5)
    with pytest.raises(ValueError, match=r"^fold 0 of 1: a k-fold split needs at least 2 folds"):
        data.kfold(ids, 0, 1)
    with pytest.raises(ValueError, match=r"^fold 0 of 18: a 18-fold split needs at least 18 "
                                         r"cases, found 17$"):
        data.kfold(ids, 0, 18)


def test_split_is_by_case():
    train, val = data.split_cases(["a", "b", "c", "d"], val_fraction=0.25, seed=1)
    assert len(val) == 1 and set(train) | set(val) == {"a", "b", "c", "d"}
    assert data.split_cases(["a", "b"], val_cases=["b"]) == (["a"], ["b"])
    assert data.split_cases(["a", "b", "c"], val_cases=["b", "b"]) == (["a", "c"], ["b"])
    with pytest.raises(ValueError, match=r"^validation cases not among the 2 cases found: zz "
                                         r"\(known: a, b\)$"):
        data.split_cases(["a", "b"], val_cases=["zz"])
    ids = [f"c{i}" for i in range(7)]
    with pytest.raises(ValueError, match=r"found: x, y \(known: c0, c1, c2, c3, c4 and 2 more\)$"):
        data.split_cases(ids, val_cases=["y", "c1", "x"])


def test_sampler_centres_patches_on_tumor(small_cases, tmp_path):
    cases = data.build_cache(small_cases, tmp_path, crop=(64, 64))
    rng = np.random.default_rng(0)
    images, classes = data.PatchSampler(cases, (32, 32), tumor_share=1.0).sample(rng, 16)
    assert images.shape == (16, 4, 32, 32) and classes.shape == (16, 32, 32)
    assert all(classes[i].any() for i in range(16))
    _, none = data.PatchSampler(cases, (32, 32), tumor_share=0.0).sample(rng, 64)
    assert sum(not c.any() for c in none) > 0


def test_augment_keeps_shapes_labels_and_background():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 4, 32, 32)
    x[:, :, 8:24, 8:24] = torch.randn(4, 4, 16, 16)
    y = torch.zeros(4, 32, 32, dtype=torch.long)
    y[:, 12:20, 12:20] = 3
    xa, ya = data.augment(x, y, gen)
    assert xa.shape == x.shape and ya.shape == y.shape and ya.dtype == torch.long
    assert set(ya.unique().tolist()) <= {0, 3}
    assert (xa[:, :, :2, :2] == 0).all()  # corners stay background
    # Without geometric or intensity change the batch is only flipped.
    xi, _ = data.augment(x, y, torch.Generator().manual_seed(0), rotate_deg=0, scale=0,
                          intensity=0)
    assert torch.allclose(xi.abs().sum(), x.abs().sum(), rtol=1e-4)


def test_gamma_augmentation_is_one_power_curve_per_sample_and_modality():
    # An image the flips leave as it is, so that input and output pixels correspond.
    r = torch.arange(16, dtype=torch.float32) - 7.5
    ring = (r[:, None] ** 2 + r[None] ** 2) / 100
    x = torch.zeros(64, 4, 32, 32)
    x[:, :, 8:24, 8:24] = ring - 0.5 + torch.arange(4.0)[:, None, None]  # one range each
    y = torch.zeros(64, 32, 32, dtype=torch.long)
    plain = dict(rotate_deg=0, scale=0, intensity=0)
    xg, _ = data.augment(x, y, torch.Generator().manual_seed(0), gamma=0.5, **plain)
    brain = x[:, :, 8:24, 8:24]
    lo, hi = brain.amin((2, 3), keepdim=True), brain.amax((2, 3), keepdim=True)
    out = xg[:, :, 8:24, 8:24]
    torch.testing.assert_close(out.amin((2, 3), keepdim=True), lo)  # the range is kept
    torch.testing.assert_close(out.amax((2, 3), keepdim=True), hi)
    assert (xg[:, :, :8] == 0).all()  # background stays 0
    a, b = (brain - lo) / (hi - lo), (out - lo) / (hi - lo)
    mid = (a > 0.05) & (a < 0.95)
    power = torch.where(mid, b.clamp_min(1e-9).log() / a.clamp_min(1e-9).log(), 0.0)
    per = power.sum((2, 3)) / mid.sum((2, 3))  # one exponent per sample and modality ...
    spread = (torch.where(mid, power, per[..., None, None]) - per[..., None, None]).abs()
    assert spread.amax() < 1e-3
    assert per.min() >= 1 / 1.5 - 1e-4 and per.max() <= 1.5 + 1e-4  # ... within its range
    assert per.min() < 0.8 and per.max() > 1.3
    # gamma 0 draws nothing: the stream, and the batch, are those without the option.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(data.augment(x, y, g1)[0], data.augment(x, y, g2, gamma=0)[0])
    assert torch.equal(g1.get_state(), g2.get_state())


def test_low_resolution_blurs_chosen_samples_only_and_keeps_background():
    # A checkerboard of single pixels: a coarser grid along either axis averages it out.
    x = torch.zeros(200, 4, 32, 32)
    i = torch.arange(16)
    x[:, :, 8:24, 8:24] = torch.where((i[:, None] + i[None]) % 2 == 0, 1.0, -1.0)
    out = data.simulate_low_resolution(x, torch.Generator().manual_seed(0), 0.5)
    inside = out[:, :, 9:23, 9:23]
    blurred = (inside.abs().amax((1, 2, 3)) < 0.999)
    assert 70 < int(blurred.sum()) < 130  # about half the samples
    assert torch.equal(out[~blurred], x[~blurred])  # the others untouched
    assert (out[:, :, :8] == 0).all() and (out[:, :, 24:] == 0).all()  # background stays 0
    # the coarse grid's mean signal: stripes become a smoother profile near their mean
    assert inside[blurred].mean().abs() < 0.1 and inside[blurred].std() < x[0, 0, 9:23, 9:23].std()
    # 0 draws nothing: the stream, and the batch, are those without the option.
    y = torch.zeros(200, 32, 32, dtype=torch.long)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(data.augment(x, y, g1)[0], data.augment(x, y, g2, low_res=0)[0])
    assert torch.equal(g1.get_state(), g2.get_state())
    # the classes stay as they were: only images are blurred
    y[:, 12:20, 12:20] = 3
    plain = dict(rotate_deg=0, scale=0, intensity=0)
    gen = torch.Generator().manual_seed(2)
    _, ya = data.augment(x, y, gen, low_res=1.0, **plain)
    assert torch.equal(ya.float().sum(), y.float().sum())



def test_augmentation_matrices_are_scaled_rotations_or_flipped_ones():
    theta = data.augment_matrices(4096, torch.Generator().manual_seed(0), rotate_deg=10,
                                  scale=0.1)
    a = theta[:, :, :2].double()
    gram = a @ a.transpose(1, 2)
    scale2 = gram[:, 0, 0]
    # Orthogonal columns of one length: no shear, whatever the flips.
    torch.testing.assert_close(gram, scale2[:, None, None] * torch.eye(2, dtype=torch.double)
                               .expand(4096, 2, 2), atol=1e-6, rtol=0)
    assert torch.all((scale2.sqrt() >= 1 / 1.1 - 1e-6) & (scale2.sqrt() <= 1 / 0.9 + 1e-6))
    det = torch.linalg.det(a)
    assert 0.4 < (det < 0).double().mean() < 0.6  # one flip (not two) half of the time
    assert (theta[:, :, 2] == 0).all()
    angles = torch.rad2deg(torch.atan2(a[:, 1, 0], a[:, 0, 0]).abs())
    unflipped = angles[(a[:, 0, 0] > 0) & (det > 0)]
    assert unflipped.max() <= 10 + 1e-4 and unflipped.max() > 9
