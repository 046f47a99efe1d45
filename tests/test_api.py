"""The Python API as users call it: modes, views, the README's example."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tiramisu_brats import api, export, infer, io, metrics
from tiramisu_brats.postprocess import postprocess
from tiramisu_brats.preprocess import preprocess as real_preprocess
from tiramisu_brats.synthetic import make_case, write_case


@pytest.fixture(scope="module")
def case():
    return make_case(4, shape=(64, 64, 40))


@pytest.fixture(scope="module")
def accurate(tiny_weights):
    return api.Segmenter(tiny_weights, "torch", mode="accurate", crop=(64, 64))


def test_accurate_mode_is_the_mean_of_every_views_probabilities(case, accurate):
    seg = accurate.segment(case.image, all_slices=True)
    views = [accurate.view_probabilities(case.image, plane, flip)
             for plane, flip in api.MODES["accurate"]]
    assert len(views) == 6 and all(v.shape == (4, 64, 64, 40) for v in views)
    mean = np.mean(views, axis=0)
    np.testing.assert_array_equal(seg.raw, io.CLASS_TO_LABEL[mean.argmax(0)])
    np.testing.assert_array_equal(seg.labels, postprocess(seg.raw))
    assert seg.slices["brain"] == 2 * sum(
        len(np.flatnonzero((case.image != 0).any(axis=(0, *(a for a in (1, 2, 3) if a != k)))))
        for k in (1, 2, 3))
    assert seg.slices["run"] == seg.slices["brain"]


def test_accurate_mode_fuses_three_planes_of_each_model_when_the_weights_have_a_partner(
        case, tmp_path, random_weights, write_partner, monkeypatch):
    weights = random_weights(tmp_path)
    write_partner(weights, decision='{"region_threshold": 0.4, "qc_spread_review": 0.3}')
    fast = api.Segmenter(weights, "torch", crop=(64, 64))
    assert fast.partner is None and fast.threshold is None  # fast mode: the weights alone
    seg = api.Segmenter(weights, "torch", crop=(64, 64), mode="accurate")
    assert seg.views == api.PARTNER_VIEWS and len(seg.views) == 6
    assert (seg.threshold, seg.qc_review) == (0.4, 0.3)  # the partner's decision
    mine, theirs = (seg.view_probabilities(case.image, "coronal", model=m) for m in (0, 1))
    assert np.abs(mine - theirs).max() > 0.01  # two different networks
    views = [seg.view_probabilities(case.image, plane, flip, model=model)
             for plane, flip, model in seg.views]
    planes = []  # the planes segment preprocesses: each once, for both models
    monkeypatch.setattr(api, "preprocess", lambda image, crop: planes.append(image.shape) or
                        real_preprocess(image, crop))
    result = seg.segment(case.image, all_slices=True)
    assert planes == [(4, 64, 64, 40), (4, 64, 40, 64), (4, 64, 40, 64)]
    np.testing.assert_array_equal(result.raw,
                                  infer.region_labels(np.mean(views, axis=0), 0.4))
    wt = np.stack([1 - v[0] for v in views])
    np.testing.assert_allclose(result.uncertainty, wt.std(0), atol=1e-4)  # sums of squares
    info = seg.model_info()
    assert info["views"][3:] == ["axial (partner)", "coronal (partner)", "sagittal (partner)"]
    assert info["partner"]["sha256"] == export.file_sha256(weights.with_name(
        "tiny.partner.safetensors"))
    assert info["labels_by"] == "region probabilities > 0.4"
    with pytest.raises(ValueError, match="no partner model loaded"):
        fast.view_probabilities(case.image, model=1)
    alone = api.Segmenter(weights, "torch", crop=(64, 64), mode="accurate", partner=weights)
    assert alone.threshold is None  # a partner without a decision: the argmax
    np.testing.assert_allclose(alone.view_probabilities(case.image, "coronal", model=1), mine)


class _Bright(infer.Backend):
    """Edema where FLAIR (channel 3) is above ``level`` standard deviations: a rule voxel by
    voxel, so every view gives the same probabilities."""

    def __init__(self, level: float) -> None:
        self.level = level

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(batch), 4, *batch.shape[2:]), np.float32)
        logits[:, 0] = 1  # background, clear of the tumor classes (no ties)
        logits[:, 2] = 4 * (batch[:, 3] - self.level) + 1
        return logits


def test_accurate_tumor_slices_run_the_later_views_near_the_first_views_tumor(
        case, tiny_weights, monkeypatch):
    monkeypatch.setattr(api, "VIEW_MARGIN", 2)
    seg = api.Segmenter(tiny_weights, "torch", mode="accurate", crop=(64, 64))
    seg.backend = _Bright(2.0)
    near, every = seg.segment(case.image), seg.segment(case.image, all_slices=True)
    np.testing.assert_array_equal(near.labels, every.labels)
    first = postprocess(io.CLASS_TO_LABEL[seg.view_probabilities(case.image).argmax(0)])
    tumor = first > 0  # where every view ran (elsewhere the first may not have)
    np.testing.assert_allclose(near.uncertainty[tumor], every.uncertainty[tumor], atol=1e-6)
    assert near.slices["brain"] == every.slices["run"] == every.slices["brain"]
    # The first view runs its tumor slices, as fast mode does; each later one the brain
    # slices along its normal that cross the box of the first view's postprocessed tumor,
    # widened by 2.
    ran = {}
    infer.predict_labels(seg.backend, real_preprocess(case.image, (64, 64))[0],
                         tumor_slices=True, stats=ran)
    brain = (case.image != 0).any(axis=0)
    count = {}
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        lo, hi = np.flatnonzero(brain.any(axis=others))[[0, -1]]
        t_lo, t_hi = np.flatnonzero((first > 0).any(axis=others))[[0, -1]]
        count[axis] = (hi - lo + 1, min(hi, t_hi + 2) - max(lo, t_lo - 2) + 1)
    z, y, x = count[2], count[1], count[0]  # axial, coronal, sagittal normals
    assert ran["run"] < z[0]
    assert near.slices["run"] == ran["run"] + z[1] + 2 * y[1] + 2 * x[1] < every.slices["run"]
    seg.backend = _Bright(100.0)  # no tumor: each view (two per plane) its coarse pass alone
    coarse = sum(2 * len(range(0, n[0], infer.TUMOR_STRIDE)) for n in (z, y, x))
    assert seg.segment(case.image).slices["run"] == coarse


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize("flip", [False, True])
def test_a_view_of_a_box_runs_the_slices_crossing_it_and_gives_the_box_alone(
        case, accurate, plane, flip):
    box = (slice(20, 41), slice(12, 30), slice(5, 17))  # not symmetric in X, flipped or not
    whole = accurate.view_probabilities(case.image, plane, flip)
    stats = {}
    near = accurate.view_probabilities(case.image, plane, flip, box=box, stats=stats)
    assert near.shape == (4, 21, 18, 12)
    # the same slices (whole ones with torch), batched with others (float rounding)
    np.testing.assert_allclose(near, whole[(slice(None), *box)], atol=1e-6)
    inside = np.zeros((64, 64, 40), bool)
    inside[box] = True
    axis = {"axial": 2, "coronal": 1, "sagittal": 0}[plane]
    crossing = inside.any(axis=tuple(a for a in range(3) if a != axis))
    brain = (case.image != 0).any(axis=tuple(a for a in range(4) if a != 1 + axis))
    assert stats["run"] == np.count_nonzero(brain & crossing)


@pytest.mark.slow
def test_with_brain_windows_a_view_near_a_box_runs_one_window_around_it(
        case, tiny_weights, monkeypatch):
    seg = api.Segmenter(tiny_weights, "openvino", precision="fp32", mode="accurate",
                        crop=(64, 64))
    seen, real = [], api.predict_probabilities
    monkeypatch.setattr(api, "predict_probabilities", lambda *args, **kw: (
        seen.append(args[4]) or real(*args, **kw)))
    box = (slice(28, 34), slice(12, 20), slice(5, 17))  # 6 x 8 in-plane: + 8 each way, to 32
    seg.view_probabilities(case.image, "axial", box=box)
    (windows,) = seen
    geometry = real_preprocess(case.image, (64, 64))[1]
    rows, cols = (box[0], box[1]) if geometry.h_is_x else (box[1], box[0])
    x0, y0 = (geometry.x0, geometry.y0) if geometry.h_is_x else (geometry.y0, geometry.x0)
    assert len(windows) == 12 and all(w == windows[0] for w in windows)  # Z 5:17
    (r, c) = windows[0]
    assert (r.stop - r.start, c.stop - c.start) == (32, 32)
    assert r.start <= rows.start - x0 and rows.stop - x0 <= r.stop
    assert c.start <= cols.start - y0 and cols.stop - y0 <= c.stop


def test_a_view_flipped_back_is_the_mirror_of_the_flipped_image(case, accurate):
    mirrored = np.ascontiguousarray(case.image[:, ::-1])
    a = accurate.view_probabilities(case.image, "coronal", flip=True)
    b = accurate.view_probabilities(mirrored, "coronal", flip=False)[:, ::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_accurate_mode_of_a_mirrored_image_is_the_mirrored_labels(case, accurate):
    seg = accurate.segment(case.image)
    mirrored = accurate.segment(np.ascontiguousarray(case.image[:, ::-1]))
    # Every view comes with its mirror: the same sum of probabilities, up to rounding.
    assert (mirrored.labels[::-1] == seg.labels).mean() > 0.999


def test_segment_case_records_the_mode(tmp_path, tiny_weights):
    folder = write_case(make_case(1, shape=(64, 64, 40), case_id="syn-1"), tmp_path)
    files = io.find_case_files(folder)
    for mode in api.MODES:
        seg = api.Segmenter(tiny_weights, "torch", mode=mode, crop=(64, 64))
        summary = seg.segment_case(files, tmp_path / f"{mode}.nii.gz")
        written = json.loads((tmp_path / f"{mode}.json").read_text())
        assert summary["mode"] == written["mode"] == mode
        assert len(written["model"]["views"]) == len(api.MODES[mode])
        labels, _, _ = io.read_label_map(tmp_path / f"{mode}.nii.gz")
        assert labels.shape == (64, 64, 40)
        # volumes as metrics gives them, to 0.0001 ml: no float noise in the JSON
        volumes = metrics.volumes_ml(labels, written["spacing_mm"])
        assert written["volumes_ml"] == {k: pytest.approx(v, abs=5e-5) for k, v in volumes.items()}
        assert all(len(repr(v).partition(".")[2]) <= 4 for v in written["volumes_ml"].values())


def test_unknown_mode_is_refused(tiny_weights):
    with pytest.raises(ValueError, match="unknown mode 'best'"):
        api.Segmenter(tiny_weights, "torch", mode="best")


@pytest.mark.real
@pytest.mark.slow
def test_the_readme_example_runs(real_case, tmp_path, monkeypatch):
    monkeypatch.chdir(real_case("brats-labeled/BraTS2021_00006").parent)
    case = api.read_case("BraTS2021_00006/")
    assert case.image.shape == (4, 240, 240, 155) and case.image.dtype == np.float32
    seg = api.segment(case.image)
    assert seg.labels.shape == case.shape and set(np.unique(seg.labels)) <= {0, 1, 2, 4}
    io.write_label_map(tmp_path / "out.nii.gz", seg.labels, case.header, case.affine)
    (tmp_path / "pred").mkdir()
    segmenter = api.Segmenter(backend="torch")
    summary = segmenter.segment_case(io.find_case_files("BraTS2021_00006/"),
                                     tmp_path / "pred" / "BraTS2021_00006.nii.gz")
    assert summary["volumes_ml"]["WT_ml"] > 50
    rows = api.evaluate(tmp_path / "pred", ".", tmp_path / "report")
    assert [r["case"] for r in rows] == ["BraTS2021_00006"] and rows[0]["dice_WT"] > 0.9


def _store(folder, image, seg, affine, ornt, case_id):
    """Write a case (BraTS 2021 naming, .nii) stored in the axis orientation ``ornt``."""
    import nibabel as nib

    folder.mkdir(parents=True)
    for name, volume in zip(("t1", "t1ce", "t2", "flair", "seg"), (*image, seg), strict=True):
        img = nib.Nifti1Image(np.asarray(volume), affine).as_reoriented(ornt)
        img.set_qform(img.affine, 1)
        img.set_sform(img.affine, 1)
        nib.save(img, folder / f"{case_id}_{name}.nii")
    return folder


def _orientations():
    import itertools

    for perm in itertools.permutations(range(3)):
        for flips in itertools.product((1, -1), repeat=3):
            yield np.array([[perm[i], flips[i]] for i in range(3)], float)


@pytest.mark.slow
def test_any_of_the_48_orientations_gives_the_same_label_map(tmp_path, tiny_weights):
    import nibabel as nib

    syn = make_case(2, shape=(64, 64, 40))
    segmenter = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    outputs = {}
    for k, ornt in enumerate(_orientations()):
        folder = _store(tmp_path / f"o{k}", syn.image, syn.labels, syn.affine, ornt, "c")
        summary = segmenter.segment_case(io.find_case_files(folder), tmp_path / f"o{k}.nii.gz")
        labels = nib.load(tmp_path / f"o{k}.nii.gz")
        stored = nib.load(folder / "c_t1.nii")
        assert labels.shape == stored.shape
        np.testing.assert_allclose(labels.affine, stored.affine)
        # Brought back to the first storage: voxel for voxel the same map.
        back = labels.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.io_orientation(labels.affine),
            nib.orientations.io_orientation(syn.affine)))
        outputs[summary["grid"]["axes"]] = np.asarray(back.dataobj)
    assert len(outputs) == 48
    first = outputs["LPS"]
    assert first.any()
    for axes, labels in outputs.items():
        np.testing.assert_array_equal(labels, first, err_msg=axes)


@pytest.mark.real
@pytest.mark.slow
def test_a_real_case_in_other_orientations_gives_the_same_label_map(real_case, tmp_path):
    import nibabel as nib

    files = io.find_case_files(real_case("brats-labeled/BraTS2021_00005"))
    case = io.read_case(files, keep_dtype=True)
    seg = io.read_label_map(files.seg)[0]
    segmenter = api.Segmenter()
    as_stored = segmenter.segment_case(files, tmp_path / "stored.nii.gz")
    reference = np.asarray(nib.load(tmp_path / "stored.nii.gz").dataobj)
    ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(case.affine),
                                          nib.orientations.axcodes2ornt("RAS"))
    slices_first = np.array([[2, 1], [1, 1], [0, 1]], float)  # slices along the first axis
    for name, ornt in (("RAS", ras), ("slices first", slices_first)):
        folder = _store(tmp_path / name.replace(" ", "_"), case.image, seg, case.affine, ornt,
                        "BraTS2021_00005")
        summary = segmenter.segment_case(io.find_case_files(folder), tmp_path / f"{name}.nii.gz")
        out = nib.load(tmp_path / f"{name}.nii.gz")
        back = out.as_reoriented(nib.orientations.ornt_transform(
            nib.orientations.io_orientation(out.affine),
            nib.orientations.io_orientation(case.affine)))
        np.testing.assert_array_equal(np.asarray(back.dataobj), reference, err_msg=name)
        assert summary["volumes_ml"] == as_stored["volumes_ml"]


def _resampled(image, seg, affine, spacing):
    """The case on a grid of ``spacing`` mm (images linear, labels nearest), same field of
    view: corner voxels on the 1 mm grid's corners."""
    from scipy import ndimage

    shape = image.shape[1:]
    target = [round((n - 1) / z) + 1 for n, z in zip(shape, spacing, strict=True)]
    factors = [m / n for n, m in zip(shape, target, strict=True)]
    img = np.stack([ndimage.zoom(m.astype(np.float32), factors, order=1, grid_mode=False)
                    for m in image]).round().astype(np.int16)
    lab = ndimage.zoom(seg, factors, order=0, grid_mode=False)
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] @ np.diag([(n - 1) / (m - 1) for n, m in
                                            zip(shape, target, strict=True)])
    return img, lab, new


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.parametrize("spacing", [(0.5, 0.5, 1.0), (1.0, 1.0, 3.0)])
def test_a_real_case_at_another_voxel_size_scores_as_at_1mm(real_case, tmp_path, spacing):
    files = io.find_case_files(real_case("brats-labeled/BraTS2021_00005"))
    case = io.read_case(files, keep_dtype=True)
    seg = io.read_label_map(files.seg)[0]
    segmenter = api.Segmenter()
    segmenter.segment_case(files, tmp_path / "1mm.nii.gz")
    dice_1mm = metrics.Confusion.from_masks(io.read_label_map(tmp_path / "1mm.nii.gz")[0] > 0,
                                            seg > 0).dice
    image, labels, affine = _resampled(case.image, seg, case.affine, spacing)
    folder = _store(tmp_path / "case", image, labels, affine, np.array([[0, 1], [1, 1], [2, 1]],
                                                                      float), "c")
    summary = segmenter.segment_case(io.find_case_files(folder), tmp_path / "other.nii.gz")
    assert summary["grid"]["resampled_to_1mm"]
    pred = io.read_label_map(tmp_path / "other.nii.gz")[0]
    assert pred.shape == labels.shape
    dice = metrics.Confusion.from_masks(pred > 0, labels > 0).dice
    # A grid bug would cost far more; thick slices cost the model some: at 1 x 1 x 3 mm 0.033
    # with the shipped model (0.934 -> 0.901), 0.003 with the one shipped before it.
    assert dice_1mm > 0.9 and abs(dice - dice_1mm) <= 0.04, (dice, dice_1mm)
    # Volumes in ml of the input grid: close to the 1 mm result's.
    voxel_ml = float(np.prod(summary["spacing_mm"])) / 1000
    assert summary["volumes_ml"]["WT_ml"] == pytest.approx((pred > 0).sum() * voxel_ml,
                                                           rel=1e-3)
    no = api.Segmenter(resample=False).segment_case(io.find_case_files(folder),
                                                   tmp_path / "no.nii.gz")
    assert not no["grid"]["resampled_to_1mm"]


def test_evaluate_says_in_metrics_csv_whether_the_affines_match(tmp_path, caplog):
    import csv
    import logging

    import nibabel as nib

    labels = np.zeros((20, 20, 10), np.uint8)
    labels[5:12, 5:12, 3:7] = 2
    labels[7:10, 7:10, 4:6] = 4
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for name, shift in (("a", 0.0), ("b", 2.0)):
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(labels, affine), tmp_path / "ref" / f"{name}_seg.nii.gz")
        affine[0, 3] = shift
        nib.save(nib.Nifti1Image(labels, affine), tmp_path / "pred" / f"{name}.nii.gz")
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        rows = api.evaluate(tmp_path / "pred", tmp_path / "ref", tmp_path / "report")
    assert [(r["case"], r["affine_matches"], r["dice_WT"]) for r in rows] == [
        ("a", True, 1.0), ("b", False, 1.0)]
    assert "b.nii.gz: affine differs from the reference" in caplog.text
    with open(tmp_path / "report" / "metrics.csv", newline="") as f:
        assert [r["affine_matches"] for r in csv.DictReader(f)] == ["True", "False"]


def test_evaluate_overwrite_replaces_the_reports_overlays_and_raw_table(tmp_path):
    import nibabel as nib

    refs = tmp_path / "cases"
    preds = tmp_path / "preds"
    preds.mkdir()
    for i, name in enumerate(("c0", "c1")):
        case = make_case(i, shape=(24, 24, 24), case_id=name)
        folder = write_case(case, refs)
        affine = nib.load(next(folder.glob("*_seg.nii.gz"))).affine
        for stem in (name, f"{name}_raw"):
            nib.save(nib.Nifti1Image(case.labels, affine), preds / f"{stem}.nii.gz")
    report = tmp_path / "report"
    api.evaluate(preds, refs, report)
    first = sorted(p.name for p in report.iterdir())
    assert {"overlay_c0.png", "overlay_c1.png", "metrics_raw.csv"} <= set(first)
    assert 'src="overlay_c0.png"' in (report / "index.html").read_text()
    # Again without the maps before postprocessing and without pictures, over the first.
    for name in ("c0", "c1"):
        (preds / f"{name}_raw.nii.gz").unlink()
    with pytest.raises(FileExistsError, match="not empty"):
        api.evaluate(preds, refs, report, overlays=False)
    api.evaluate(preds, refs, report, overlays=False, overwrite=True)
    left = sorted(p.name for p in report.iterdir())
    assert left == ["boxplots.png", "index.html", "metrics.csv", "summary.json"]
    page = (report / "index.html").read_text()
    assert "overlay_" not in page and "metrics_raw" not in page
    summary = json.loads((report / "summary.json").read_text())
    assert summary["predictions"] == str(preds.absolute()) and "metrics_raw" not in summary
    # Files that are not a report's stay.
    (report / "notes.txt").write_text("mine")
    api.evaluate(preds, refs, report, overwrite=True)
    assert (report / "notes.txt").read_text() == "mine" and (report / "overlay_c1.png").is_file()


def test_evaluate_says_what_it_cannot_find_in_one_line(tmp_path):
    import nibabel as nib

    case = make_case(3, shape=(24, 24, 24), case_id="c0")
    folder = write_case(case, tmp_path / "cases")
    with pytest.raises(io.InputError, match=rf"^{tmp_path / 'nope'}: no such file or folder$"):
        api.evaluate(tmp_path / "nope", folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(io.InputError, match=rf"^{tmp_path / 'empty'}: no label maps found"):
        api.evaluate(tmp_path / "empty", folder)
    preds = tmp_path / "preds"  # the user's most likely slip: predictions named otherwise
    preds.mkdir()
    nib.save(nib.Nifti1Image(case.labels, np.eye(4)), preds / "other.nii.gz")
    with pytest.raises(io.InputError, match=rf"^{preds}: no case matches a reference in "
                       rf"{folder} \(predictions: \['other'\], references: \['c0'\]\)$"):
        api.evaluate(preds, folder, tmp_path / "report")
    assert not (tmp_path / "report").exists()


def test_a_case_found_twice_among_label_maps_is_named(tmp_path, caplog):
    import nibabel as nib

    labels = np.zeros((8, 8, 8), np.uint8)
    for name in ("X.nii.gz", "X_seg.nii.gz"):  # one case id, as _seg is taken off
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / name)
    with caplog.at_level("WARNING", logger="tiramisu_brats"):
        found = api.find_label_maps(tmp_path)
    assert list(found) == ["X"] and found["X"].path == tmp_path / "X_seg.nii.gz"
    assert (f"{tmp_path}: case X is also {tmp_path / 'X.nii.gz'}; "
            f"{tmp_path / 'X_seg.nii.gz'} is used") in caplog.text


def test_evaluate_pairs_a_file_with_a_case_and_warns_of_mismatches(tmp_path, caplog):
    import logging

    import nibabel as nib

    case = make_case(3, shape=(24, 24, 24), case_id="c0")
    folder = write_case(case, tmp_path / "cases")  # images and the expert's c0_seg
    affine = nib.load(next(folder.glob("*_seg.nii.gz"))).affine
    pred = tmp_path / "out.nii.gz"
    nib.save(nib.Nifti1Image(case.labels, affine), pred)
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        rows = api.evaluate(pred, folder)  # a file against a case folder: paired
    assert [(r["case"], r["dice_WT"]) for r in rows] == [("out", 1.0)]
    assert not caplog.text
    # the map before postprocessing beside it is scored too
    nib.save(nib.Nifti1Image(case.labels, affine), tmp_path / "out_raw.nii.gz")
    api.evaluate(pred, folder, tmp_path / "report")
    assert (tmp_path / "report" / "metrics_raw.csv").is_file()
    # The JSON that segment wrote beside it says it came from another case.
    (tmp_path / "out.json").write_text(json.dumps({"case": "c9"}))
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        api.evaluate(pred, folder)
    assert "segmented from case c9 (its JSON summary), scored against the reference of c0" in (
        caplog.text)
    # Predictions without a reference are named, twelve of them shortened.
    preds = tmp_path / "preds"
    preds.mkdir()
    for name in ["c0", "c0_uncertainty"] + [f"x{i:02d}" for i in range(12)]:
        nib.save(nib.Nifti1Image(case.labels, affine), preds / f"{name}.nii.gz")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        assert [r["case"] for r in api.evaluate(preds, tmp_path / "cases")] == ["c0"]
    assert "12 prediction(s) have no reference, not scored: x00, x01" in caplog.text
    assert "x09 and 2 more" in caplog.text
    # The arguments swapped: the experts' maps given as predictions.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        api.evaluate(tmp_path / "cases", preds)
    assert "the predictions are experts' segmentations of case folders" in caplog.text
    with pytest.raises(io.InputError, match="the prediction and the reference are the same"):
        api.evaluate(folder, folder)


def test_quality_score_from_the_spread_inside_the_tumor():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:6, 2:6] = 2
    spread = np.zeros(labels.shape, np.float32)
    spread[labels > 0] = 0.03
    spread[8:, 8:, 8:] = 0.9  # outside the tumor: does not count
    qc = api.quality(spread, labels)
    assert qc["spread"] == pytest.approx(0.03) and not qc["review"]
    assert qc["score"] == pytest.approx(1 - 0.03 / (2 * api.QC_SPREAD_REVIEW), abs=1e-4)
    spread[labels > 0] = api.QC_SPREAD_REVIEW + 0.01
    qc = api.quality(spread, labels)
    assert qc["review"] and qc["score"] < 0.5 and "disagree" in qc["why"]
    empty = api.quality(spread, np.zeros_like(labels))
    assert empty == {"score": 0.0, "review": True, "spread": None,
                     "why": "no tumor found: check that the case holds none"}


@pytest.mark.slow
def test_accurate_mode_writes_qc_and_an_uncertainty_map(tmp_path, tiny_weights):
    folder = write_case(make_case(3, shape=(64, 64, 40), case_id="syn-3"), tmp_path)
    files = io.find_case_files(folder)
    seg = api.Segmenter(tiny_weights, "torch", mode="accurate", crop=(64, 64))
    summary = seg.segment_case(files, tmp_path / "out.nii.gz", uncertainty=True)
    qc = json.loads((tmp_path / "out.json").read_text())["qc"]
    assert qc == summary["qc"] and 0 <= qc["score"] <= 1 and isinstance(qc["review"], bool)
    labels = io.read_label_map(tmp_path / "out.nii.gz")[0]
    import nibabel as nib

    img = nib.load(tmp_path / "out_uncertainty.nii.gz")
    assert img.get_data_dtype() == np.float32 and img.shape == labels.shape
    values = np.asarray(img.dataobj)
    assert values.min() >= 0 and values.max() <= 0.5  # a standard deviation of probabilities
    assert (qc["spread"] is None) == (not (labels > 0).any())  # no tumor: no spread to give
    if (labels > 0).any():
        assert values[labels > 0].mean() == pytest.approx(qc["spread"], abs=1e-3)
    fast = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    with pytest.raises(ValueError, match="needs several views"):
        fast.segment_case(files, tmp_path / "fast.nii.gz", uncertainty=True)
    assert "confidence" in fast.segment_case(files, tmp_path / "fast.nii.gz")["qc"]
    # Run again over it without the map: the old one, of the labels replaced, goes.
    seg.segment_case(files, tmp_path / "out.nii.gz", overwrite=True, save_raw=True)
    assert not (tmp_path / "out_uncertainty.nii.gz").exists()
    assert (tmp_path / "out_raw.nii.gz").is_file()
    seg.segment_case(files, tmp_path / "out.nii.gz", overwrite=True)
    assert not (tmp_path / "out_raw.nii.gz").exists()
    assert sorted(p.name for p in tmp_path.glob("out*")) == ["out.json", "out.nii.gz"]
    # A label map of another run that only shares the name (its own JSON beside it) stays,
    # and so does anything beside an output written for the first time.
    seg.segment_case(files, tmp_path / "out_raw.nii.gz")
    seg.segment_case(files, tmp_path / "out.nii.gz", overwrite=True)
    assert (tmp_path / "out_raw.nii.gz").is_file()
    (tmp_path / "new_raw.nii.gz").write_bytes(b"someone's")
    seg.segment_case(files, tmp_path / "new.nii.gz", overwrite=True)
    assert (tmp_path / "new_raw.nii.gz").read_bytes() == b"someone's"


def test_confidence_score_from_the_whole_tumor_probability_inside_the_tumor():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:6, 2:6, 2:6] = 4
    whole_tumor = np.full(labels.shape, 0.2, np.float32)  # outside the tumor: does not count
    whole_tumor[labels > 0] = 0.97
    qc = api.confidence(whole_tumor, labels, review_below=0.9)
    assert qc["confidence"] == pytest.approx(0.97) and not qc["review"]
    assert qc["score"] == pytest.approx(0.5 + 0.07 / 0.2, abs=1e-4) and "sure" in qc["why"]
    whole_tumor[2:4, 2:6, 2:6] = 0.75  # half the tumor at 0.75: mean 0.86
    qc = api.confidence(whole_tumor, labels, review_below=0.9)
    assert qc["confidence"] == pytest.approx(0.86) and qc["review"]
    assert qc["score"] == pytest.approx(0.5 - 0.04 / 0.2, abs=1e-4) and "unsure" in qc["why"]
    assert api.confidence(np.zeros_like(whole_tumor), labels)["score"] == 0.0  # clipped
    empty = api.confidence(whole_tumor, np.zeros_like(labels))
    assert empty == {"score": 0.0, "review": True, "confidence": None,
                     "why": "no tumor found: check that the case holds none"}


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_fast_mode_confidence_is_the_networks_whole_tumor_probability(tiny_weights, backend):
    image = make_case(3, shape=(64, 64, 40)).image
    seg = api.Segmenter(tiny_weights, backend, precision="fp32", crop=(64, 64))
    result = seg.segment(image)  # tumor slices, in passes (all of them: tumor everywhere)
    assert result.labels.any()
    probs = seg.view_probabilities(image, "axial")  # every slice
    expected = float((1 - probs[0])[result.labels > 0].mean())
    assert result.qc["confidence"] == pytest.approx(expected, abs=1e-4)
    assert result.qc["review"] == (result.qc["confidence"] < api.QC_CONFIDENCE_REVIEW)


# ------------------------------------------------------------ a folder of cases: segment_cohort


@pytest.fixture()
def cohort(tmp_path):
    """A folder of three small cases: two complete (c0, c1), one without its FLAIR (c2)."""
    root = tmp_path / "cohort"
    for seed in range(3):
        write_case(make_case(seed, shape=(64, 64, 40), case_id=f"c{seed}"), root)
    (root / "c2" / "c2_flair.nii.gz").unlink()
    return root


@pytest.fixture(scope="module")
def small_segmenter(tiny_weights):
    return api.Segmenter(tiny_weights, "torch", crop=(64, 64))


def _failures_csv(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_segment_cohort_returns_results_and_failures_and_reports_progress(
        cohort, tmp_path, small_segmenter):
    out = tmp_path / "out"
    events = []
    run = api.segment_cohort(cohort, out, segmenter=small_segmenter,
                             on_event=lambda *event: events.append(event))
    assert run.cohort and run.segmenter is small_segmenter
    assert [r["case"] for r in run.results] == ["c0", "c1"]
    reason = (f"{cohort / 'c2'}: no flair image (expected <case>_flair.nii.gz, BraTS 2017-2021 "
              "naming)")
    assert run.failures == [("c2", reason)]
    assert run.failures_csv == out / "failures.csv"
    assert _failures_csv(out / "failures.csv") == [["case", "reason"], ["c2", reason]]
    assert sorted(p.name for p in out.iterdir()) == [
        "c0.json", "c0.nii.gz", "c0_planes.png", "c1.json", "c1.nii.gz", "c1_planes.png",
        "failures.csv", "index.html"]
    page = (out / "index.html").read_text()
    body = page[page.index("<tbody>"):]
    assert body.index(">c2<") < body.index(">c0<")  # the failed case first, with its reason
    assert "failed: " in page and '<img src="c0_planes.png"' in page
    for summary in run.results:
        written = json.loads((out / f"{summary['case']}.json").read_text())
        assert written["case"] == summary["case"] and written["timings_s"]
        assert io.read_label_map(out / f"{summary['case']}.nii.gz")[0].shape == (64, 64, 40)
    # Progress, in order: the failure found from the file names, the model, then case by case.
    kinds = [kind for kind, _, _ in events if kind != "slices"]
    assert kinds == ["failed", "model", "cases", "case", "wrote", "case", "wrote"]
    assert events[0] == ("failed", "c2", reason)
    assert events[1] == ("model", "", small_segmenter) and events[2] == ("cases", "", 2)
    for summary in run.results:
        case_id = summary["case"]
        assert ("case", case_id, out / f"{case_id}.nii.gz") in events
        assert ("wrote", case_id, out / f"{case_id}.nii.gz") in events
        slices = sum(n for kind, c, n in events if kind == "slices" and c == case_id)
        assert slices == summary["slices"]["brain"] > 0


def test_segment_cohort_does_not_replace_a_picture_it_did_not_make(cohort, tmp_path,
                                                                   small_segmenter):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c1_planes.png").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out: 1 of the 2 cases already have outputs "
                                              r"there \(c1\), .*nothing was written"):
        api.segment_cohort(cohort, out, segmenter=small_segmenter)
    assert [p.name for p in out.iterdir()] == ["c1_planes.png"]
    assert (out / "c1_planes.png").read_text() == "mine"
    with pytest.raises(FileExistsError, match=r"c1_planes\.png: exists"):  # one case alike
        small_segmenter.segment_case(io.find_case_files(cohort / "c1"), out / "c1.nii.gz",
                                     picture=out / "c1_planes.png")
    assert not (out / "c1.nii.gz").exists()


@pytest.mark.slow
def test_the_json_says_whether_the_network_ran_tumor_slices_as_it_did(tmp_path, tiny_weights):
    import dataclasses

    case = make_case(3, shape=(64, 64, 40), case_id="t")
    thick = dataclasses.replace(case, affine=case.affine @ np.diag([1.0, 1.0, 3.0, 1.0]))
    one_mm, three_mm = (io.find_case_files(write_case(c, tmp_path / name))
                        for c, name in ((case, "a"), (thick, "b")))
    fast = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    accurate = api.Segmenter(tiny_weights, "torch", crop=(64, 64), mode="accurate")
    for segmenter, files, save_raw, expected in (
            (fast, one_mm, False, True), (fast, one_mm, True, False),
            (fast, three_mm, False, False),  # fast mode on resampled voxels: every slice
            (accurate, three_mm, False, True), (accurate, one_mm, True, False)):
        out = tmp_path / "o.nii.gz"
        summary = segmenter.segment_case(files, out, save_raw=save_raw, overwrite=True)
        ran = summary["slices"]
        assert summary["model"]["tumor_slices"] is expected, (segmenter.mode, files, save_raw)
        if not expected:  # every brain slice of every view ran
            assert ran["run"] == ran["brain"]


def test_an_overwrite_removes_the_raw_map_of_a_run_that_finished_while_it_ran(
        cohort, tmp_path, small_segmenter):
    files = io.find_case_files(cohort / "c0")
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "x.nii.gz"

    def read_while_another_run_finishes(f):
        # another process segmenting the same output with --save-raw ends meanwhile
        small_segmenter.segment_case(f, out, save_raw=True, overwrite=True)
        return io.read_case(f)

    small_segmenter.segment_case(files, out, overwrite=True, read=read_while_another_run_finishes)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.json", "x.nii.gz"]


def test_skip_existing_loads_no_model_where_every_case_was_done_before(
        cohort, tmp_path, small_segmenter, tiny_weights, monkeypatch):
    out = tmp_path / "out"
    api.segment_cohort(cohort, out, segmenter=small_segmenter)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded with nothing to segment")

    monkeypatch.setattr(api, "Segmenter", no_model)
    run = api.segment_cohort(cohort, out, model=tiny_weights, backend="torch",
                             skip_existing=True)
    assert run.results == [] and run.segmenter is None
    assert [r["case"] for r in run.skipped] == ["c0", "c1"]
    with pytest.raises(ValueError, match="unknown mode 'slow'"):  # still checked
        api.segment_cohort(cohort, out, model=tiny_weights, mode="slow", skip_existing=True)


def test_a_case_id_named_like_a_companion_map_fails_before_anything_is_written(
        tmp_path, small_segmenter):
    root = tmp_path / "cases"
    for case_id in ("Y", "Y_raw"):
        write_case(make_case(0, shape=(64, 64, 40), case_id=case_id), root)
    run = api.segment_cohort(root, tmp_path / "out", segmenter=small_segmenter, save_raw=True)
    assert [r["case"] for r in run.results] == ["Y"]
    assert run.failures == [("Y_raw", f"{root / 'Y_raw'}: case id 'Y_raw' ends like a map "
                                      "segment writes beside a label map (_raw, _uncertainty): "
                                      "its label map would be taken for another case's")]
    assert io.read_label_map(tmp_path / "out" / "Y_raw.nii.gz")[0].shape == (64, 64, 40)  # Y's


def test_the_json_says_whether_the_qc_threshold_was_chosen_for_the_weights(
        tmp_path, tiny_weights):
    from safetensors.numpy import load_file, save_file

    from tiramisu_brats.model import read_config

    borrowed = api.Segmenter(tiny_weights, "torch").model_info()["qc_threshold_chosen_for"]
    assert borrowed == "the shipped weights (these record none)"
    _, header = read_config(tiny_weights)
    own = tmp_path / "own.safetensors"  # the same weights, with their own fast-mode threshold
    save_file(load_file(str(tiny_weights)), str(own),
              metadata={**header, "decision": json.dumps({"qc_confidence_review": 0.8})})
    segmenter = api.Segmenter(own, "torch")
    assert segmenter.qc_confidence == 0.8
    assert segmenter.model_info()["qc_threshold_chosen_for"] == "these weights"
    # the shipped weights' defaults were chosen for them
    assert api.Segmenter().model_info()["qc_threshold_chosen_for"] == "these weights"


def test_skip_existing_redoes_a_case_whose_label_map_was_removed(cohort, tmp_path,
                                                                 small_segmenter):
    out = tmp_path / "out"
    api.segment_cohort(cohort, out, segmenter=small_segmenter)
    (out / "c1.nii.gz").unlink()  # to have it redone; its JSON and picture are still there
    run = api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=True)
    assert [r["case"] for r in run.results] == ["c1"]
    assert [r["case"] for r in run.skipped] == ["c0"] and [c for c, _ in run.failures] == ["c2"]
    assert (out / "c1.nii.gz").is_file()


def test_a_case_id_found_twice_fails_in_whichever_shard_holds_the_second(tmp_path,
                                                                         small_segmenter):
    root = tmp_path / "cases"
    root.mkdir()
    for name in ("a", "b"):  # two folders of one case id
        write_case(make_case(0, shape=(64, 64, 40), case_id="X"), tmp_path / name).rename(
            root / name)
    runs = [api.segment_cohort(root, tmp_path / "out", segmenter=small_segmenter, shard=(i, 2))
            for i in range(2)]
    assert [r["case"] for r in runs[0].results] == ["X"] and runs[0].failures == []
    assert runs[1].results == []
    assert runs[1].failures == [("b", f"{root / 'b'}: case id 'X' is also the one of "
                                      f"{root / 'a'}")]


def test_segment_cohort_leaves_out_its_output_folder_among_the_cases(cohort, small_segmenter):
    out = cohort / "predictions"  # inside the folder of cases
    for skip in (False, True):
        run = api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=skip)
        assert [c for c, _ in run.failures] == ["c2"]
    assert [r["case"] for r in run.skipped] == ["c0", "c1"]
    # an output inside a case folder leaves that case a case
    run = api.segment_cohort(cohort, cohort / "c1" / "labels", segmenter=small_segmenter)
    assert [r["case"] for r in run.results] == ["c0", "c1"]


def test_segment_cohort_refuses_an_uncertainty_map_of_one_view_before_any_case(
        cohort, tmp_path, small_segmenter):
    with pytest.raises(ValueError, match="needs several views; mode 'fast' has one"):
        api.segment_cohort(cohort, tmp_path / "out", segmenter=small_segmenter,
                           uncertainty=True)
    with pytest.raises(ValueError, match="mode 'fast' has one"):
        api.segment_cohort(cohort, tmp_path / "out", model=small_segmenter.weights,
                           uncertainty=True)
    assert not (tmp_path / "out").exists()


def test_segment_cohort_skips_finished_cases_and_redoes_unfinished_ones(
        cohort, tmp_path, small_segmenter, caplog):
    out = tmp_path / "out"
    first = api.segment_cohort(cohort, out, segmenter=small_segmenter)
    assert len(first.results) == 2 and len(first.failures) == 1
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "c1.json").unlink()  # a run killed after c1's label map, before its summary
    again = api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=True)
    assert [r["case"] for r in again.results] == ["c1"]  # c0 left as it was, c1 redone
    assert [s["case"] for s in again.skipped] == ["c0"]
    assert again.skipped[0]["volumes_ml"] == json.loads((out / "c0.json").read_text())[
        "volumes_ml"]
    assert (out / "c0.nii.gz").stat().st_mtime_ns == done["c0.nii.gz"]
    assert (out / "c1.nii.gz").stat().st_mtime_ns != done["c1.nii.gz"]
    assert [c for c, _ in again.failures] == ["c2"]
    # The index keeps the skipped case (its row from the summary written before).
    index = (out / "index.html").read_text()
    assert all(f"view/{c}/" in index for c in ("c0", "c1")) and "c2" in index
    # how to view a case, from any folder
    assert f"tiramisu-brats view {(cohort / 'c0').absolute()} {(out / 'c0.nii.gz').absolute()}" in (
        index)
    # Without skip_existing (nor overwrite) the run is refused before anything is written.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(FileExistsError, match=r"2 of the 2 cases already have outputs there "
                                              r"\(c0, c1\).*nothing was written"):
        api.segment_cohort(cohort, out, segmenter=small_segmenter)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(ValueError, match="replacing existing outputs and skipping them"):
        api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=True,
                           overwrite=True)
    # Skipped cases made in another label convention than asked now are named.
    with caplog.at_level("WARNING"):
        api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=True,
                           convention="brats2023")
    assert ("2 case(s) skipped as done before were segmented in another mode or label "
            "convention than asked now (their JSON says which): c0, c1") in caplog.text
    # Outputs asked for now but not written before (raw label maps) redo the cases.
    fast = api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=True,
                              save_raw=True)
    assert [r["case"] for r in fast.results] == ["c0", "c1"] and fast.skipped == []
    # Every case done: nothing to segment, and the old list of failures is removed.
    import shutil

    shutil.rmtree(cohort / "c2")
    last = api.segment_cohort(cohort, out, segmenter=small_segmenter, skip_existing=True)
    assert (last.results, last.failures, last.failures_csv) == ([], [], None)
    assert not (out / "failures.csv").exists()


def test_a_case_is_finished_only_with_every_output_asked_for(tmp_path):
    target = tmp_path / "c0.nii.gz"
    for name in ("c0.nii.gz", "c0.json", "c0_raw.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert api._finished(target, save_raw=True, uncertainty=False)
    assert not api._finished(target, save_raw=True, uncertainty=True)
    (tmp_path / "c0_uncertainty.nii.gz").write_bytes(b"")
    assert api._finished(target, save_raw=False, uncertainty=True)
    (tmp_path / "c0.json").unlink()  # the summary is written last
    assert not api._finished(target, save_raw=False, uncertainty=False)


def test_a_skipped_case_whose_summary_is_unreadable_is_listed_for_review(tmp_path):
    files = io.CaseFiles("c0", tuple(tmp_path / f"c0_{m}.nii.gz" for m in io.MODALITIES))
    (tmp_path / "c0.json").write_text("[1, 2]")
    row = api._earlier_summary(files, tmp_path / "c0.nii.gz")
    assert row["case"] == "c0" and row["qc"]["review"] is True
    assert row["qc"]["why"] == "done before; c0.json unreadable: not the summary segment writes"
    (tmp_path / "c0.json").write_text(json.dumps({"case": "x", "volumes_ml": {"WT_ml": 2.5}}))
    assert api._earlier_summary(files, tmp_path / "c0.nii.gz")["volumes_ml"] == {"WT_ml": 2.5}


def test_segment_cohort_reports_a_broken_case_and_a_case_id_found_twice(
        cohort, tmp_path, small_segmenter):
    import shutil

    import nibabel as nib

    t2 = cohort / "c1" / "c1_t2.nii.gz"
    img = nib.load(t2)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.int16), img.affine), t2)  # all zero
    shutil.copytree(cohort / "c0", cohort / "d0")  # the files say c0 too
    out = tmp_path / "out"
    run = api.segment_cohort(cohort, out, segmenter=small_segmenter)
    assert [r["case"] for r in run.results] == ["c0"]
    assert [c for c, _ in run.failures] == ["c1", "c2", "d0"]  # in the folder's order
    reasons = dict(run.failures)
    assert reasons["c1"] == f"{t2}: all voxels are zero"
    assert reasons["d0"] == (f"{cohort / 'd0'}: case id 'c0' is also the one of "
                             f"{cohort / 'c0'}")
    assert [row[0] for row in _failures_csv(run.failures_csv)] == ["case", "c1", "c2", "d0"]


def test_segment_cohort_of_one_case_raises_its_error(tmp_path, tiny_weights):
    folder = write_case(make_case(5, shape=(64, 64, 40), case_id="one"), tmp_path / "in")
    files = io.find_case_files(folder)
    events = []
    run = api.segment_cohort(None, tmp_path / "one.nii.gz", t1=files.images[0],
                             t1ce=files.images[1], t2=files.images[2], flair=files.images[3],
                             model=tiny_weights, backend="torch", save_raw=True,
                             on_event=lambda *event: events.append(event[0]))
    assert not run.cohort and run.failures == [] and run.failures_csv is None
    assert [r["case"] for r in run.results] == ["one"]
    assert run.segmenter.backend.name == "torch" and run.segmenter.weights == tiny_weights
    assert (tmp_path / "one_raw.nii.gz").exists() and "cases" not in events
    # a folder and files, or files short of four: said alike by segment_cohort and read_case
    for call in (lambda **kw: api.segment_cohort(**kw, output=tmp_path / "x.nii.gz"),
                 api.read_case):
        key = "input" if call is not api.read_case else "folder"
        with pytest.raises(ValueError, match="not both"):
            call(**{key: folder}, t1=files.images[0])
        with pytest.raises(ValueError, match="all four modality files; missing: t1ce, t2, flair"):
            call(**{key: None}, t1=files.images[0])
    with pytest.raises(FileExistsError, match="overwriting was not asked for"):
        api.segment_cohort(folder, tmp_path / "one.nii.gz", segmenter=run.segmenter)
    (folder / "one_t2.nii.gz").unlink()
    with pytest.raises(io.InputError, match="no t2 image"):
        api.segment_cohort(folder, tmp_path / "two.nii.gz", segmenter=run.segmenter)
    assert not (tmp_path / "two.nii.gz").exists()


def test_segment_cohort_shards_and_refuses_bad_options_saying_what_is_wrong(
        cohort, tmp_path, small_segmenter):
    out = tmp_path / "out"
    run = api.segment_cohort(cohort, out, segmenter=small_segmenter, shard=(1, 3))
    assert [r["case"] for r in run.results] == ["c1"] and run.failures == []
    run = api.segment_cohort(cohort, out, segmenter=small_segmenter, shard=(2, 3))
    assert run.results == [] and run.failures_csv == out / "failures-shard-2-of-3.csv"
    assert not (out / "failures.csv").exists()
    bad = {
        "shard": dict(input=cohort, output=out, shard=(3, 3)),
        "one case": dict(input=cohort / "c0", output=tmp_path / "x.nii.gz", shard=(0, 2)),
        "convention": dict(input=cohort, output=out, convention="nnunet"),
        "no input": dict(input=None, output=tmp_path / "x.nii.gz"),
        "not a label map name": dict(input=cohort / "c0", output=tmp_path / "x.txt"),
        "missing": dict(input=tmp_path / "nope", output=out),
    }
    for name, kwargs in bad.items():
        with pytest.raises(ValueError) as err:
            api.segment_cohort(**kwargs, segmenter=small_segmenter)
        assert "--" not in str(err.value), (name, err.value)  # what is wrong, not which flag
    assert sorted(p.name for p in out.iterdir()) == ["c1.json", "c1.nii.gz", "c1_planes.png",
                                                     "failures-shard-2-of-3.csv",
                                                     "index-shard-1-of-3.html",
                                                     "index-shard-2-of-3.html"]


def test_segment_with_an_affine_gives_what_segment_case_writes(tmp_path, tiny_weights):
    import nibabel as nib

    syn = make_case(5, shape=(64, 64, 40))
    # Stored as RAS at 1 x 1 x 2 mm: reoriented and resampled for the network.
    affine = syn.affine @ np.diag([1.0, 1.0, 2.0, 1.0])
    ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                          nib.orientations.axcodes2ornt("RAS"))
    folder = _store(tmp_path / "c", syn.image, syn.labels, affine, ras, "c")
    files = io.find_case_files(folder)
    case = io.read_case(files)
    for mode in api.MODES:
        seg = api.Segmenter(tiny_weights, "torch", crop=(64, 64), mode=mode)
        summary = seg.segment_case(files, tmp_path / f"{mode}.nii.gz")
        assert summary["grid"]["resampled_to_1mm"] and summary["grid"]["axes"] == "RAS"
        direct = seg.segment(case.image, affine=case.affine)
        np.testing.assert_array_equal(direct.labels,
                                      io.read_label_map(tmp_path / f"{mode}.nii.gz")[0])
        assert direct.qc == summary.get("qc")


def test_the_weights_decision_rule_labels_the_case_and_is_recorded(tmp_path, tiny_weights):
    from safetensors.numpy import load_file, save_file

    from tiramisu_brats.infer import region_labels
    from tiramisu_brats.model import read_config

    _, header = read_config(tiny_weights)
    weights = tmp_path / "rule.safetensors"
    save_file(load_file(tiny_weights), str(weights), metadata={
        **header, "decision": '{"region_threshold": 0.2, "qc_spread_review": 0.5, '
                              '"qc_confidence_review": 0.25}'})
    image = make_case(3, shape=(64, 64, 40)).image
    plain = api.Segmenter(tiny_weights, "torch", crop=(64, 64), postprocess=False)
    rule = api.Segmenter(weights, "torch", crop=(64, 64), postprocess=False)
    assert plain.model_info()["labels_by"] == "argmax"
    assert rule.model_info()["labels_by"] == "region probabilities > 0.2"
    probs = rule.view_probabilities(image)
    for seg, threshold in ((plain, None), (rule, 0.2)):
        labels = seg.segment(image, all_slices=True).labels
        assert (labels == region_labels(probs, threshold)).mean() > 0.999
    accurate = api.Segmenter(weights, "torch", crop=(64, 64), mode="accurate")
    assert "0.5)" in accurate.segment(image).qc["why"]
    assert (plain.qc_confidence, rule.qc_confidence) == (api.QC_CONFIDENCE_REVIEW, 0.25)
    assert "0.25)" in rule.segment(image).qc["why"]


def test_quantize_int8_says_what_is_wrong_before_any_work(tmp_path, tiny_weights, small_cases,
                                                          monkeypatch):
    monkeypatch.setattr(export, "require_nncf", lambda source: None)  # installed or not

    write_case(make_case(0, shape=(48, 40, 32)), tmp_path / "unlabelled", with_seg=False)
    with pytest.raises(io.InputError, match=r"no labelled cases in .*unlabelled"):
        api.quantize_int8(tmp_path / "unlabelled", tiny_weights)
    with pytest.raises(io.InputError, match="held-out cases not among the labelled ones: nope"):
        api.quantize_int8(small_cases, tiny_weights, holdout=["syn-0", "nope"])


def test_quantize_int8_calibrates_on_a_brain_larger_than_the_crop_too(tmp_path, tiny_weights,
                                                                      monkeypatch):
    import dataclasses

    from tiramisu_brats.preprocess import compute_geometry
    small = make_case(0, shape=(64, 64, 24), case_id="small")
    big = make_case(1, shape=(120, 120, 24), case_id="big")
    big = dataclasses.replace(big, image=np.repeat(big.image, 3, axis=1),  # X stretched
                              labels=np.repeat(big.labels, 3, axis=0))
    assert compute_geometry(big.image).slice_shape[0] > api.CROP[0]
    for case in (small, big):
        write_case(case, tmp_path / "data")
    given = {}

    def quantize(source, path, calibration, calibration_id, validation, max_drop):
        given.update(calibration=calibration, validation=validation)
        raise RuntimeError("stop here")

    monkeypatch.setattr(export, "quantize", quantize)
    monkeypatch.setattr(export, "require_nncf", lambda source: None)  # not needed to get here
    with pytest.raises(RuntimeError, match="stop here"):
        api.quantize_int8(tmp_path / "data", tiny_weights)
    assert given["calibration"].shape[1:] == (4, *api.CROP)
    thirds = sum(-(-compute_geometry(c.image).n_slices // 3) for c in (small, big))
    assert len(given["calibration"]) == thirds  # every third brain slice of each case
    assert given["validation"].shape[1:] == (4, *api.CROP)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("nncf") is None, reason="nncf not installed")
def test_quantize_int8_checks_every_case_and_records_the_check(tmp_path, tiny_weights,
                                                              small_cases, monkeypatch):
    import shutil

    from tiramisu_brats import export

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TIRAMISU_BRATS_CACHE", raising=False)
    weights = shutil.copy(tiny_weights, tmp_path / "tiny.safetensors")
    seen = []
    result = api.quantize_int8(small_cases, weights, holdout=["syn-2"], on_case=seen.append)
    assert seen == ["syn-0", "syn-1", "syn-0", "syn-1", "syn-2"]  # read (not syn-2), checked
    path, check, rows = result["path"], result["check"], result["cases"]
    assert path == tmp_path / "tiny.int8.xml" and path.with_suffix(".bin").is_file()
    record = export.recorded(path)
    assert record["weights_sha256"] == export.file_sha256(weights)
    assert record["calibration"].startswith("cases:2:") and record["max_drop"] == 0.001
    assert record["labels_check"] == check
    assert [(r["case"], r["holdout"]) for r in rows] == [
        ("syn-0", False), ("syn-1", False), ("syn-2", True)]
    for row in rows:
        assert len(row["fp32"]) == len(row["int8"]) == 3
        assert row["change"] == max(abs(a - b) for a, b in zip(row["fp32"], row["int8"]))
    worst = max(rows, key=lambda r: r["change"])
    assert check == {"kept": worst["change"] <= 0.01, "cases": 3,
                     "largest_change": round(worst["change"], 4), "worst_case": worst["case"],
                     "tolerance": 0.01, "reference": "openvino fp32, fast mode",
                     "held_out": ["syn-2"]}
    # The fp32 column is what the fp32 default path gives.
    files = io.find_case_files(small_cases / "syn-1")
    case, expert = io.read_case(files), io.read_label_map(files.seg)[0]
    labels = api.Segmenter(weights, precision="fp32").segment(case.image, affine=case.affine).labels
    assert rows[1]["fp32"] == [metrics.dice(metrics.region_mask(labels, r),
                                            metrics.region_mask(expert, r))
                               for r in metrics.REGIONS]
    monkeypatch.setattr(infer, "cpu_info", lambda: ("", frozenset({"avx2"})))
    assert infer.choose_precision("openvino", weights)[0] == ("int8" if check["kept"] else "bf16")


def test_the_api_takes_what_an_image_can_be_and_says_what_it_cannot(tiny_weights, caplog):
    import logging

    case = make_case(2, shape=(48, 48, 32))
    segmenter = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    labels = segmenter.segment(case.image).labels
    assert np.array_equal(segmenter.segment(case.image.tolist()).labels, labels)  # a list
    nan = case.image.copy()
    nan[0, 0, 0, 0], nan[2, 30, 30, 16] = np.nan, np.inf  # outside and inside the brain
    zeroed = np.where(np.isfinite(nan), nan, 0)
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        assert np.array_equal(segmenter.segment(nan).labels, segmenter.segment(zeroed).labels)
    assert "2 NaN/Inf voxels (or beyond float32's range) set to 0" in caplog.text
    with pytest.raises(ValueError, match=r"expected a real-valued image .* got dtype complex64"):
        segmenter.segment(case.image.astype(np.complex64))
    with pytest.raises(ValueError, match=r"a \(4, 4\) voxel-to-world matrix, got shape \(3, 3\)"):
        segmenter.segment(case.image, affine=np.eye(3))
    # api.segment takes the affine too: a case stored flipped gives its labels flipped
    flipped = case.affine @ np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = case.affine[0, 3] + case.affine[0, 0] * (case.image.shape[1] - 1)
    seg = api.segment(case.image[:, ::-1], tiny_weights, "torch", affine=flipped, crop=(64, 64))
    assert np.array_equal(seg.labels[::-1], labels)
    with pytest.raises(ValueError, match=r"the spread map \(2, 2, 2\) and the labels"):
        api.quality(np.zeros((2, 2, 2)), np.ones((3, 3, 3), np.uint8))


def test_segment_case_checks_its_arguments_before_the_network_runs(tmp_path, tiny_weights,
                                                                    monkeypatch):
    folder = write_case(make_case(1, shape=(48, 48, 32), case_id="c"), tmp_path / "in")
    segmenter = api.Segmenter(tiny_weights, "torch", crop=(64, 64))
    monkeypatch.setattr(segmenter, "_segment_grid", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(ValueError, match="unknown label convention 'nnunet'"):
        segmenter.segment_case(io.find_case_files(folder), tmp_path / "c.nii.gz",
                               convention="nnunet")
    with pytest.raises(ValueError, match=r"x\.txt: a label map must end in \.nii\.gz or \.nii"):
        segmenter.segment_case(io.find_case_files(folder), tmp_path / "x.txt")
    monkeypatch.undo()
    summary = segmenter.segment_case(folder, tmp_path / "c.nii.gz")  # a folder will do
    assert summary["case"] == "c"


def test_grid_info_records_what_the_network_saw_and_warns_only_of_voxels_unlike_its_training(
        caplog):
    from tiramisu_brats.preprocess import network_grid

    def grid(spacing, shape, resample=True):
        return network_grid(np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]), shape,
                            resample)

    with caplog.at_level("INFO", logger="tiramisu_brats.api"):
        kept = api.grid_info(grid((1.5, 1.5, 1.0), (160, 160, 155)), "kept")
        thick = api.grid_info(grid((1.0, 1.0, 3.0), (240, 240, 52)), "thick")
    assert kept["network_spacing_mm"] == [1.5, 1.5, 1.0] and not kept["resampled_to_1mm"]
    assert thick["resampled_to_1mm"] and thick["network_spacing_mm"][:2] == [1.0, 1.0]
    # 52 slices 3 mm apart span 153 mm, on the network's 156 slices 153 / 155 mm apart
    assert f"thick: voxels of 1x1x3 mm resampled to 1x1x{51 * 3 / 155:.3g} mm for the network" \
        in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    with caplog.at_level("WARNING", logger="tiramisu_brats.api"):
        api.grid_info(grid((0.5, 0.5, 1.0), (480, 480, 155), resample=False), "fine")
    assert ("fine: the network sees voxels of 0.5x0.5x1 mm (the input's 0.5x0.5x1 mm; trained "
            "on 1 mm images)") in caplog.text
