"""The Python API as users call it: modes, views, the README's example."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tiramisu_brats import api, io
from tiramisu_brats.infer import CLASS_TO_LABEL
from tiramisu_brats.postprocess import postprocess
from tiramisu_brats.synthetic import make_case


@pytest.fixture(scope="module")
def case():
    return make_case(4, shape=(64, 64, 40))


@pytest.fixture(scope="module")
def accurate(tiny_weights):
    return api.Segmenter(tiny_weights, "torch", mode="accurate", crop=(64, 64))


def test_accurate_mode_is_the_mean_of_every_views_probabilities(case, accurate):
    seg = accurate.segment(case.image)
    views = [accurate.view_probabilities(case.image, plane, flip)
             for plane, flip in api.MODES["accurate"]]
    assert len(views) == 6 and all(v.shape == (4, 64, 64, 40) for v in views)
    mean = np.mean(views, axis=0)
    np.testing.assert_array_equal(seg.raw, CLASS_TO_LABEL[mean.argmax(0)])
    np.testing.assert_array_equal(seg.labels, postprocess(seg.raw))
    assert seg.slices["brain"] == 2 * sum(
        len(np.flatnonzero((case.image != 0).any(axis=(0, *(a for a in (1, 2, 3) if a != k)))))
        for k in (1, 2, 3))


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
    from tiramisu_brats.synthetic import write_case

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


def test_unknown_mode_is_refused(tiny_weights):
    with pytest.raises(ValueError, match="unknown mode 'best'"):
        api.Segmenter(tiny_weights, "torch", mode="best")


@pytest.mark.real
@pytest.mark.slow
def test_the_readme_example_runs(real_data, tmp_path, monkeypatch):
    monkeypatch.chdir(real_data / "brats-labeled")
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
