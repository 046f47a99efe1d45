"""Tests of tiramisu_brats.report."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from tiramisu_brats import report
from tiramisu_brats.metrics import METRIC_COLUMNS, evaluate_case
from tiramisu_brats.report import (
    box_plots,
    overlay_png,
    summarize,
    write_metrics_csv,
    write_report,
    write_summary_json,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(n: int = 3, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row: dict = {"case": f"BraTS_{i:03d}"}
        for col in METRIC_COLUMNS:
            row[col] = float(rng.uniform(0, 1)) / 3.0  # not short decimals
        rows.append(row)
    return rows


def _check_png(path):
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


def _synthetic_case(shape=(48, 56, 20)):
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    brain = ((x - 24) / 20) ** 2 + ((y - 28) / 24) ** 2 + ((z - 10) / 9) ** 2 < 1
    rng = np.random.default_rng(0)
    flair = np.where(brain, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)
    t1ce = np.where(brain, 80 + 10 * rng.standard_normal(shape), 0).astype(np.float32)
    r2 = (x - 30) ** 2 + (y - 20) ** 2 + (z - 13) ** 2 * 4
    ref = np.zeros(shape, dtype=np.uint8)
    ref[r2 < 100] = 2
    ref[r2 < 40] = 4
    ref[r2 < 12] = 1
    flair[ref == 2] += 60
    t1ce[ref == 4] += 80
    pred = np.roll(ref, 2, axis=1)
    return flair, t1ce, pred, ref


# --------------------------------------------------------------------------- csv


def test_metrics_csv_header_and_values(tmp_path):
    rows = _rows(3)
    rows[1]["stage"] = "postprocessed"
    rows[0]["dice_WT"] = 1 / 7
    path = write_metrics_csv(rows, tmp_path / "m.csv")
    assert path == tmp_path / "m.csv"
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = list(reader)
    assert header == ["case", *METRIC_COLUMNS, "stage"]
    assert len(body) == 3
    for row, line in zip(rows, body, strict=True):
        assert line[0] == row["case"]
        for col, text in zip(METRIC_COLUMNS, line[1:], strict=False):
            assert float(text) == pytest.approx(row[col], abs=1e-12, rel=0)
    assert float(body[0][1]) == 1 / 7  # exact round trip
    assert body[0][-1] == "" and body[1][-1] == "postprocessed"


def test_metrics_csv_missing_column(tmp_path):
    rows = _rows(1)
    del rows[0]["hd95_ET"]
    with pytest.raises(ValueError, match="hd95_ET"):
        write_metrics_csv(rows, tmp_path / "m.csv")


def test_metrics_csv_overwrites_by_default(tmp_path):
    path = tmp_path / "m.csv"
    write_metrics_csv(_rows(2), path)
    write_metrics_csv(_rows(1), path)
    assert len(path.read_text().splitlines()) == 2


# --------------------------------------------------------------------------- summary


def test_summarize_three_rows():
    rows = _rows(3)
    for row, v in zip(rows, (0.2, 0.5, 0.95), strict=True):
        row["dice_ET"] = v
    rows[0]["stage"] = "raw"  # strings are not summarized
    s = summarize(rows)
    assert list(s)[: len(METRIC_COLUMNS)] == METRIC_COLUMNS
    assert "case" not in s and "stage" not in s
    d = s["dice_ET"]
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(0.55)
    assert d["median"] == pytest.approx(0.5)
    # population std: sqrt(((0.35)^2 + 0.05^2 + 0.4^2) / 3)
    assert d["std"] == pytest.approx(math.sqrt((0.35**2 + 0.05**2 + 0.4**2) / 3))
    assert summarize([]) == {}


def test_summarize_skips_nan():
    rows = _rows(3)
    rows[2]["hd95_TC"] = float("nan")
    s = summarize(rows)
    assert s["hd95_TC"]["n"] == 2
    assert s["hd95_TC"]["mean"] == pytest.approx((rows[0]["hd95_TC"] + rows[1]["hd95_TC"]) / 2)


def test_write_summary_json(tmp_path):
    rows = _rows(3)
    path = write_summary_json(rows, tmp_path / "s.json", {"model": "tiramisu", "x": np.float32(2)})
    doc = json.loads(path.read_text())
    assert doc["n_cases"] == 3
    assert doc["model"] == "tiramisu"
    assert doc["x"] == 2.0
    assert doc["metrics"]["dice_WT"]["mean"] == pytest.approx(np.mean([r["dice_WT"] for r in rows]))
    with pytest.raises(ValueError, match="reserved"):
        write_summary_json(rows, tmp_path / "t.json", {"metrics": 1})


# --------------------------------------------------------------------------- figures


def test_box_plots_two_stages_and_one(tmp_path, monkeypatch):
    raw, post = _rows(5, seed=1), _rows(5, seed=2)
    p = box_plots({"raw": raw, "postprocessed": post}, tmp_path / "b.png")
    _check_png(p)
    p1 = box_plots({"prediction": post[:1]}, tmp_path / "b1.png")
    _check_png(p1)
    with pytest.raises(ValueError):
        box_plots({}, tmp_path / "b2.png")
    # What the picture shows: one box per stage and region, its median the rows' median, the
    # stages side by side around each region's tick (0.8 wide in all).
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path, overwrite: figures.append(fig))
    box_plots({"raw": raw, "postprocessed": post}, tmp_path / "b.png")
    for ax, metric in zip(figures[0].axes, ("dice", "sensitivity"), strict=True):
        medians = sorted((float(np.mean(line.get_xdata())), float(line.get_ydata()[0]))
                         for line in ax.lines if line.get_color() == "black")
        expected = sorted((g + (s - 0.5) * 0.4, float(np.median([r[f"{metric}_{region}"]
                                                                   for r in rows])))
                          for s, rows in enumerate((raw, post))
                          for g, region in enumerate(report.REGIONS))
        assert len(medians) == 2 * len(report.REGIONS)
        np.testing.assert_allclose(medians, expected)
    legend = [t.get_text() for t in figures[0].axes[1].get_legend().get_texts()]
    assert legend == ["raw (n=5)", "postprocessed (n=5)"]


def test_overlay_png_with_and_without_reference(tmp_path):
    flair, t1ce, pred, ref = _synthetic_case()
    copies = [a.copy() for a in (flair, t1ce, pred, ref)]
    p = overlay_png(flair, t1ce, pred, ref, tmp_path / "o.png", "case_001", (1.0, 1.0, 2.0))
    img = _check_png(p)
    p2 = overlay_png(flair, t1ce, pred, None, tmp_path / "o2.png", "case_001")
    img2 = _check_png(p2)
    assert img.shape[1] > img2.shape[1]  # one more column with the reference
    for a, b in zip((flair, t1ce, pred, ref), copies, strict=True):
        np.testing.assert_array_equal(a, b)
    empty = np.zeros_like(pred)
    _check_png(overlay_png(flair, t1ce, empty, empty, tmp_path / "o3.png", "empty"))
    with pytest.raises(ValueError, match="shape"):
        overlay_png(flair, t1ce, pred[:-1], ref, tmp_path / "o4.png", "bad")


def test_overlay_slice_of_a_prediction_where_the_expert_found_no_tumor(tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(report, "_save_figure",
                        lambda fig, path, overwrite: titles.append(fig.get_suptitle()))
    flair, t1ce, _, _ = _synthetic_case()
    empty = np.zeros(flair.shape, np.uint8)
    false_positive = empty.copy()
    false_positive[20:25, 20:25, 4] = 2  # far from z = 10, where the brain is largest
    overlay_png(flair, t1ce, false_positive, empty, tmp_path / "o.png", "c")
    overlay_png(flair, t1ce, false_positive, None, tmp_path / "o.png", "c")
    overlay_png(flair, t1ce, empty, empty, tmp_path / "o.png", "c")
    assert titles == [
        "c\naxial slice z = 4 (no expert tumor; largest predicted tumor area, 25 voxels)",
        "c\naxial slice z = 4 (largest predicted tumor area, 25 voxels)",
        "c\naxial slice z = 10 (no tumor; largest brain area)"]


def test_slices_are_shown_radiologically_with_the_sides_named(tmp_path, monkeypatch):
    # a volume in the BraTS orientation: X right to left, Y front to back, Z up
    volume = np.zeros((6, 8, 10))
    volume[0, 0, 9] = 1  # the patient's right, front, top
    axial, coronal, sagittal = volume[:, :, 9], volume[:, 0, :], volume[0, :, :]
    # axial: front at the top, the patient's right on the left
    assert report._displayed(axial, "axial")[0, 0] == 1
    assert report._displayed(axial, "axial").shape == (8, 6)  # rows Y, columns X
    # coronal: top at the top, right on the left; sagittal: top up, the face on the left
    assert report._displayed(coronal, "coronal")[0, 0] == 1
    assert report._displayed(sagittal, "sagittal")[0, 0] == 1
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path, overwrite: figures.append(fig))
    flair, t1ce, pred, _ = _synthetic_case()
    report.planes_png(flair, t1ce, pred, tmp_path / "p.png", "c", enhancing=3)
    texts = [t.get_text() for ax in figures[0].axes for t in ax.texts]
    # the panels row by row: axial, coronal, sagittal over FLAIR, then over T1ce
    assert texts[:12] == ["R", "L", "A", "P", "R", "L", "S", "I", "A", "P", "S", "I"]
    assert texts[12:] == texts[:12]
    legend = [t.get_text() for t in figures[0].legends[0].get_texts()]
    assert legend[-1] == "Enhancing tumor (3)"


# --------------------------------------------------------------------------- report


def test_write_report(tmp_path):
    _, _, pred, ref = _synthetic_case()
    raw_row = {"case": "c1", **evaluate_case(pred, ref, (1.0, 1.0, 1.0))}
    post_row = {"case": "c1", **evaluate_case(ref, ref, (1.0, 1.0, 1.0))}
    out = tmp_path / "report" / "sub"
    paths = write_report(out, [post_row], raw_rows=[raw_row], extra_summary={"version": "0.1"})
    names = [p.name for p in paths]
    assert names == ["metrics.csv", "metrics_raw.csv", "summary.json", "boxplots.png"]
    assert all(p.is_file() for p in paths)
    doc = json.loads((out / "summary.json").read_text())
    assert doc["metrics"]["dice_WT"]["mean"] == 1.0
    assert doc["metrics_raw"]["dice_WT"]["mean"] == pytest.approx(raw_row["dice_WT"])
    assert doc["version"] == "0.1"
    _check_png(out / "boxplots.png")

    paths = write_report(tmp_path / "r2", [post_row])
    assert [p.name for p in paths] == ["metrics.csv", "summary.json", "boxplots.png"]
    # Rerunning into the same folder replaces the files.
    assert len(write_report(tmp_path / "r2", [post_row, raw_row])) == 3
    assert len((tmp_path / "r2" / "metrics.csv").read_text().splitlines()) == 3


def test_planes_png_draws_three_planes_through_the_tumor(tmp_path):
    from tiramisu_brats.synthetic import make_case

    case = make_case(1, shape=(64, 64, 40))
    path = report.planes_png(case.image[3], case.image[1], case.labels, tmp_path / "p.png",
                             "syn", (1.0, 1.0, 1.0))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)[..., :3]
    # Edema (#2adf2a) drawn at 45 % over grey: pixels far greener than grey, in all 6 panels.
    greenish = (pixels[..., 1] - pixels[..., [0, 2]].max(-1)) > 0.15
    assert greenish.sum() > 500
    with pytest.raises(ValueError, match="expected 3-D"):
        report.planes_png(case.image[3][..., 0], case.image[1], case.labels, tmp_path / "q.png",
                          "syn")


def test_an_evaluation_page_lists_the_worst_dice_first_under_the_means(tmp_path):
    rows = [{"case": "a", "review": False, "qc_score": 0.9, "dice_WT": 0.9, "dice_TC": 0.8,
             "dice_ET": 0.1},  # mean 0.6: flagged ok by QC, yet the worst
            {"case": "b", "review": True, "qc_score": 0.2, "dice_WT": 0.9, "dice_TC": 0.9,
             "dice_ET": 0.9},
            {"case": "c", "dice_WT": 0.7, "dice_TC": 0.7, "dice_ET": 0.7}]
    page = report.write_index_html(tmp_path, rows, "Evaluation",
                                   files=["metrics.csv", "boxplots.png"]).read_text()
    body = page[page.index("<tbody>"):]
    assert body.index(">a<") < body.index(">c<") < body.index(">b<")
    assert "sorted by the mean of their Dice, lowest first" in page
    means = page[page.index('<table id="dice">'):page.index("</table>")]
    assert "<td>mean</td><td>0.833</td><td>0.800</td><td>0.567</td>" in means
    assert "<td>median</td><td>0.900</td><td>0.800</td><td>0.700</td>" in means
    assert '<a href="metrics.csv">metrics.csv</a>' in page and '<img src="boxplots.png"' in page
    assert "3 cases;" in page
    # beside the expert's Dice, the volumes are said to be the prediction's
    one = report.write_index_html(tmp_path, [{**rows[0], "WT_ml": 4.0}], "One").read_text()
    assert "1 case;" in one and "predicted WT ml" in one


def test_index_html_lists_every_case_review_first_and_needs_no_network(tmp_path):
    rows = [{"case": "good", "review": False, "qc_score": 0.9, "WT_ml": 40.25, "image": "a.png"},
            {"case": "bad <1>", "review": True, "qc_score": 0.2, "qc_why": "views disagree",
             "WT_ml": 3.0},
            {"case": "mid", "review": False, "qc_score": 0.6, "WT_ml": 20.0},
            {"case": "failed", "review": True, "qc_why": "failed: no flair image"}]
    page = report.write_index_html(tmp_path, rows, "Cohort").read_text()
    body = page[page.index("<tbody>"):]
    order = ["failed", "bad &lt;1&gt;", "mid", "good"]  # no score to review first, then scores
    assert [body.index(case) for case in order] == sorted(body.index(case) for case in order)
    assert page.count("<tr>") == 5 and "Dice WT" not in page and "40.2" in page
    assert ">WT ml<" in page and "predicted" not in page
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch
    assert '<img src="a.png"' in page and "2 to review" in page
