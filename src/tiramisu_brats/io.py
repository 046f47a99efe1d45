"""Reading BraTS cases and label maps, writing label maps, atomic file writes.

Volumes are channel-first ``(4, X, Y, Z)`` ``float32`` (or, on request, the files' integer type)
in ``MODALITIES`` order; label maps are
``(X, Y, Z)`` ``uint8`` in the internal BraTS 2017-2021 numbering 0/1/2/4. The BraTS 2023
numbering (0/1/2/3) exists only on disk: ``read_label_map`` and ``write_label_map`` convert.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import secrets
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Generic, TypeVar

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

logger = logging.getLogger(__name__)
T = TypeVar("T")

MODALITIES = ("t1", "t1ce", "t2", "flair")
LABEL_CONVENTIONS = ("brats", "brats2023")
# The network's class indices (0 background, 1 necrosis, 2 edema, 3 enhancing) and the BraTS
# labels 0/1/2/4, both ways (a BraTS 2023 label 3 is read as 4 before this).
CLASS_TO_LABEL = np.array([0, 1, 2, 4], np.uint8)
LABEL_TO_CLASS = np.array([0, 1, 2, 0, 3], np.uint8)

# File-name suffixes (before .nii/.nii.gz) of the four modalities, in MODALITIES order, and of
# the segmentation, per naming scheme. Matched case-insensitively against the end of the stem.
_LAYOUTS: dict[str, tuple[tuple[str, str, str, str], tuple[str, ...]]] = {
    "BraTS 2017-2021": (("_t1", "_t1ce", "_t2", "_flair"), ("_seg",)),
    "BraTS 2023": (("-t1n", "-t1c", "-t2w", "-t2f"), ("-seg",)),
    "nnU-Net": (("_0000", "_0001", "_0002", "_0003"), ("", "_seg")),
}
_NIFTI_EXTS = (".nii.gz", ".nii")
_MAX_AXIS = 1024
_MAX_VOXELS = 2**28
AFFINE_ATOL = 1e-3  # mm: affines this close are one grid (rounding in stored headers)
# OverflowError: numpy.memmap of a header whose vox_offset is absurd (found by fuzzing).
_READ_ERRORS = (
    ImageFileError, HeaderDataError, OSError, EOFError, zlib.error, ValueError, OverflowError
)
# Internal label -> on-disk label, per convention.
_TO_DISK: dict[str, dict[int, int]] = {
    "brats": {0: 0, 1: 1, 2: 2, 4: 4},
    "brats2023": {0: 0, 1: 1, 2: 2, 4: 3},
}


class InputError(ValueError):
    """A problem with the user's input; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: four images in ``MODALITIES`` order and an optional segmentation."""

    case_id: str
    images: tuple[Path, Path, Path, Path]
    seg: Path | None = None


@dataclass(frozen=True, eq=False)
class Case:
    """One loaded case.

    ``image``: ``(4, X, Y, Z)`` float32 (int16 etc. as ``read_case(keep_dtype=True)`` allows)
    in ``MODALITIES`` order; ``affine``: ``(4, 4)`` float64;
    ``header``: the T1 file's header (the reference when writing outputs).
    """

    case_id: str
    image: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    files: CaseFiles

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z (from the affine, as ``preprocess.network_grid``
        resamples by it)."""
        return header_spacing(self.header)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return self.image.shape[1:]  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Finding files


def header_spacing(header: nib.Nifti1Header) -> tuple[float, float, float]:
    """Voxel size in mm along the first three axes, from the header's best affine (the sform,
    else the qform, else the zooms): where a header's zooms disagree with its sform, the sform
    is the grid that nibabel, and so the segmentation, uses."""
    linear = header.get_best_affine()[:3, :3]
    return tuple(float(z) for z in np.sqrt((linear**2).sum(axis=0)))  # type: ignore[return-value]


def nifti_stem(name: str) -> str | None:
    """``name`` without ``.nii``/``.nii.gz`` (any case), or None if it is not a NIfTI name."""
    lower = name.lower()
    for ext in _NIFTI_EXTS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def find_case_files(folder: str | os.PathLike[str]) -> CaseFiles:
    """Find the four images (and the segmentation, if any) of the case in ``folder``.

    Accepts BraTS 2017-2021 (``<case>_t1``, ``_t1ce``, ``_t2``, ``_flair``, ``_seg``), BraTS 2023
    (``<case>-t1n``, ``-t1c``, ``-t2w``, ``-t2f``, ``-seg``) and nnU-Net (``<case>_0000`` ..
    ``_0003``, seg ``<case>`` or ``<case>_seg``) naming, ``.nii`` or ``.nii.gz``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    stems = {  # broken links too: the error names them rather than a missing modality
        p: stem.lower()
        for p in sorted(folder.iterdir())
        if not p.name.startswith(".") and (stem := nifti_stem(p.name))
        and (p.is_file() or (p.is_symlink() and not p.exists()))
    }
    if not stems:
        raise InputError(f"{folder}: no NIfTI files (.nii or .nii.gz)")

    def matching(suffix: str) -> list[Path]:
        return [p for p, stem in stems.items() if stem.endswith(suffix)]

    layout, (suffixes, seg_suffixes) = max(
        _LAYOUTS.items(), key=lambda item: sum(bool(matching(s)) for s in item[1][0])
    )
    if not any(matching(s) for s in suffixes):
        raise InputError(
            f"{folder}: no file named like <case>_t1.nii.gz (BraTS 2017-2021), "
            "<case>-t1n.nii.gz (BraTS 2023) or <case>_0000.nii.gz (nnU-Net)"
        )
    images = []
    for modality, suffix in zip(MODALITIES, suffixes, strict=True):
        found = matching(suffix)
        if not found:
            raise InputError(
                f"{folder}: no {modality} image (expected <case>{suffix}.nii.gz, {layout} naming)"
            )
        others = [p for name, (other, _) in _LAYOUTS.items() if name != layout
                  for p in matching(other[MODALITIES.index(modality)])]
        if len(found) > 1 or others:
            raise InputError(
                f"{folder}: several {modality} images: "
                f"{', '.join(p.name for p in [*found, *others])}"
            )
        images.append(found[0])
    prefixes = {p.name[: len(stems[p]) - len(s)] for p, s in zip(images, suffixes, strict=True)}
    if len(prefixes) > 1:
        raise InputError(f"{folder}: the image files name different cases: {sorted(prefixes)}")
    case_id = prefixes.pop() or folder.name
    seg_stems = {(case_id + s).lower() for s in seg_suffixes}
    segs = [p for p, stem in stems.items() if stem in seg_stems]
    if len(segs) > 1:
        raise InputError(f"{folder}: several segmentations: {', '.join(p.name for p in segs)}")
    for path in (*images, *segs):
        if not path.exists():
            raise InputError(f"{path}: a broken link (to {os.readlink(path)}, which does not "
                             "exist)")
    return CaseFiles(case_id, tuple(images), segs[0] if segs else None)  # type: ignore[arg-type]


def case_files_from_paths(
    t1: str | os.PathLike[str],
    t1ce: str | os.PathLike[str],
    t2: str | os.PathLike[str],
    flair: str | os.PathLike[str],
    case_id: str | None = None,
) -> CaseFiles:
    """A case from four explicit files; the case id defaults to the T1 name without its
    extension and modality suffix (``BraTS2021_00006_t1.nii.gz`` -> ``BraTS2021_00006``)."""
    paths = tuple(Path(p) for p in (t1, t1ce, t2, flair))
    for path in paths:
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        if nifti_stem(path.name) is None:
            raise InputError(f"{path}: not a NIfTI file name (expected .nii or .nii.gz)")
    for (i, a), (j, b) in itertools.combinations(enumerate(paths), 2):
        if a.resolve() == b.resolve():
            raise InputError(f"{b}: the same file as the {MODALITIES[i]} image, given as the "
                             f"{MODALITIES[j]} image")
    if case_id is None:
        case_id = nifti_stem(paths[0].name) or paths[0].name
        for suffixes, _ in _LAYOUTS.values():
            if case_id.lower().endswith(suffixes[0]) and len(case_id) > len(suffixes[0]):
                case_id = case_id[: -len(suffixes[0])]
                break
    return CaseFiles(case_id, paths)  # type: ignore[arg-type]


def is_case_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder holding one complete case (see ``find_case_files``)."""
    try:
        find_case_files(path)
    except InputError:
        return False
    return True


def _holds_nifti(folder: Path) -> bool:
    """Whether ``folder`` holds a (non-hidden) NIfTI file directly."""
    return any(
        not p.name.startswith(".") and nifti_stem(p.name) is not None for p in folder.iterdir()
    )


def find_cases(root: str | os.PathLike[str], *, incomplete: bool = False) -> list[Path]:
    """``[root]`` if ``root`` is a case folder, else the sorted case folders directly below it.

    A ``root`` that holds NIfTI files itself but is not a complete case raises the reason
    (missing or duplicate modality, ...) rather than a generic error. With ``incomplete``, the
    folders below ``root`` that hold NIfTI files but are not complete cases are returned too,
    so that the caller can report each one (``find_case_files`` says what is wrong).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if is_case_folder(root):
        return [root]
    subfolders = [p for p in sorted(root.iterdir()) if not p.name.startswith(".") and p.is_dir()]
    cases = [p for p in subfolders if is_case_folder(p)]
    if not cases and _holds_nifti(root):
        find_case_files(root)  # raises: the reason this folder of images is not a case
    if incomplete:
        cases = [p for p in subfolders if p in cases or _holds_nifti(p)]
    if not cases:
        raise InputError(
            f"{root}: neither a case folder nor a folder of case folders (no complete set of "
            "t1/t1ce/t2/flair NIfTI files found)"
        )
    return cases


def safe_case_id(case_id: str) -> str:
    """Return ``case_id`` if it is usable as a file name inside an output folder."""
    if (
        not case_id
        or case_id in (".", "..")
        or any(c in case_id for c in "/\\\0")
        or PureWindowsPath(case_id).drive
    ):
        raise InputError(f"{case_id!r}: case id is not usable as a file name")
    return case_id


# --------------------------------------------------------------------------------------------
# Reading


def _open_volume(path: Path) -> tuple[nib.Nifti1Image, tuple[int, int, int]]:
    """Open a NIfTI file (header only) and check that it holds one plausible 3D volume.

    Returns the image and its 3D shape (trailing singleton axes dropped).
    """
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except _READ_ERRORS as e:
        raise InputError(f"{path}: not a readable NIfTI file ({_one_line(e)})") from e
    if not isinstance(img, nib.Nifti1Pair):  # NIfTI-1 and NIfTI-2, single file or pair
        raise InputError(f"{path}: not a NIfTI file ({type(img).__name__})")
    shape = tuple(int(n) for n in img.shape)
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        shape = shape[:3]
    if len(shape) != 3:
        extra = f" with {shape[3]} volumes" if len(shape) == 4 else ""
        raise InputError(f"{path}: {len(shape)}D image{extra} of shape {img.shape}, expected 3D")
    if min(shape) < 1:
        raise InputError(f"{path}: header claims an empty image of shape {shape}")
    if max(shape) > _MAX_AXIS or np.prod(shape, dtype=np.int64) > _MAX_VOXELS:
        raise InputError(f"{path}: image of shape {shape} is larger than this tool reads (at "
                         f"most {_MAX_AXIS} voxels per axis and {_MAX_VOXELS:,} in all)")
    dtype = img.get_data_dtype()
    if dtype.kind not in "biuf":
        raise InputError(f"{path}: unsupported voxel type {dtype}")
    return img, shape  # type: ignore[return-value]


def _read_voxels(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel array as stored, scaled by nibabel where the header says so (the path of files
    that ``_stream_voxels`` does not take)."""
    try:
        return np.asanyarray(img.dataobj)
    except _READ_ERRORS as e:
        raise InputError(f"{path}: cannot read the voxel data ({_one_line(e)})") from e


def _scaled(img: nib.Nifti1Image) -> bool:
    """Whether the header scales the stored voxels (nibabel moves that out of ``img.header``)."""
    return (img.dataobj.slope, img.dataobj.inter) != (1.0, 0.0)


def _gzipped_nifti(img: nib.Nifti1Image, path: Path) -> bool:
    return path.name.lower().endswith(".nii.gz") and type(img) in (nib.Nifti1Image,
                                                                   nib.Nifti2Image)


@contextlib.contextmanager
def _mapped(path: Path):
    """The file's bytes, memory-mapped (page cache: no copy into fresh memory)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield data


def _gunzip(data, limit: int, piece: int = 1 << 18) -> Iterator[bytes]:
    """The first ``limit`` bytes that the gzip ``data`` (bytes or a memory map; one member or
    several) holds, in chunks as they come out of ``piece`` bytes of input at a time: no more
    is decompressed, whatever the file holds beyond the header's voxels."""
    view, pos, size = memoryview(data), 0, 0
    try:
        while pos < len(view) and size < limit:
            member = zlib.decompressobj(wbits=31)
            while not member.eof and size < limit:
                if pos >= len(view):  # the words of Python's own gzip reader
                    raise EOFError(
                        "Compressed file ended before the end-of-stream marker was reached")
                with view[pos : pos + piece] as chunk:  # released: the map can be closed
                    out = member.decompress(chunk, limit - size)
                    pos += len(chunk) - len(member.unconsumed_tail) - len(member.unused_data)
                size += len(out)
                if out:
                    yield out
    finally:
        view.release()


def _stream_voxels(flat: np.ndarray, img: nib.Nifti1Image, path: Path) -> bool:
    """Decompress a gzipped NIfTI's voxels straight into ``flat`` (X * Y * Z,), in the file's
    order (X fastest), converting each chunk as it comes: no copy of the whole file in memory
    (fresh memory is slow to touch, in virtual machines most of all). Returns False, having
    done nothing, where nibabel must read the file: not gzipped, or voxels scaled."""
    if not _gzipped_nifti(img, path) or _scaled(img):
        return False
    stored = img.get_data_dtype()
    offset = int(img.dataobj.offset)
    need = flat.size * stored.itemsize
    done, pending = -offset, b""  # bytes of voxels written (negative: header bytes to skip)
    try:
        with _mapped(path) as data, np.errstate(over="ignore"):
            for out in _gunzip(data, offset + need):
                if done < 0:
                    skip = min(-done, len(out))
                    out, done = out[skip:], done + skip
                if pending:
                    out, pending = pending + out, b""
                whole = len(out) // stored.itemsize
                if whole:
                    at = done // stored.itemsize
                    flat[at : at + whole] = np.frombuffer(out, stored, whole)
                    done += whole * stored.itemsize
                pending = out[whole * stored.itemsize :]
        if done < need:
            raise ValueError(f"{max(done, 0)} bytes of voxels where the header needs {need}")
    except _READ_ERRORS as e:
        raise InputError(f"{path}: cannot read the voxel data ({_one_line(e)})") from e
    return True


def _load_modality(flat: np.ndarray, slot: np.ndarray, img: nib.Nifti1Image, path: Path) -> None:
    """Read one image's voxels into ``slot`` (X, Y, Z), whose memory ``flat`` is in the file's
    order; NaN/Inf set to 0."""
    floats = img.get_data_dtype().kind == "f"
    if not _stream_voxels(flat, img, path):
        data = _read_voxels(img, path)
        floats = data.dtype.kind == "f"  # scaled integers too
        with np.errstate(over="ignore"):  # float64 beyond float32 range -> Inf, handled below
            slot[...] = data.reshape(slot.shape)
    if floats:  # only float data can hold NaN/Inf (or overflow)
        zero_nonfinite(slot, path)
    if not slot.any():
        raise InputError(f"{path}: all voxels are zero")


def zero_nonfinite(values: np.ndarray, what: object) -> np.ndarray:
    """``values`` with its NaN/Inf set to 0, in place (with a warning naming ``what`` and how
    many); integer arrays, which hold none, as they are."""
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            logger.warning("%s: %d NaN/Inf voxels (or beyond float32's range) set to 0", what,
                           np.count_nonzero(bad))
            values[bad] = 0
    return values


def read_case(files: CaseFiles, *, keep_dtype: bool = False) -> Case:
    """Load the four images of a case into one ``(4, X, Y, Z)`` float32 array.

    All headers are checked (3D, plausible size, same shape and affine as the T1) before any
    voxel data is read. NaN/Inf voxels become 0 (with a warning); an all-zero image is an error.

    ``keep_dtype``: where the four files store one integer type that float32 holds exactly,
    unscaled (int16 in BraTS), keep it (half the memory, and what ``preprocess`` makes the same
    float32 slices of); else float32 all the same. Each modality is laid out in the files'
    order (X fastest).
    """
    opened = [_open_volume(Path(p)) for p in files.images]
    ref, shape = opened[0]
    affine = ref.affine.astype(np.float64)
    for path, (img, img_shape) in zip(files.images[1:], opened[1:], strict=True):
        if img_shape != shape:
            raise InputError(f"{path}: shape {img_shape} differs from t1's {shape}")
        if not np.allclose(img.affine, affine, atol=AFFINE_ATOL):
            diff = np.abs(img.affine - affine).max()
            raise InputError(f"{path}: affine differs from t1's (by up to {diff:.4g})")
    if int(ref.header["qform_code"]) == 0 == int(ref.header["sform_code"]):
        logger.warning("%s: the header records no orientation (qform and sform codes 0): "
                       "taken as %s, which may be wrong", files.images[0],
                       "".join(nib.aff2axcodes(affine)))
    dtype = np.dtype(np.float32)
    stored = {img.get_data_dtype().newbyteorder("=") for img, _ in opened}
    if keep_dtype and len(stored) == 1 and not any(_scaled(img) for img, _ in opened):
        (only,) = stored
        if only.kind in "iu" and np.can_cast(only, np.float32, "safe"):
            dtype = only
    # The files' order (X fastest) per modality: each file decompresses straight into place.
    flat = np.empty((len(MODALITIES), int(np.prod(shape))), dtype=dtype)
    image = flat.reshape(len(MODALITIES), *shape[::-1]).transpose(0, 3, 2, 1)
    with ThreadPoolExecutor(len(MODALITIES), thread_name_prefix="read") as pool:
        jobs = [pool.submit(_load_modality, part, slot, img, Path(path))
                for part, slot, path, (img, _) in zip(flat, image, files.images, opened,
                                                     strict=True)]
        for job in jobs:  # the first file's error in modality order, as when read one by one
            job.result()
    return Case(files.case_id, image, affine, ref.header, files)


class ReadAhead(Generic[T]):
    """``read_case`` for a known sequence of cases, each read in a background thread before it is
    asked for, so that reading overlaps the work on the case before it (inference, which runs in
    native threads). At most ``ahead`` cases wait in memory. ``read``: what is done in the
    background for each case (default ``read_case``; e.g. also preprocessing).

    >>> with ReadAhead(cases) as reader:
    ...     for files in cases:
    ...         case = reader.read(files)  # errors of reading are raised here
    """

    def __init__(self, cases: Sequence[CaseFiles], ahead: int = 1,
                 read: Callable[[CaseFiles], T] = read_case) -> None:  # type: ignore[assignment]
        self._order = list(cases)
        self._ahead = ahead
        self._read = read
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self._pending: dict[int, Future[T]] = {}
        self._next = 0  # the first case not submitted yet
        self._done = 0  # the first case not asked for yet
        self._fill()

    def _fill(self) -> None:
        self._next = max(self._next, self._done)
        while self._next < min(len(self._order), self._done + self._ahead):
            self._pending[self._next] = self._pool.submit(self._read, self._order[self._next])
            self._next += 1

    def read(self, files: CaseFiles) -> T:
        """The case ``files`` (as ``read``): from the background thread when it was read
        ahead; cases before it that were not asked for are dropped."""
        index = next((i for i in range(self._done, len(self._order))
                      if self._order[i] == files), None)
        if index is None:
            return self._read(files)
        for skipped in [i for i in self._pending if i < index]:
            self._pending.pop(skipped).cancel()
        future = self._pending.pop(index, None)
        self._done = index + 1
        self._fill()
        return future.result() if future is not None else self._read(files)

    def close(self) -> None:
        """Drop what was read ahead and stop the thread."""
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReadAhead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def names_text(names: Sequence[str], shown: int = 10) -> str:
    """The first ``shown`` of ``names`` joined by commas, and how many more there are."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


def _values_text(values: np.ndarray | list, limit: int = 10) -> str:
    values = list(np.asarray(values).tolist())
    more = f" and {len(values) - limit} more" if len(values) > limit else ""
    return f"{values[:limit]}{more}"


def _as_uint8(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` cast to a new uint8 array, and the sorted unique values that do not survive the
    cast (non-integers, NaN, negative or > 255)."""
    data = np.asarray(data)
    with np.errstate(invalid="ignore", over="ignore"):
        labels = data.astype(np.uint8)
    lost = labels != data
    return labels, (np.unique(data[lost]) if lost.any() else np.empty(0, np.uint8))


def read_label_map(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read a segmentation as ``(labels, affine, header)``.

    ``labels``: ``(X, Y, Z)`` uint8 in the internal numbering 0/1/2/4. The convention is detected
    from the values: a subset of {0, 1, 2, 4} is BraTS 2017-2021; {0, 1, 2, 3} with a 3 is BraTS
    2023 (3 becomes 4). Float storage is fine if the values are integers.
    """
    path = Path(path)
    img, shape = _open_volume(path)
    data = _read_voxels(img, path).reshape(shape)
    labels, lost = _as_uint8(data)
    # A pass per value 0..4 (5 ms for a BraTS volume, np.bincount 46 ms); only where other
    # values are left is every value present looked for.
    counts = [np.count_nonzero(labels == v) for v in range(5)]
    present = (np.flatnonzero(counts) if sum(counts) == labels.size
               else np.flatnonzero(np.bincount(labels.ravel(), minlength=256)))
    if lost.size or (present > 4).any():  # both kinds: an image given for a label map has both
        kept = (labels > 4) & (labels == data)
        unexpected = sorted({*lost.tolist(), *np.unique(labels[kept]).tolist()})
        raise InputError(
            f"{path}: unexpected label values {_values_text(unexpected)} "
            "(expected 0/1/2/4, or 0/1/2/3 in BraTS 2023 numbering)"
        )
    if 3 in present and 4 in present:
        raise InputError(
            f"{path}: label values {_values_text(present)} mix 3 (BraTS 2023 enhancing tumor) "
            "and 4 (BraTS 2017-2021 enhancing tumor)"
        )
    convention = "brats2023" if 3 in present else "brats"
    logger.debug("%s: labels %s, %s numbering", path, present.tolist(), convention)
    return from_convention(labels, convention), img.affine, img.header


def _remap(labels: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    labels8, lost = _as_uint8(labels)
    lut = np.full(256, 255, dtype=np.uint8)
    lut[list(mapping)] = list(mapping.values())
    out = lut[labels8]
    if lost.size or (out == 255).any():
        bad = lost if lost.size else np.unique(labels8[out == 255])
        raise ValueError(f"label values {_values_text(bad)} not in {sorted(mapping)}")
    return out


def check_convention(convention: str) -> None:
    """Refuse a label convention not in ``LABEL_CONVENTIONS``."""
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(
            f"unknown label convention {convention!r} (use one of "
            f"{', '.join(LABEL_CONVENTIONS)})"
        )


def to_convention(labels: np.ndarray, convention: str) -> np.ndarray:
    """Internal labels (0/1/2/4) -> a new uint8 array in ``convention`` (brats2023: 4 -> 3)."""
    check_convention(convention)
    return _remap(labels, _TO_DISK[convention])


def from_convention(labels: np.ndarray, convention: str) -> np.ndarray:
    """Labels in ``convention`` -> a new uint8 array in the internal numbering 0/1/2/4."""
    check_convention(convention)
    return _remap(labels, {disk: internal for internal, disk in _TO_DISK[convention].items()})


# --------------------------------------------------------------------------------------------
# Writing


def _extension(name: str) -> str:
    """The file type suffix of ``name``: ``.nii.gz`` for ``x.nii.gz``, ``.json`` for ``x.json``."""
    suffixes = Path(name).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in (".gz", ".bz2", ".zst"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def atomic_write(
    path: str | os.PathLike[str],
    write_fn: Callable[[Path], object],
    *,
    overwrite: bool = False,
    companions: tuple[str, ...] = (),
) -> Path:
    """Write ``path`` atomically: ``write_fn(tmp)`` writes a hidden temporary file in the same
    folder (same extension, so e.g. nibabel still compresses ``.nii.gz``), which is then fsynced
    and renamed over ``path``. On any error the temporary file is removed and an existing
    ``path`` is left untouched.

    ``companions``: suffixes of files that ``write_fn`` writes beside the temporary file
    (``tmp.with_suffix(s)``, such as the ``.bin`` of an OpenVINO ``.xml``); each is renamed to
    ``path.with_suffix(s)`` before ``path`` itself, so that ``path`` appearing marks them all
    complete, and removed on error like the temporary file."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise InputError(f"{path}: output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{path}: output folder {folder} is not writable")
    for target in (path, *(path.with_suffix(s) for s in companions)):
        if (target.exists() or target.is_symlink()) and not overwrite:
            raise FileExistsError(
                f"{target}: already exists (and overwriting was not asked for)")
    tmp = folder / f".{path.name}.tmp-{secrets.token_hex(4)}{_extension(path.name)}"
    reserved = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # reserve the name
    # the permissions the umask gives a new file, for writers that make their own (safetensors
    # writes 0600: a run's weights unreadable to the others of a shared machine)
    mode = os.fstat(reserved).st_mode & 0o777
    os.close(reserved)
    pairs = [(tmp.with_suffix(s), path.with_suffix(s)) for s in companions]
    try:
        write_fn(tmp)
        for written in (*(t for t, _ in pairs), tmp):
            os.chmod(written, mode)
            with open(written, "rb+") as f:
                os.fsync(f.fileno())
        for written, target in pairs:
            os.replace(written, target)
        os.replace(tmp, path)
    except BaseException as err:
        for written in (tmp, *(t for t, _ in pairs)):
            written.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None:  # name the file, not the temp
            raise OSError(err.errno, f"cannot write it: {err.strerror or err}", str(path)) from err
        raise
    with contextlib.suppress(OSError):  # persist the rename (POSIX; not possible everywhere)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` via ``atomic_write``."""
    return atomic_write(
        path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite
    )


def atomic_write_bytes(
    path: str | os.PathLike[str], data: bytes, *, overwrite: bool = True
) -> Path:
    """Write ``data`` to ``path`` via ``atomic_write``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite)


def write_label_map(
    path: str | os.PathLike[str],
    labels: np.ndarray,
    reference_header: nib.Nifti1Header,
    affine: np.ndarray,
    *,
    convention: str = "brats",
    overwrite: bool = False,
) -> Path:
    """Write ``labels`` ((X, Y, Z) uint8, internal numbering) as a uint8 NIfTI in ``convention``.

    Shape, qform/sform and their codes come from ``reference_header`` (normally ``Case.header``);
    ``affine`` must agree with it (ValueError otherwise, as for a shape mismatch).
    """
    data = to_convention(np.asarray(labels), convention)
    return _write_on_grid(path, data, reference_header, affine, np.uint8, overwrite)


def write_float_map(
    path: str | os.PathLike[str],
    values: np.ndarray,
    reference_header: nib.Nifti1Header,
    affine: np.ndarray,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``values`` ((X, Y, Z), e.g. an uncertainty map) as a float32 NIfTI on the grid of
    ``reference_header``, as ``write_label_map`` does for labels."""
    return _write_on_grid(path, np.asarray(values, np.float32), reference_header, affine,
                          np.float32, overwrite)


def _write_on_grid(path: str | os.PathLike[str], data: np.ndarray,
                   reference_header: nib.Nifti1Header, affine: np.ndarray, dtype: type,
                   overwrite: bool) -> Path:
    path = Path(path)
    if nifti_stem(path.name) is None:
        raise InputError(f"{path}: output file name must end in .nii.gz or .nii")
    ref_shape = tuple(int(n) for n in reference_header.get_data_shape())
    if data.shape != ref_shape[:3] or any(n != 1 for n in ref_shape[3:]):
        raise ValueError(
            f"{path}: map shape {data.shape} differs from reference {ref_shape}"
        )
    header = reference_header.copy()
    ref_affine = header.get_best_affine()
    if not np.allclose(affine, ref_affine, atol=AFFINE_ATOL):
        raise ValueError(f"{path}: affine differs from the reference header's")
    header.set_data_dtype(dtype)
    header.set_slope_inter(1, 0)
    header["cal_min"], header["cal_max"] = 0, 0
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    # The reference's own best affine leaves the header's qform/sform and codes untouched.
    # The reference's shape, trailing singleton axes included (X, Y, Z, 1 in, X, Y, Z, 1 out).
    img = klass(data.reshape(ref_shape), ref_affine, header, dtype=dtype)
    return atomic_write(path, lambda tmp: nib.save(img, tmp), overwrite=overwrite)
