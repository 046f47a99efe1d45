"""Tests for tiramisu_brats.io (synthetic NIfTI files; real BraTS cases where available)."""

from __future__ import annotations

import gzip
import logging
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tiramisu_brats import io
from tiramisu_brats.io import InputError

SHAPE = (24, 20, 16)
_C, _S = np.cos(0.2), np.sin(0.2)
AFFINE = np.array(
    [[_C, -_S, 0.0, -12.5], [_S, _C, 0.0, 30.0], [0.0, 0.0, 1.0, -7.0], [0.0, 0.0, 0.0, 1.0]]
)
NAMES = {
    "brats": ("{}_t1", "{}_t1ce", "{}_t2", "{}_flair", "{}_seg"),
    "brats2023": ("{}-t1n", "{}-t1c", "{}-t2w", "{}-t2f", "{}-seg"),
    "nnunet": ("{}_0000", "{}_0001", "{}_0002", "{}_0003", "{}"),
}


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=4)
    nib.save(img, path)
    return path


def volume(seed: int, dtype=np.int16) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 1000, SHAPE).astype(dtype)


def make_case(
    folder: Path, layout: str = "brats", case_id: str = "Case_001", ext: str = ".nii.gz", seg=True
) -> list[Path]:
    """Write a synthetic case; image i holds values 1000*i + (1..999) so the order is checkable."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [n.format(case_id) + ext for n in NAMES[layout]]
    paths = [save(folder / name, volume(i) + 1000 * i) for i, name in enumerate(names[:4])]
    if seg:
        labels = np.random.default_rng(9).choice([0, 1, 2, 4], SHAPE).astype(np.uint8)
        paths.append(save(folder / names[4], labels))
    return paths


# ---------------------------------------------------------------------------------- finding


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize(
    ("layout", "case_id"),
    [("brats", "BraTS2021_00006"), ("brats2023", "BraTS-GLI-00001-000"), ("nnunet", "case_7")],
)
def test_find_case_files_layouts(tmp_path: Path, layout: str, case_id: str, ext: str) -> None:
    paths = make_case(tmp_path, layout, case_id, ext)
    (tmp_path / "notes.txt").write_text("not an image")
    files = io.find_case_files(tmp_path)
    assert files.case_id == case_id
    assert files.images == tuple(paths[:4])
    assert files.seg == paths[4]


@pytest.mark.parametrize("layout", list(NAMES))
def test_find_case_files_without_seg(tmp_path: Path, layout: str) -> None:
    make_case(tmp_path, layout, seg=False)
    assert io.find_case_files(tmp_path).seg is None


def test_nnunet_seg_named_case_seg(tmp_path: Path) -> None:
    make_case(tmp_path, "nnunet", "c1", seg=False)
    save(tmp_path / "c1_seg.nii.gz", np.zeros(SHAPE, np.uint8))
    assert io.find_case_files(tmp_path).seg == tmp_path / "c1_seg.nii.gz"


def test_t1_is_not_taken_from_t1ce(tmp_path: Path) -> None:
    paths = make_case(tmp_path, "brats", "P_t1")  # case id itself ends in _t1
    files = io.find_case_files(tmp_path)
    assert files.case_id == "P_t1"
    assert files.images[:2] == tuple(paths[:2])
    paths[0].unlink()
    with pytest.raises(InputError, match=r"no t1 image .*_t1\.nii\.gz"):
        io.find_case_files(tmp_path)


def test_missing_modality(tmp_path: Path) -> None:
    paths = make_case(tmp_path, "brats2023", "X")
    paths[3].unlink()
    with pytest.raises(InputError, match=rf"{tmp_path}: no flair image .*-t2f"):
        io.find_case_files(tmp_path)


def test_duplicate_modality(tmp_path: Path) -> None:
    make_case(tmp_path, "brats", "X")
    save(tmp_path / "X_t2.nii", volume(5))
    with pytest.raises(InputError, match=r"several t2 images: X_t2\.nii, X_t2\.nii\.gz"):
        io.find_case_files(tmp_path)


def test_no_nifti_files(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no NIfTI files"):
        io.find_case_files(tmp_path)
    save(tmp_path / "brain.nii.gz", volume(0))
    with pytest.raises(InputError, match="no file named like"):
        io.find_case_files(tmp_path)


def test_mixed_case_ids(tmp_path: Path) -> None:
    paths = make_case(tmp_path, "brats", "A", seg=False)
    paths[2].rename(tmp_path / "B_t2.nii.gz")
    with pytest.raises(InputError, match="different cases"):
        io.find_case_files(tmp_path)


def test_case_files_from_paths(tmp_path: Path) -> None:
    paths = make_case(tmp_path, "brats", "BraTS2021_00006", seg=False)
    files = io.case_files_from_paths(*paths)
    assert files == io.CaseFiles("BraTS2021_00006", tuple(paths), None)
    assert io.case_files_from_paths(*paths, case_id="mine").case_id == "mine"
    paths23 = make_case(tmp_path / "b", "brats2023", "BraTS-GLI-00001-000", ext=".nii", seg=False)
    assert io.case_files_from_paths(*paths23).case_id == "BraTS-GLI-00001-000"
    with pytest.raises(InputError, match="no such file"):
        io.case_files_from_paths(tmp_path / "nope.nii.gz", *paths[1:])
    link = tmp_path / "link_t2.nii.gz"
    link.symlink_to(paths[0])  # the same file under another name is still the same file
    with pytest.raises(InputError, match=rf"^{link}: the same file as the t1 image, given as "
                       "the t2 image"):
        io.case_files_from_paths(paths[0], paths[1], link, paths[3])


def test_a_broken_link_is_named_as_such(tmp_path: Path) -> None:
    paths = make_case(tmp_path, seg=False)
    paths[2].unlink()
    paths[2].symlink_to(tmp_path / "gone.nii.gz")
    with pytest.raises(InputError, match=rf"^{paths[2]}: a broken link \(to "
                       rf"{tmp_path / 'gone.nii.gz'}, which does not exist\)"):
        io.find_case_files(tmp_path)


def test_find_cases(tmp_path: Path) -> None:
    make_case(tmp_path / "b_case", "brats2023", "B")
    make_case(tmp_path / "a_case", "brats", "A")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert io.find_cases(tmp_path) == [tmp_path / "a_case", tmp_path / "b_case"]
    assert io.find_cases(tmp_path / "a_case") == [tmp_path / "a_case"]
    assert io.is_case_folder(tmp_path / "a_case")
    assert not io.is_case_folder(tmp_path)
    assert not io.is_case_folder(tmp_path / "file.txt")
    with pytest.raises(InputError, match="case folder"):
        io.find_cases(tmp_path / "empty")
    with pytest.raises(InputError, match="not a folder"):
        io.find_cases(tmp_path / "missing")


@pytest.mark.parametrize("case_id", ["BraTS2021_00006", "BraTS-GLI-00001-000", "a..b"])
def test_safe_case_id_accepts(case_id: str) -> None:
    assert io.safe_case_id(case_id) == case_id


@pytest.mark.parametrize("case_id", ["", ".", "..", "../x", "/abs", "a/b", "a\\b", "C:x"])
def test_safe_case_id_rejects(case_id: str) -> None:
    with pytest.raises(InputError):
        io.safe_case_id(case_id)


# ---------------------------------------------------------------------------------- reading


def test_read_case(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_case(tmp_path, "brats", "C1")
    with caplog.at_level(logging.WARNING):
        case = io.read_case(io.find_case_files(tmp_path))
    assert not caplog.records
    assert case.case_id == "C1"
    assert case.image.shape == (4, *SHAPE)
    assert case.image.dtype == np.float32
    assert case.shape == SHAPE
    for i in range(4):
        np.testing.assert_array_equal(case.image[i], volume(i) + 1000 * i)
    assert case.affine.dtype == np.float64
    np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)
    assert case.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert isinstance(case.header, nib.Nifti1Header)


def test_read_ahead_reads_the_next_case_in_the_background(tmp_path) -> None:
    import threading

    cases = []
    for i in range(4):
        make_case(tmp_path / f"C{i}", "brats", f"C{i}")
        cases.append(io.find_case_files(tmp_path / f"C{i}"))
    (tmp_path / "C2" / "C2_t2.nii.gz").write_bytes(b"not gzip")  # C2 fails to read
    calls = []
    real_read = io.read_case

    def recording(files):
        calls.append((files.case_id, threading.current_thread().name))
        return real_read(files)

    with io.ReadAhead(cases, read=recording) as reader:
        first = reader.read(cases[0])
        np.testing.assert_array_equal(first.image, real_read(cases[0]).image)
        assert first.case_id == "C0"
        reader._pending[1].result()  # C1 is read while C0 is worked on
        # C1 is never asked for (its output existed, say): dropped; C2's error comes when asked.
        with pytest.raises(InputError, match="C2_t2"):
            reader.read(cases[2])
        assert reader.read(cases[3]).case_id == "C3"
        assert reader.read(cases[0]).case_id == "C0"  # again: read in the caller's thread
    assert not reader._pending
    # C2 was asked for before its turn to be read ahead: read in the caller's thread.
    here = threading.current_thread().name
    assert sorted((c, t.startswith("read-ahead")) for c, t in calls) == [
        ("C0", False), ("C0", True), ("C1", True), ("C2", False), ("C3", True)]
    assert all(t == here for c, t in calls if not t.startswith("read-ahead"))


@pytest.mark.parametrize("kind", ["scaled", "multi-member gzip", "nifti2"])
def test_gzip_read_matches_nibabel(tmp_path: Path, kind: str) -> None:
    """The one-call gzip path reads what nibabel's streaming reader reads."""
    paths = make_case(tmp_path, seg=False)
    data = volume(7)
    if kind == "nifti2":
        nib.save(nib.Nifti2Image(data, AFFINE), paths[2])
    else:
        img = nib.Nifti1Image(data, AFFINE)
        img.header.set_slope_inter(0.5, -3.0)
        nib.save(img, paths[2])
    if kind == "multi-member gzip":  # as written by e.g. pigz, or files concatenated
        raw = gzip.decompress(paths[2].read_bytes())
        paths[2].write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    expected = np.asanyarray(nib.load(paths[2]).dataobj).astype(np.float32)
    image = io.read_case(io.find_case_files(tmp_path)).image
    np.testing.assert_array_equal(image[2], expected)
    if kind != "nifti2":
        np.testing.assert_allclose(image[2], data * 0.5 - 3.0)


def test_gzip_read_in_odd_sized_chunks_and_big_endian(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Voxels split across decompressed chunks (7 input bytes at a time) and stored big-endian
    arrive whole and in order."""
    paths = make_case(tmp_path, seg=False)
    data = volume(3)
    nib.save(nib.Nifti1Image(data.astype(">i2"), AFFINE), paths[1])
    gunzip = io._gunzip
    monkeypatch.setattr(io, "_gunzip", lambda data, limit: gunzip(data, limit, piece=7))
    case = io.read_case(io.find_case_files(tmp_path), keep_dtype=True)
    assert case.image.dtype == np.int16
    np.testing.assert_array_equal(case.image[1], data)
    np.testing.assert_array_equal(case.image[3], volume(3) + 3000)


def test_gunzip_stops_at_the_limit_and_keeps_the_gzip_message(tmp_path: Path) -> None:
    raw = np.random.default_rng(0).bytes(5000)
    packed = gzip.compress(raw[:1234]) + gzip.compress(raw[1234:])
    for piece in (1, 7, 1 << 18):
        assert b"".join(io._gunzip(packed, 3000, piece=piece)) == raw[:3000]
        assert b"".join(io._gunzip(packed, 10**6, piece=piece)) == raw
    with pytest.raises(EOFError, match="Compressed file ended before"):
        b"".join(io._gunzip(packed[: len(packed) // 4], 5000))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_read_case_keep_dtype(tmp_path: Path, ext: str) -> None:
    """``keep_dtype``: the files' shared integer type, same values as float32; float32 where
    the files do not share one unscaled integer type."""
    paths = make_case(tmp_path, ext=ext, seg=False)
    files = io.find_case_files(tmp_path)
    as_float, kept = io.read_case(files), io.read_case(files, keep_dtype=True)
    assert as_float.image.dtype == np.float32 and kept.image.dtype == np.int16
    np.testing.assert_array_equal(kept.image, as_float.image)
    assert kept.image.shape == (4, *SHAPE)
    save(paths[2], volume(2, np.int32))
    assert io.read_case(files, keep_dtype=True).image.dtype == np.float32
    img = nib.Nifti1Image(volume(2), AFFINE)
    img.header.set_slope_inter(2.0, 0.0)
    nib.save(img, paths[2])
    mixed = io.read_case(files, keep_dtype=True)
    assert mixed.image.dtype == np.float32
    np.testing.assert_array_equal(mixed.image[2], volume(2) * 2.0)


def test_read_case_gives_the_spacing_without_a_word(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Resampling to 1 mm (or the warning that it is off) is the segmenter's, not reading's.
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    paths = [save(tmp_path / f"c_{m}.nii", volume(i), affine) for i, m in enumerate(io.MODALITIES)]
    with caplog.at_level(logging.WARNING):
        case = io.read_case(io.case_files_from_paths(*paths))
    assert case.spacing == (2.0, 2.0, 3.0)
    assert caplog.text == ""


def test_a_modality_in_two_namings_is_an_error_naming_both(tmp_path: Path) -> None:
    for i, m in enumerate(("t1", "t1ce", "t2", "flair")):
        save(tmp_path / f"case_{m}.nii", volume(i), np.eye(4))
    save(tmp_path / "case-t1n.nii", volume(0), np.eye(4))
    with pytest.raises(io.InputError, match=r"several t1 images: case_t1\.nii, case-t1n\.nii"):
        io.find_case_files(tmp_path)


@pytest.mark.parametrize("extra", [(1,), (1, 1)])
def test_trailing_singleton_axes_accepted_and_kept_in_the_output(tmp_path: Path,
                                                                 extra: tuple) -> None:
    paths = make_case(tmp_path, seg=False)
    save(paths[0], volume(0).reshape(*SHAPE, *extra))
    save(paths[1], (volume(1) + 1000).reshape(*SHAPE, *extra))
    case = io.read_case(io.find_case_files(tmp_path))
    np.testing.assert_array_equal(case.image[1], volume(1) + 1000)
    labels = np.zeros(SHAPE, np.uint8)
    out = io.write_label_map(tmp_path / "out.nii.gz", labels, case.header, case.affine)
    assert nib.load(out).shape == (*SHAPE, *extra)  # the input's shape, as promised


def test_spacing_is_the_affine_s_when_the_zooms_disagree(tmp_path: Path) -> None:
    # nibabel (and so resampling) takes the grid from the sform; the zooms said 1 mm.
    sform = np.diag([1.5, 1.5, 3.0, 1.0])
    paths = []
    for i, m in enumerate(io.MODALITIES):
        img = nib.Nifti1Image(volume(i), sform)
        img.header.set_qform(np.eye(4), code=1)  # the zooms too
        img.header.set_sform(sform, code=1)
        nib.save(img, tmp_path / f"c_{m}.nii.gz")
        paths.append(tmp_path / f"c_{m}.nii.gz")
    case = io.read_case(io.case_files_from_paths(*paths))
    assert case.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    assert case.spacing == (1.5, 1.5, 3.0)


def test_a_header_without_orientation_is_read_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = []
    for i, m in enumerate(io.MODALITIES):
        nib.save(nib.Nifti1Image(volume(i), None), tmp_path / f"c_{m}.nii.gz")
        paths.append(tmp_path / f"c_{m}.nii.gz")
    with caplog.at_level(logging.WARNING):
        io.read_case(io.case_files_from_paths(*paths))
    assert (f"{paths[0]}: the header records no orientation (qform and sform codes 0): taken "
            "as LAS, which may be wrong") in caplog.text


def test_nan_and_inf_become_zero(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = make_case(tmp_path, seg=False)
    data = volume(2, np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    save(paths[2], data)
    with caplog.at_level(logging.WARNING):
        case = io.read_case(io.find_case_files(tmp_path))
    assert np.isfinite(case.image).all()
    assert (case.image[2, 0, 0, :3] == 0).all()
    assert "3 NaN/Inf voxels" in caplog.text


def _replace_t2(tmp_path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    paths = make_case(tmp_path, seg=False)
    return save(paths[2], data, affine)


@pytest.mark.parametrize(
    ("data", "affine", "message"),
    [
        (np.ones((24, 20, 15), np.int16), AFFINE, r"shape \(24, 20, 15\) differs from t1's"),
        (np.ones(SHAPE, np.int16), AFFINE + np.eye(4) * 0.01, "affine differs from t1's"),
        (np.ones((24, 20), np.int16), AFFINE, "2D image"),
        (np.ones((*SHAPE, 2), np.int16), AFFINE, "4D image with 2 volumes"),
        (np.zeros(SHAPE, np.int16), AFFINE, "all voxels are zero"),
        (np.full(SHAPE, np.nan, np.float32), AFFINE, "all voxels are zero"),
        (np.ones(SHAPE, np.complex64), AFFINE, "unsupported voxel type"),
    ],
)
def test_read_case_errors(tmp_path: Path, data: np.ndarray, affine, message: str) -> None:
    t2 = _replace_t2(tmp_path, data, affine)
    with pytest.raises(InputError, match=message) as info:
        io.read_case(io.find_case_files(tmp_path))
    assert str(info.value).startswith(f"{t2}: ")
    assert "\n" not in str(info.value)


def test_affine_within_tolerance_accepted(tmp_path: Path) -> None:
    t2 = _replace_t2(tmp_path, volume(2), AFFINE + 1e-5)
    case = io.read_case(io.find_case_files(tmp_path))
    assert case.shape == SHAPE
    np.testing.assert_array_equal(case.image[2], volume(2))  # the T2 read, not refused
    np.testing.assert_array_equal(case.image[3], volume(3) + 3000)
    t1 = nib.load(case.files.images[0]).affine
    assert not np.array_equal(nib.load(t2).affine, t1)
    np.testing.assert_array_equal(case.affine, t1)  # the grid is the T1's
    np.testing.assert_allclose(case.affine, AFFINE, atol=1e-6)


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    paths = make_case(tmp_path, ext=ext, seg=False)
    raw = paths[3].read_bytes()
    paths[3].write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match=rf"^{paths[3]}: cannot read the voxel data"):
        io.read_case(io.find_case_files(tmp_path))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_random_bytes(tmp_path: Path, ext: str) -> None:
    paths = make_case(tmp_path, ext=ext, seg=False)
    paths[0].write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(InputError, match=rf"^{paths[0]}: not a readable NIfTI file"):
        io.read_case(io.find_case_files(tmp_path))


def test_not_gzip_despite_name(tmp_path: Path) -> None:
    paths = make_case(tmp_path, seg=False)
    paths[1].write_bytes(gzip.decompress(paths[1].read_bytes())[:300])
    with pytest.raises(InputError, match=rf"^{paths[1]}: "):
        io.read_case(io.find_case_files(tmp_path))


@pytest.mark.parametrize("shape", [(30000, 30000, 30000), (2000, 10, 10), (1000, 1000, 1000)])
def test_absurd_header_size_refused_before_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int]
) -> None:
    paths = make_case(tmp_path, ext=".nii", seg=False)
    header = nib.load(paths[2]).header.copy()
    header.set_data_shape(shape)
    paths[2].write_bytes(header.binaryblock + bytes(4) + bytes(100))  # header + few data bytes

    def no_allocation(*args, **kwargs):
        raise AssertionError("voxel data must not be read or allocated")

    monkeypatch.setattr(io.np, "empty", no_allocation)
    with pytest.raises(InputError, match="^" + re.escape(
            f"{paths[2]}: image of shape {shape} is larger than this tool reads (at most 1024 "
            "voxels per axis and 268,435,456 in all)")):
        io.read_case(io.find_case_files(tmp_path))


def test_missing_file(tmp_path: Path) -> None:
    paths = make_case(tmp_path, seg=False)
    files = io.find_case_files(tmp_path)
    paths[0].unlink()
    with pytest.raises(InputError, match="no such file"):
        io.read_case(files)


# ---------------------------------------------------------------------------------- labels


def _labels(values, seed: int = 0) -> np.ndarray:
    labels = np.random.default_rng(seed).choice(values, SHAPE).astype(np.uint8)
    labels.flat[: len(values)] = values  # every value present
    return labels


def test_read_label_map_brats(tmp_path: Path) -> None:
    labels = _labels([0, 1, 2, 4])
    path = save(tmp_path / "seg.nii.gz", labels)
    read, affine, header = io.read_label_map(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, labels)
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    assert header.get_data_shape() == SHAPE


def test_read_label_map_brats2023_float(tmp_path: Path) -> None:
    disk = _labels([0, 1, 2, 3])
    path = save(tmp_path / "x-seg.nii.gz", disk.astype(np.float32))
    read, _, _ = io.read_label_map(path)
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, np.where(disk == 3, 4, disk))


def test_read_label_map_without_tumor(tmp_path: Path) -> None:
    path = save(tmp_path / "seg.nii", np.zeros(SHAPE, np.int16))
    assert not io.read_label_map(path)[0].any()


@pytest.mark.parametrize(
    ("values", "dtype", "shown"),
    [
        ([0, 1, 3, 4], np.uint8, "mix 3"),
        ([0, 1, 5], np.uint8, "[5]"),
        ([0, -1, 2], np.int16, "[-1]"),
        ([0, 1.5, 2], np.float32, "[1.5]"),
        ([0, np.nan], np.float32, "[nan]"),
        ([0, 256], np.int16, "[256]"),
    ],
)
def test_read_label_map_invalid(tmp_path: Path, values, dtype, shown: str) -> None:
    data = np.zeros(SHAPE, dtype)
    data.flat[: len(values)] = values
    path = save(tmp_path / "seg.nii.gz", data)
    with pytest.raises(InputError, match=rf"^{path}: .*{shown}".replace("[", r"\[")):
        io.read_label_map(path)


def test_conventions() -> None:
    internal = np.array([0, 1, 2, 4, 4], np.uint8)
    out = io.to_convention(internal, "brats2023")
    np.testing.assert_array_equal(out, [0, 1, 2, 3, 3])
    np.testing.assert_array_equal(io.from_convention(out, "brats2023"), internal)
    same = io.to_convention(internal, "brats")
    assert same is not internal and same.dtype == np.uint8
    np.testing.assert_array_equal(same, internal)
    with pytest.raises(ValueError, match="unknown label convention"):
        io.to_convention(internal, "nnunet")
    with pytest.raises(ValueError, match=r"\[3\]"):
        io.to_convention(np.array([0, 3]), "brats")
    with pytest.raises(ValueError, match=r"\[4\]"):
        io.from_convention(np.array([0, 4]), "brats2023")


@given(
    hnp.arrays(np.uint8, hnp.array_shapes(max_dims=3), elements=st.sampled_from([0, 1, 2, 4])),
    st.sampled_from(io.LABEL_CONVENTIONS),
)
def test_convention_round_trip(labels: np.ndarray, convention: str) -> None:
    disk = io.to_convention(labels, convention)
    np.testing.assert_array_equal(io.from_convention(disk, convention), labels)


# ---------------------------------------------------------------------------------- writing


@pytest.mark.parametrize(("convention", "et_on_disk"), [("brats", 4), ("brats2023", 3)])
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_write_label_map_round_trip(
    tmp_path: Path, convention: str, et_on_disk: int, ext: str
) -> None:
    paths = make_case(tmp_path / "in", seg=False)
    case = io.read_case(io.find_case_files(tmp_path / "in"))
    labels = _labels([0, 1, 2, 4])
    out = tmp_path / f"C1{ext}"
    assert io.write_label_map(out, labels, case.header, case.affine, convention=convention) == out

    img = nib.load(out)
    ref = nib.load(paths[0]).header
    assert img.shape == SHAPE
    assert img.get_data_dtype() == np.uint8
    disk = np.asanyarray(img.dataobj)
    assert disk.dtype == np.uint8  # stored raw, no scaling
    np.testing.assert_array_equal(disk, np.where(labels == 4, et_on_disk, labels))
    np.testing.assert_array_equal(img.affine, case.affine)
    for get in ("get_qform", "get_sform"):
        (a, code), (b, ref_code) = getattr(img.header, get)(True), getattr(ref, get)(True)
        np.testing.assert_array_equal(a, b)
        assert code == ref_code
    assert (int(img.header["qform_code"]), int(img.header["sform_code"])) == (1, 4)
    np.testing.assert_array_equal(io.read_label_map(out)[0], labels)
    assert sorted(os.listdir(tmp_path)) == sorted(["in", out.name])  # no temp file left


def test_write_label_map_checks(tmp_path: Path) -> None:
    make_case(tmp_path / "in", seg=False)
    case = io.read_case(io.find_case_files(tmp_path / "in"))
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(ValueError, match="shape"):
        io.write_label_map(out, np.zeros((24, 20, 15), np.uint8), case.header, case.affine)
    with pytest.raises(ValueError, match="affine"):
        io.write_label_map(out, np.zeros(SHAPE, np.uint8), case.header, np.eye(4))
    with pytest.raises(ValueError, match=r"\[3\]"):
        io.write_label_map(out, np.full(SHAPE, 3, np.uint8), case.header, case.affine)
    with pytest.raises(InputError, match=r"\.nii"):
        io.write_label_map(
            tmp_path / "seg.png", np.zeros(SHAPE, np.uint8), case.header, case.affine
        )
    assert not out.exists()

    io.write_label_map(out, np.zeros(SHAPE, np.uint8), case.header, case.affine)
    with pytest.raises(FileExistsError, match="overwriting was not asked for"):
        io.write_label_map(out, np.ones(SHAPE, np.uint8), case.header, case.affine)
    assert not io.read_label_map(out)[0].any()
    io.write_label_map(out, np.ones(SHAPE, np.uint8), case.header, case.affine, overwrite=True)
    assert io.read_label_map(out)[0].all()


def test_atomic_write_temp_name_and_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"old")
    seen: list[Path] = []

    def failing_write(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        io.atomic_write(target, failing_write, overwrite=True)
    (tmp,) = seen
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".out.nii.gz") and tmp.name.endswith(".nii.gz")
    assert os.listdir(tmp_path) == ["out.nii.gz"]
    assert target.read_bytes() == b"old"


def test_atomic_write_gives_files_the_umask_s_permissions_whoever_writes_them(
        tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    umask = os.umask(0o027)
    try:
        path = io.atomic_write(tmp_path / "w.safetensors",  # safetensors makes its files 0600
                               lambda tmp: save_file({"a": np.zeros(3)}, str(tmp)))
        text = io.atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(text.stat().st_mode & 0o777) == oct(0o640)


def test_atomic_write_text_and_bytes(tmp_path: Path) -> None:
    path = io.atomic_write_text(tmp_path / "a.json", '{"ü": 1}\n')
    assert path.read_text(encoding="utf-8") == '{"ü": 1}\n'
    io.atomic_write_text(path, "second")  # overwrite=True by default
    assert path.read_text() == "second"
    io.atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    with pytest.raises(FileExistsError, match="overwriting was not asked for"):
        io.atomic_write_bytes(tmp_path / "b.bin", b"x", overwrite=False)
    assert sorted(os.listdir(tmp_path)) == ["a.json", "b.bin"]
    mode = (tmp_path / "b.bin").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the 0600 of a mkstemp file


def test_atomic_write_companions_appear_together_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "m.int8.xml"

    def write_both(tmp: Path) -> None:
        assert tmp.name.endswith(".xml")
        tmp.write_text("graph")
        tmp.with_suffix(".bin").write_bytes(b"weights")

    io.atomic_write(target, write_both, companions=(".bin",))
    assert target.read_text() == "graph"
    assert (tmp_path / "m.int8.bin").read_bytes() == b"weights"
    assert sorted(os.listdir(tmp_path)) == ["m.int8.bin", "m.int8.xml"]
    with pytest.raises(FileExistsError, match=r"m\.int8\.xml: already exists"):
        io.atomic_write(target, write_both, companions=(".bin",))

    def failing_write(tmp: Path) -> None:
        tmp.write_text("new graph")
        tmp.with_suffix(".bin").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        io.atomic_write(target, failing_write, overwrite=True, companions=(".bin",))
    assert sorted(os.listdir(tmp_path)) == ["m.int8.bin", "m.int8.xml"]  # no temporaries
    assert target.read_text() == "graph"
    assert (tmp_path / "m.int8.bin").read_bytes() == b"weights"


def test_atomic_write_bad_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InputError, match="does not exist"):
        io.atomic_write_text(tmp_path / "missing" / "a.txt", "x")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(InputError, match="not writable"):
        io.atomic_write_text(tmp_path / "a.txt", "x")


# ---------------------------------------------------------------------------------- real data


@pytest.mark.real
@pytest.mark.parametrize(
    ("folder", "case_id"),
    [
        ("brats-labeled/BraTS2021_00006", "BraTS2021_00006"),
        ("brats2023-unlabeled/BraTS-GLI-00001-000", "BraTS-GLI-00001-000"),
    ],
)
def test_read_real_case(real_case, folder: str, case_id: str) -> None:
    files = io.find_case_files(real_case(folder))
    assert files.case_id == case_id
    case = io.read_case(files)
    assert case.image.shape == (4, 240, 240, 155)
    assert case.image.dtype == np.float32
    assert case.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert all(case.image[i].any() for i in range(4))


@pytest.mark.real
def test_read_real_segs(real_case) -> None:
    # Counts of the shared data's files (its README); another data folder skips.
    folder = real_case("brats-labeled/BraTS-GLI-00012-000")
    cases = io.find_cases(folder.parent)  # every case folder of brats-labeled, none left out
    assert cases == sorted(p for p in folder.parent.iterdir() if p.is_dir())
    labels, _, _ = io.read_label_map(io.find_case_files(folder).seg)  # BraTS 2023 numbering
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert np.count_nonzero(labels == 4) == 224
    labels, _, _ = io.read_label_map(
        real_case("brats-labeled/BraTS2021_00006") / "BraTS2021_00006_seg.nii.gz"
    )
    assert [np.count_nonzero(np.isin(labels, r)) for r in ([1, 2, 4], [1, 4], [4])] == [
        137911,
        51954,
        26448,
    ]
