"""Bad input, faults and untrusted files: clear errors, nothing lost, nothing run.

Each test backs a row of docs/robustness.md. The CLI runs in-process (``CliRunner``) with a
tiny random model and small synthetic cases; the kill tests run a real subprocess and SIGKILL
it. Property tests of the pure functions live next to them (see docs/robustness.md):
tests/test_preprocess.py, tests/test_metrics.py, tests/test_postprocess.py.
"""

from __future__ import annotations

import ast
import csv
import gzip
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tiramisu_brats import io
from tiramisu_brats.cli import app
from tiramisu_brats.synthetic import SyntheticCase, make_case, write_case

REPO = Path(__file__).resolve().parents[1]
MODALITIES = io.MODALITIES
TINY = dict(first_conv=8, down_blocks=(2, 2), bottleneck=2, up_blocks=(2, 2), growth_rate=4)
runner = CliRunner()


# ----------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Tiramisu saved as safetensors (the shipped model may not exist)."""
    import torch

    from tiramisu_brats.model import Tiramisu, TiramisuConfig, save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return save_weights(Tiramisu(TiramisuConfig(**TINY)).eval(), path)


_BASE: dict[int, SyntheticCase] = {}


def small_case(root: Path, case_id: str = "C1", seed: int = 0, z: slice = slice(9, 15)) -> Path:
    """Write a synthetic case (6 axial slices of a 48x40x24 case: fast to segment) into
    ``root/case_id`` in BraTS 2021 naming, with its segmentation; returns the folder."""
    if seed not in _BASE:
        _BASE[seed] = make_case(seed, shape=(48, 40, 24))
    base = _BASE[seed]
    case = SyntheticCase(image=np.ascontiguousarray(base.image[..., z]),
                         labels=np.ascontiguousarray(base.labels[..., z]), affine=base.affine,
                         case_id=case_id)
    return write_case(case, root)


def image_path(folder: Path, modality: str, case_id: str = "C1") -> Path:
    suffix = "seg" if modality == "seg" else modality
    return folder / f"{case_id}_{suffix}.nii.gz"


def rewrite(path: Path, data: np.ndarray | None = None, affine: np.ndarray | None = None,
            new_path: Path | None = None) -> Path:
    """Rewrite a NIfTI file with new voxels and/or affine (qform and sform set to it)."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj) if data is None else data
    affine = img.affine if affine is None else affine
    out = nib.Nifti1Image(data, affine)
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    nib.save(out, new_path or path)
    return new_path or path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (hidden ones too) with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def cli(*args: object) -> object:
    return runner.invoke(app, [str(a) for a in args])


def segment(model: Path, *args: object) -> object:
    return cli("segment", *args, "--model", model, "--backend", "torch", "--no-progress")


def assert_error_line(result, pattern: str) -> str:
    """Exit status 2 and exactly one line of output, ``error: <pattern>`` (a regex)."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    assert re.fullmatch(rf"error: {pattern}", lines[0]), lines[0]
    return lines[0]


# ------------------------------------------------------------------- bad input to `segment`


def _missing(folder: Path) -> tuple[Path, str]:
    image_path(folder, "t2").unlink()
    return folder, r"no t2 image \(expected <case>_t2\.nii\.gz, BraTS 2017-2021 naming\)"


def _duplicate(folder: Path) -> tuple[Path, str]:
    shutil.copy(image_path(folder, "t1"), folder / "C1_t1.nii")
    return folder, r"several t1 images: C1_t1\.nii, C1_t1\.nii\.gz"


def _two_namings(folder: Path) -> tuple[Path, str]:
    shutil.copy(image_path(folder, "t1"), folder / "C1-t1n.nii.gz")  # BraTS 2023 naming too
    return folder, r"several t1 images: C1_t1\.nii\.gz, C1-t1n\.nii\.gz"


def _t1_prefix_of_t1ce(folder: Path) -> tuple[Path, str]:
    image_path(folder, "t1").unlink()  # C1_t1ce.nii.gz ends in "_t1ce", not "_t1": no match
    return folder, r"no t1 image \(expected <case>_t1\.nii\.gz, BraTS 2017-2021 naming\)"


def _shape(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "t2")
    rewrite(path, np.ones((48, 40, 7), np.int16))
    return path, r"shape \(48, 40, 7\) differs from t1's \(48, 40, 6\)"


def _affine(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "flair")
    affine = nib.load(path).affine.copy()
    affine[0, 3] += 2.0  # shifted by 2 mm
    rewrite(path, affine=affine)
    return path, r"affine differs from t1's \(by up to 2\)"


def _two_d(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "t1ce")
    rewrite(path, np.ones((48, 40), np.int16))
    return path, r"2D image of shape \(48, 40\), expected 3D"


def _four_d(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "t1ce")
    rewrite(path, np.ones((48, 40, 6, 3), np.int16))
    return path, r"4D image with 3 volumes of shape \(48, 40, 6, 3\), expected 3D"


def _truncated(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "flair")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path, r"cannot read the voxel data \(Compressed file ended before .*\)"


def _not_nifti(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "t1")
    path.write_text("patient notes, not an image\n" * 20)
    return path, r"not a readable NIfTI file \(File .* is not a gzip file\)"


def _gzip_not_nifti(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "t1")
    path.write_bytes(gzip.compress(b"\x00" * 4000))
    return path, r"not a readable NIfTI file \(.*\)"


def _all_zero(folder: Path) -> tuple[Path, str]:
    path = image_path(folder, "t2")
    rewrite(path, np.zeros((48, 40, 6), np.int16))
    return path, r"all voxels are zero"


BAD_CASES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    "missing modality": _missing,
    "two files for one modality": _duplicate,
    "one modality in two namings": _two_namings,
    "t1 missing, t1ce not taken for it": _t1_prefix_of_t1ce,
    "shapes differ": _shape,
    "affines differ": _affine,
    "2D image": _two_d,
    "4D image": _four_d,
    "truncated .nii.gz": _truncated,
    "not NIfTI (text)": _not_nifti,
    "not NIfTI (gzip of zeros)": _gzip_not_nifti,
    "all-zero modality": _all_zero,
}


@pytest.mark.parametrize("problem", list(BAD_CASES))
def test_segment_bad_input_one_line_exit_2_no_output(
    tmp_path: Path, tiny_model: Path, problem: str
) -> None:
    folder = small_case(tmp_path / "in")
    path, message = BAD_CASES[problem](folder)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = segment(tiny_model, folder, "-o", out_dir / "seg.nii.gz")
    assert_error_line(result, rf"{re.escape(str(path))}: {message}")
    assert list(out_dir.iterdir()) == []  # no label map, no summary, no temporary file


def test_segment_absurd_header_size_refused_before_reading(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = small_case(tmp_path / "in")
    for m in MODALITIES:  # uncompressed, so that the header can be forged in place
        path = image_path(folder, m)
        rewrite(path, new_path=path.with_suffix(""))
        path.unlink()
    forged = folder / "C1_t2.nii"
    header = nib.load(forged).header.copy()
    header.set_data_shape((30000, 30000, 30000))  # 27e12 voxels, 54 TB of int16
    forged.write_bytes(header.binaryblock + bytes(4) + bytes(100))

    def no_reading(*args, **kwargs):
        raise AssertionError("voxel data must not be read (or allocated)")

    monkeypatch.setattr(io, "_read_voxels", no_reading)
    out = tmp_path / "seg.nii.gz"
    result = segment(tiny_model, folder, "-o", out)
    assert_error_line(result, rf"{re.escape(str(forged))}: image of shape \(30000, 30000, "
                              r"30000\) is larger than this tool reads \(at most 1024 voxels "
                              r"per axis and 268,435,456 in all\)")
    assert not out.exists()


def test_segment_output_equal_to_an_input_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    folder = small_case(tmp_path / "in")
    before = snapshot(folder)
    for name in ("t1", "seg"):
        target = image_path(folder, name)
        result = segment(tiny_model, folder, "-o", target, "--overwrite")
        assert_error_line(result, rf"{re.escape(str(target))}: the output would overwrite an "
                                  "input file")
    assert snapshot(folder) == before


def test_segment_output_folder_missing_or_a_file(tmp_path: Path, tiny_model: Path) -> None:
    """Tests run as root, for whom chmod does not stop writes: an unwritable output folder is
    made by a parent that does not exist or is a regular file (and, below, by os.access)."""
    folder = small_case(tmp_path / "in")
    missing = tmp_path / "no" / "such" / "seg.nii.gz"
    result = segment(tiny_model, folder, "-o", missing)
    assert_error_line(result, rf"{re.escape(str(missing.parent))}: output folder does not exist")
    assert not (tmp_path / "no").exists()

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    result = segment(tiny_model, folder, "-o", a_file / "seg.nii.gz")
    assert_error_line(result, rf"{re.escape(str(a_file))}: not a folder")
    assert a_file.read_text() == "x"

    cohort = tmp_path / "cohort"
    small_case(cohort, "A")
    result = segment(tiny_model, cohort, "-o", a_file)  # a folder of cases needs a folder
    assert_error_line(result, rf"{re.escape(str(a_file))}: not a folder \(the output for a "
                              r"folder of cases is a folder\)")
    result = segment(tiny_model, cohort, "-o", a_file / "sub")
    assert_error_line(result, rf"{re.escape(str(a_file / 'sub'))}: Not a directory")
    assert a_file.read_text() == "x"


def test_segment_unwritable_output_folder_refused_before_inference(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = small_case(tmp_path / "in")
    out_dir = tmp_path / "readonly"
    out_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != out_dir
                        and real_access(p, mode, **kw))
    from tiramisu_brats import api

    def no_inference(*args, **kwargs):
        raise AssertionError("the output folder must be checked before inference")

    monkeypatch.setattr(api, "preprocess", no_inference)
    result = segment(tiny_model, folder, "-o", out_dir / "seg.nii.gz")
    assert_error_line(result, rf"{re.escape(str(out_dir / 'seg.nii.gz'))}: output folder "
                              rf"{re.escape(str(out_dir))} is not writable")
    assert list(out_dir.iterdir()) == []


# ---------------------------------------------------------- accepted with a warning: exit 0


def _nan_inf(folder: Path) -> str:
    path = image_path(folder, "t2")
    data = np.asanyarray(nib.load(path).dataobj).astype(np.float32)
    inside = np.argwhere(data > 0)
    data[tuple(inside[0])], data[tuple(inside[1])], data[tuple(inside[2])] = np.nan, np.inf, -np.inf
    rewrite(path, data)
    return rf"{re.escape(str(path))}: 3 NaN/Inf voxels \(or beyond float32's range\) set to 0"


def _anisotropic(folder: Path) -> str:
    for name in (*MODALITIES, "seg"):
        path = image_path(folder, name)
        affine = nib.load(path).affine @ np.diag([1.0, 1.0, 3.0, 1.0])  # 1 x 1 x 3 mm
        rewrite(path, affine=affine)
    return None  # resampled to 1 mm for the network: no warning (the JSON says so)


def _singleton_4th_axis(folder: Path) -> str | None:
    path = image_path(folder, "t1ce")
    rewrite(path, np.asanyarray(nib.load(path).dataobj)[..., None])  # (X, Y, Z, 1)
    return None


ACCEPTED: dict[str, Callable[[Path], str | None]] = {
    "NaN/Inf voxels": _nan_inf,
    "anisotropic 1x1x3 mm (resampled to 1 mm)": _anisotropic,
    "trailing singleton 4th axis": _singleton_4th_axis,
}


@pytest.mark.parametrize("situation", list(ACCEPTED))
def test_segment_accepts_with_warning(
    tmp_path: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture, situation: str
) -> None:
    folder = small_case(tmp_path / "in")
    warning = ACCEPTED[situation](folder)
    out = tmp_path / "seg.nii.gz"
    with caplog.at_level(logging.WARNING, logger="tiramisu_brats"):
        result = segment(tiny_model, folder, "-o", out)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and r.name.startswith("tiramisu_brats")]
    if warning is None:
        assert warnings == []
    else:
        assert any(re.match(warning, w) for w in warnings), warnings
    labels, affine, header = io.read_label_map(out)
    t1 = nib.load(image_path(folder, "t1"))
    assert labels.shape == t1.shape[:3]
    np.testing.assert_allclose(affine, t1.affine, atol=1e-4)  # on the input's grid, spacing
    assert header.get_zooms()[:3] == t1.header.get_zooms()[:3]


# ------------------------------------------------------------------ bad input to `evaluate`


def _label_map(path: Path, values: tuple, dtype=np.uint8, shape=(48, 40, 6)) -> Path:
    labels = np.zeros(shape, dtype)
    for i, v in enumerate(values):
        labels[10 + 2 * i : 12 + 2 * i, 10:14, 2:4] = v
    return rewrite_new(path, labels)


def rewrite_new(path: Path, data: np.ndarray) -> Path:
    img = nib.Nifti1Image(data, np.diag([-1.0, -1.0, 1.0, 1.0]))
    nib.save(img, path)
    return path


EVAL_BAD = {
    "label 5 in reference": (
        lambda ref, pred: _label_map(ref, (2, 5)),
        "ref", r"unexpected label values \[5\] \(expected 0/1/2/4, or 0/1/2/3 in BraTS 2023 "
               r"numbering\)"),
    "labels 3 and 4 mixed in reference": (
        lambda ref, pred: _label_map(ref, (1, 3, 4)),
        "ref", r"label values \[0, 1, 3, 4\] mix 3 \(BraTS 2023 enhancing tumor\) and 4 "
               r"\(BraTS 2017-2021 enhancing tumor\)"),
    "non-integer label in reference": (
        lambda ref, pred: _label_map(ref, (2, 1.5), np.float32),
        "ref", r"unexpected label values \[1\.5\] .*"),
    "an image given as the reference (values above 4 and above 255)": (
        lambda ref, pred: _label_map(ref, (2, 7, 300, 6), np.int16),
        "ref", r"unexpected label values \[6, 7, 300\] .*"),
    "negative label in reference": (
        lambda ref, pred: _label_map(ref, (2, -1), np.int16),
        "ref", r"unexpected label values \[-1\] .*"),
    "prediction of another shape": (
        lambda ref, pred: _label_map(pred, (2, 4), shape=(48, 40, 7)),
        "pred", r"shape \(48, 40, 7\) differs from the reference's \(48, 40, 6\) \(.*\)"),
    "truncated prediction": (
        lambda ref, pred: pred.write_bytes(pred.read_bytes()[:-20]),
        "pred", r"cannot read the voxel data \(Compressed file ended before the "
                r"end-of-stream marker was reached\)"),
}


@pytest.mark.parametrize("problem", list(EVAL_BAD))
def test_evaluate_bad_input_one_line_exit_2_no_report(tmp_path: Path, problem: str) -> None:
    ref, pred = tmp_path / "C1_seg.nii.gz", tmp_path / "C1.nii.gz"
    _label_map(ref, (2, 4))
    _label_map(pred, (2, 1, 4))
    make_bad, which, message = EVAL_BAD[problem]
    make_bad(ref, pred)
    report = tmp_path / "report"
    result = cli("evaluate", pred, ref, "-o", report, "--no-progress")
    bad = ref if which == "ref" else pred
    assert_error_line(result, rf"{re.escape(str(bad))}: {message}")
    assert not report.exists()


def test_evaluate_report_folder_that_is_an_input_or_below_a_file(tmp_path: Path) -> None:
    cases = tmp_path / "cases"
    folder = small_case(cases)
    preds = tmp_path / "preds"
    preds.mkdir()
    shutil.copy(image_path(folder, "seg"), preds / "C1.nii.gz")
    before = snapshot(tmp_path)
    for report in (cases, preds):
        result = cli("evaluate", preds, cases, "-o", report, "--overwrite", "--no-progress")
        assert_error_line(result, rf"{re.escape(str(report))}: the report folder is an input "
                                  rf"\({re.escape(str(report))}\)")
    under_file = preds / "C1.nii.gz" / "report"
    result = cli("evaluate", preds, cases, "-o", under_file, "--no-progress")
    assert_error_line(result, rf"{re.escape(str(under_file))}: "
                              rf"{re.escape(str(preds / 'C1.nii.gz'))} is not a folder")
    assert snapshot(tmp_path) == before


def test_evaluate_good_input_writes_report(tmp_path: Path) -> None:
    """The counterpart of the refusals above: the same layout, valid, gives a report."""
    folder = small_case(tmp_path / "cases")
    preds = tmp_path / "preds"
    preds.mkdir()
    shutil.copy(image_path(folder, "seg"), preds / "C1.nii.gz")
    result = cli("evaluate", preds, tmp_path / "cases", "-o", tmp_path / "report",
                 "--no-progress")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "report").iterdir()} >= {"metrics.csv", "summary.json"}


# ------------------------------------------------------------------- nothing lost: writing

_WRITER = textwrap.dedent("""
    import sys
    import nibabel as nib
    import numpy as np
    from tiramisu_brats import io

    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    shape = (400, 400, 300)  # 48 M voxels: a few seconds to compress
    codes = np.random.default_rng(0).integers(0, 4, shape, dtype=np.uint8)
    labels = np.array([0, 1, 2, 4], np.uint8)[codes]
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    io.write_label_map(sys.argv[1], labels, header, header.get_best_affine(), overwrite=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_while_writing_a_label_map_keeps_the_old_file(tmp_path: Path, sig: int) -> None:
    """A process killed in the middle of writing leaves the old file intact. SIGINT (Ctrl-C)
    removes the temporary file; after SIGKILL nothing can clean up, so the hidden temporary
    file stays: every reader skips hidden files and the next write succeeds."""
    target = tmp_path / "seg.nii.gz"
    old = _label_map(target, (2, 4))
    old_bytes = old.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    temps: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".seg.nii.gz.tmp-")]
        if temps and temps[0].stat().st_size > 100_000:  # well into the data
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the writer finished before it could be killed"
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode != 0
    assert target.read_bytes() == old_bytes  # the old file, whole
    left = sorted(p.name for p in tmp_path.iterdir())
    if sig == signal.SIGKILL:
        assert left[0].startswith(".seg.nii.gz.tmp-") and left[1:] == ["seg.nii.gz"]
        assert set(api_find_label_maps(tmp_path)) == {"seg"}  # the temporary file is ignored
    else:
        assert left == ["seg.nii.gz"]
    labels, _, header = io.read_label_map(target)  # and the next write replaces it
    io.write_label_map(target, np.zeros_like(labels), header, header.get_best_affine(),
                       overwrite=True)
    assert not io.read_label_map(target)[0].any()


def api_find_label_maps(folder: Path) -> dict:
    from tiramisu_brats.api import find_label_maps

    return find_label_maps(folder)


def test_failing_write_keeps_old_output_and_leaves_no_temp(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = small_case(tmp_path / "in")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "seg.nii.gz"
    assert segment(tiny_model, folder, "-o", out).exit_code == 0
    before = snapshot(out_dir)

    def disk_full(img, filename) -> None:
        Path(filename).write_bytes(b"\x1f\x8b half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.nib, "save", disk_full)
    result = segment(tiny_model, folder, "-o", out, "--overwrite")
    assert_error_line(result, rf"{re.escape(str(out))}: cannot write it: No space left on device")
    assert snapshot(out_dir) == before  # old label map and summary, no temporary file


# ------------------------------------------------------------- nothing lost: a cohort run


def test_cohort_continues_past_failures_lists_them_and_resumes(
    tmp_path: Path, tiny_model: Path
) -> None:
    cohort, out = tmp_path / "cohort", tmp_path / "out"
    small_case(cohort, "A", seed=0)
    bad = small_case(cohort, "B", seed=1)
    good_t2 = image_path(bad, "t2", "B").read_bytes()
    rewrite(image_path(bad, "t2", "B"), np.zeros((48, 40, 6), np.int16))
    incomplete = small_case(cohort, "C", seed=0)
    image_path(incomplete, "flair", "C").unlink()

    result = segment(tiny_model, cohort, "-o", out)
    assert result.exit_code == 1, result.output
    assert sorted(p.name for p in out.iterdir()) == ["A.json", "A.nii.gz", "A_planes.png",
                                                     "failures.csv", "index.html"]
    with open(out / "failures.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["case", "reason"],
        ["B", f"{image_path(bad, 't2', 'B')}: all voxels are zero"],
        ["C", f"{incomplete}: no flair image (expected <case>_flair.nii.gz, BraTS 2017-2021 "
              "naming)"],
    ]
    done = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # Fix B and resume: A is not redone, B is, C is still listed.
    image_path(bad, "t2", "B").write_bytes(good_t2)
    result = segment(tiny_model, cohort, "-o", out, "--skip-existing")
    assert result.exit_code == 1, result.output
    assert "1 segmented, 1 skipped (done before), 1 failed" in result.output
    assert {n: (out / n).stat().st_mtime_ns for n in ("A.json", "A.nii.gz")} == {
        n: done[n] for n in ("A.json", "A.nii.gz")}
    assert (out / "B.nii.gz").exists() and (out / "B.json").exists()
    with open(out / "failures.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f)] == ["case", "C"]

    # A run killed after B's label map but before its summary: B is redone, not skipped.
    (out / "B.json").unlink()
    b_mtime = (out / "B.nii.gz").stat().st_mtime_ns
    shutil.rmtree(incomplete)
    result = segment(tiny_model, cohort, "-o", out, "--skip-existing")
    assert result.exit_code == 0, result.output
    assert (out / "B.json").exists() and (out / "B.nii.gz").stat().st_mtime_ns != b_mtime
    assert (out / "A.nii.gz").stat().st_mtime_ns == done["A.nii.gz"]
    assert not (out / "failures.csv").exists()  # the old list no longer holds
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------ nothing lost: training kills


def _tiny_train_setup(root: Path):
    from tiramisu_brats.data import build_cache
    from tiramisu_brats.model import TiramisuConfig
    from tiramisu_brats.train import TrainConfig

    data = root / "data"
    for seed in range(3):
        small_case(data, f"c{seed}", seed=seed)  # 6 slices each, all with tumor
    cases = build_cache(data, root / "cache", crop=(64, 64))
    config = TrainConfig(model=TiramisuConfig(**TINY), epochs=3, steps_per_epoch=2,
                         batch_size=2, patch=(32, 32), val_cases=("c2",),
                         train_cases=("c0", "c1"))
    return cases, config


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory: pytest.TempPathFactory):
    """Run A: the tiny model trained 3 epochs straight on a 3-case synthetic cache."""
    from tiramisu_brats.data import select
    from tiramisu_brats.train import train

    root = tmp_path_factory.mktemp("train")
    cases, config = _tiny_train_setup(root)
    rows = train(select(cases, config.train_cases), select(cases, config.val_cases),
                 root / "A", config)
    return root, cases, config, rows


def _losses(rows: list[dict]) -> list[tuple]:
    return [(int(r["epoch"]), float(r["train_loss"]), float(r["val_dice_mean"])) for r in rows]


@pytest.mark.slow
def test_training_stopped_in_epoch_3_resumes_to_the_same_losses(uninterrupted_run) -> None:
    from tiramisu_brats.data import select
    from tiramisu_brats.train import train

    root, cases, config, rows_a = uninterrupted_run
    train_set = select(cases, config.train_cases)
    val_set = select(cases, config.val_cases)

    class Killed(Exception):
        pass

    def die_in_epoch_3(epoch: int, step: int, loss: float) -> None:
        if epoch == 3:  # after an optimizer step that no checkpoint holds
            raise Killed

    with pytest.raises(Killed):
        train(train_set, val_set, root / "B", config, on_step=die_in_epoch_3)
    with open(root / "B" / "log.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]
    rows_b = train(train_set, val_set, root / "B", config, resume=True)
    assert _losses(rows_b) == _losses(rows_a)  # exact float equality


_TRAINER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tiramisu_brats.data import open_cache, select
    from tiramisu_brats.train import TrainConfig, train

    cache, run, marker = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    config = TrainConfig.from_json(Path(sys.argv[4]).read_text())
    cases = open_cache(cache)

    def on_step(epoch, step, loss):
        if epoch == 2 and step == 1:  # a step of epoch 2 is taken, not yet checkpointed
            marker.write_text("ready")
            time.sleep(600)  # SIGKILLed here

    train(select(cases, config.train_cases), select(cases, config.val_cases), run, config,
          on_step=on_step)
""")


@pytest.mark.slow
def test_training_sigkilled_resumes_from_last_checkpoint_via_cli(
    uninterrupted_run, tmp_path: Path
) -> None:
    root, _, config, rows_a = uninterrupted_run
    run, marker = tmp_path / "run", tmp_path / "killed-here"
    (tmp_path / "config.json").write_text(config.to_json())
    proc = subprocess.Popen([sys.executable, "-c", _TRAINER, str(root / "cache"), str(run),
                             str(marker), str(tmp_path / "config.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    with open(run / "log.csv", newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1]  # the last complete epoch
    assert not [p for p in run.iterdir() if ".tmp" in p.name]  # killed outside any write

    result = subprocess.run(
        [sys.executable, "-m", "tiramisu_brats", "train", str(root / "cache"), "-o", str(run),
         "--resume", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with open(run / "log.csv", newline="") as f:
        assert _losses(list(csv.DictReader(f))) == _losses(rows_a)


@pytest.mark.slow
def test_a_finished_run_lengthened_via_cli_gives_the_longer_run(
    uninterrupted_run, tmp_path: Path
) -> None:
    """A 2-epoch run resumed with --epochs 3 is run A (3 epochs from the start), loss for loss;
    a changed recipe option is refused and the run left as it was."""
    import dataclasses

    from tiramisu_brats.data import select
    from tiramisu_brats.train import train

    root, cases, config, rows_a = uninterrupted_run
    run = tmp_path / "run"
    train(select(cases, config.train_cases), select(cases, config.val_cases), run,
          dataclasses.replace(config, epochs=2))
    before = (run / "checkpoint.safetensors").read_bytes()
    result = cli("train", root / "cache", "-o", run, "--resume", "--epochs", 3, "--lr", 0.5,
                 "--no-progress")
    assert_error_line(result, rf"{re.escape(str(run))}: a resumed run keeps its recipe; it "
                              r"differs in lr \(0.5, stored 0.001\)")
    assert (run / "checkpoint.safetensors").read_bytes() == before
    result = cli("train", root / "cache", "-o", run, "--resume", "--epochs", 3, "--no-progress")
    assert result.exit_code == 0, result.output
    with open(run / "log.csv", newline="") as f:
        assert _losses(list(csv.DictReader(f))) == _losses(rows_a)
    assert json.loads((run / "train_config.json").read_text())["epochs"] == 3


# ---------------------------------------------------------------------- untrusted files


def _weights_with_config(path: Path, config, fmt: str = "tiramisu-brats/1") -> Path:
    from safetensors.torch import save_file

    from tiramisu_brats.model import Tiramisu, TiramisuConfig

    state = Tiramisu(TiramisuConfig(**TINY)).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              metadata={"format": fmt, "config": json.dumps(config)})
    return path


def _tiny_config_dict() -> dict:
    from tiramisu_brats.model import TiramisuConfig

    return json.loads(TiramisuConfig(**TINY).to_json())


class _Payload:
    """Unpickling this creates the file ``marker``: proof that a pickle was (not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


UNTRUSTED_MODELS = {
    "unknown config key": (
        lambda p, m: _weights_with_config(p, {**_tiny_config_dict(), "exec": "rm -rf /"}),
        r"invalid model config: unknown keys \['exec'\]"),
    "growth rate out of range": (
        lambda p, m: _weights_with_config(p, {**_tiny_config_dict(), "growth_rate": 10**9}),
        r"invalid model config: growth_rate=1000000000 must be an integer in 1\.\.1024"),
    "negative block size": (
        lambda p, m: _weights_with_config(p, {**_tiny_config_dict(), "down_blocks": [2, -1]}),
        r"invalid model config: block size -1 must be an integer in 1\.\.128"),
    "dropout out of range": (
        lambda p, m: _weights_with_config(p, {**_tiny_config_dict(), "dropout": 5}),
        r"invalid model config: dropout=5 must be in \[0, 1\)"),
    "config not an object": (
        lambda p, m: _weights_with_config(p, [1, 2]),
        r"invalid model config: expected a JSON object"),
    "other format": (
        lambda p, m: _weights_with_config(p, _tiny_config_dict(), fmt="other/1"),
        r"not a tiramisu-brats weights file \(format 'other/1'\)"),
    "weights not matching config": (
        lambda p, m: _weights_with_config(p, {**_tiny_config_dict(), "growth_rate": 5}),
        r".* has shape \(\d+,\), expected \(\d+,\)"),
    "pickle with a payload": (
        lambda p, m: p.write_bytes(pickle.dumps({"state_dict": _Payload(m)})),
        r"not a tiramisu-brats weights file \(.*\)"),
    "torch.save file with a payload": (
        lambda p, m: __import__("torch").save({"x": _Payload(m)}, p),
        r"not a tiramisu-brats weights file \(.*\)"),
}


@pytest.mark.parametrize("problem", list(UNTRUSTED_MODELS))
def test_untrusted_model_file_refused_exit_2(tmp_path: Path, problem: str) -> None:
    folder = small_case(tmp_path / "in")
    model, marker = tmp_path / "model.safetensors", tmp_path / "PWNED"
    make, message = UNTRUSTED_MODELS[problem]
    make(model, marker)
    out = tmp_path / "seg.nii.gz"
    result = segment(model, folder, "-o", out)
    assert_error_line(result, rf"{re.escape(str(model))}: {message}")
    assert not out.exists()
    assert not marker.exists()  # nothing was unpickled


@pytest.mark.parametrize("change", [{"exec": "rm -rf /"}, {"lr": -5.0}, {"tumor_share": 7.0}])
def test_untrusted_train_config_refused_exit_2(tmp_path: Path, change: dict) -> None:
    from tiramisu_brats.model import TiramisuConfig
    from tiramisu_brats.train import TrainConfig

    run = tmp_path / "run"
    run.mkdir()
    config = json.loads(TrainConfig(model=TiramisuConfig(**TINY), patch=(32, 32)).to_json())
    (run / "train_config.json").write_text(json.dumps({**config, **change}))
    result = cli("train", tmp_path / "cache", "-o", run, "--resume", "--no-progress")
    assert_error_line(result, rf"{re.escape(str(run / 'train_config.json'))}: .*")


def test_nothing_is_unpickled_anywhere_in_the_source() -> None:
    """No pickle (or pickle-based) import, no torch.load without weights_only=True, no np.load
    with allow_pickle, no torch.jit.load, in the package and the benchmarks."""
    sources = sorted((REPO / "src").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))
    assert len(sources) > 5
    pickling = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve",
                "marshal")
    problems = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                    node.module or ""]
                problems += [f"{path}: import {n}" for n in names if n.split(".")[0] in pickling]
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            kwargs = {k.arg: k.value for k in node.keywords}

            def is_const(name: str, value: bool, kwargs=kwargs) -> bool:
                return isinstance(kwargs.get(name), ast.Constant) and kwargs[name].value is value

            if func.endswith("torch.load") and not is_const("weights_only", True):
                problems.append(f"{path}:{node.lineno}: {func} without weights_only=True")
            if func.endswith(("np.load", "numpy.load")) and "allow_pickle" in kwargs and not (
                    is_const("allow_pickle", False)):
                problems.append(f"{path}:{node.lineno}: {func} with allow_pickle")
            if func.endswith("jit.load") or func.split(".")[0] in pickling:
                problems.append(f"{path}:{node.lineno}: {func}")
    assert problems == []


@pytest.mark.parametrize("case_id", ["../escape", "..", "/etc/cron.d/x", "a/../../b",
                                     "..\\..\\evil", "C:\\evil", "C:evil", "", "nul\0byte"])
def test_safe_case_id_refuses_paths(case_id: str) -> None:
    with pytest.raises(io.InputError, match="case id is not usable as a file name"):
        io.safe_case_id(case_id)


@pytest.mark.parametrize("crafted", ["folder", "files"])
def test_crafted_case_id_cannot_escape_the_output_folder(
    tmp_path: Path, tiny_model: Path, crafted: str
) -> None:
    """A case id comes from the file names (or the folder name when they have no prefix):
    a crafted one naming a path is refused as a failed case; nothing is written outside."""
    cohort, out = tmp_path / "in" / "cohort", tmp_path / "in" / "out"
    evil_id = "x\\..\\..\\evil"  # names starting with "." are hidden, never read
    folder = cohort / (evil_id if crafted == "folder" else "innocent")
    folder.mkdir(parents=True)
    src = small_case(tmp_path / "src")
    prefix = "" if crafted == "folder" else evil_id
    for name in (*MODALITIES, "seg"):
        image_path(src, name).rename(folder / f"{prefix}_{name}.nii.gz")
    before = sorted(str(p) for p in tmp_path.rglob("*") if "out" not in p.parts)
    result = segment(tiny_model, cohort, "-o", out)
    assert result.exit_code == 1, result.output
    with open(out / "failures.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["case", "reason"],
                    [folder.name, f"{evil_id!r}: case id is not usable as a file name"]]
    assert sorted(p.name for p in out.iterdir()) == ["failures.csv", "index.html"]
    assert "case id is not usable as a file name" in (out / "index.html").read_text()
    assert sorted(str(p) for p in tmp_path.rglob("*") if "out" not in p.parts) == before


# ------------------------------------------------------------------------------ fuzzing

_SMALL = (6, 5, 4)
_HEADER_FIELDS = [0, 40, 42, 44, 46, 48, 70, 72, 76, 80, 84, 88, 108, 112, 116, 123, 252, 254,
                  256, 268, 280, 296, 312, 344]  # sizeof_hdr, dim, datatype, pixdim, vox_offset..
_SHORTS = [b"\x00\x00", b"\xff\xff", b"\x00\x80", b"\xff\x7f", b"\x01\x00", b"\x10\x00",
           b"\x80\x00", b"\x00\x01", b"\x00\x04", b"\x00\x08"]


def _nifti_bytes(data: np.ndarray) -> bytes:
    return nib.Nifti1Image(data, np.eye(4)).to_bytes()


_VALID = {
    "image": _nifti_bytes(np.random.default_rng(0).integers(1, 100, _SMALL).astype(np.int16)),
    "labels": _nifti_bytes(np.random.default_rng(1).choice([0, 1, 2, 4], _SMALL)
                           .astype(np.uint8)),
    "nothing": b"",
}
_edits = st.lists(
    st.one_of(
        st.tuples(st.integers(0, 400), st.binary(min_size=1, max_size=8)),
        st.tuples(st.sampled_from(_HEADER_FIELDS), st.binary(min_size=2, max_size=4)),
        st.tuples(st.sampled_from([42, 44, 46, 48, 70, 72]), st.sampled_from(_SHORTS)),
    ),
    max_size=6,
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(base=st.sampled_from(list(_VALID)), edits=_edits, cut=st.none() | st.integers(0, 500),
       tail=st.binary(max_size=64), gz=st.booleans(), slot=st.integers(0, 3))
def test_reader_on_random_bytes_raises_only_input_error(
    tmp_path: Path, base: str, edits: list, cut: int | None, tail: bytes, gz: bool, slot: int
) -> None:
    """Random bytes, and valid files with random bytes written over header fields, truncated
    or extended, as .nii or .nii.gz: the readers succeed or raise io.InputError, nothing else."""
    data = bytearray(_VALID[base] + tail)
    for pos, chunk in edits:
        data[pos : pos + len(chunk)] = chunk
    data = bytes(data if cut is None else data[:cut])
    folder = tmp_path / f"fuzz{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    paths = []
    for i, m in enumerate(MODALITIES):
        path = folder / f"F_{m}.nii{'.gz' if i == slot and gz else ''}"
        blob = data if i == slot else _VALID["image"]
        path.write_bytes(gzip.compress(blob) if i == slot and gz else blob)
        paths.append(path)
    logging.disable(logging.CRITICAL)  # nibabel logs every header it repairs
    try:
        for read in (lambda: io.read_case(io.CaseFiles("F", tuple(paths))),
                     lambda: io.read_label_map(paths[slot])):
            try:
                read()
            except io.InputError as err:  # one line, naming one of the files
                assert "\n" not in str(err) and str(err).split(": ")[0] in map(str, paths)
    finally:
        logging.disable(logging.NOTSET)
