"""Training data: a preprocessed slice cache, a tumor-aware patch sampler, augmentation.

The cache holds, per case, the network slices ``(Z', 4, H, W)`` as uint8 (z-scores quantized
in steps of 1/16 standard deviation over [-4, 12), background exactly 0 after decoding) and the
class indices ``(Z', H, W)`` uint8 (0 background, 1 necrosis, 2 edema, 3 enhancing), stored
as plain ``.npy`` files that are memory-mapped: no NIfTI is decompressed after the first run,
and a cohort larger than memory still trains. The quantization error (std 0.018) is far below
MRI noise and below the intensity augmentation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tiramisu_brats import io
from tiramisu_brats.preprocess import (
    CROP,
    PLANES,
    extract,
    network_grid,
    preprocess,
    to_network,
    to_plane,
)

log = logging.getLogger(__name__)

QUANT_STEP = 1 / 16
QUANT_OFFSET = 64  # code of z = 0, the background
CACHE_VERSION = 2  # 2: one set of slices per plane


def quantize(z: np.ndarray) -> np.ndarray:
    """Z-scores (float) → uint8 codes."""
    return np.clip(np.rint(z / QUANT_STEP) + QUANT_OFFSET, 0, 255).astype(np.uint8)


def dequantize(codes: np.ndarray) -> np.ndarray:
    """uint8 codes → float32 z-scores (inverse of ``quantize`` up to the rounding)."""
    return (codes.astype(np.float32) - QUANT_OFFSET) * QUANT_STEP


@dataclass(frozen=True)
class CachedCase:
    """One cached case seen along one plane: memory-mapped ``images`` (Z', 4, H, W) uint8
    codes and ``classes`` (Z', H, W) uint8, with ``tumor_slices`` the indices of slices holding
    tumor. ``plane``: one of ``preprocess.PLANES`` (the slices' normal)."""

    case_id: str
    images: np.ndarray
    classes: np.ndarray
    tumor_slices: np.ndarray
    plane: str = "axial"


def _fingerprint(files: io.CaseFiles) -> str:
    h = hashlib.sha256()
    for p in (*files.images, files.seg):
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _save_npy(path: Path, array: np.ndarray) -> None:
    io.atomic_write(path, lambda tmp: np.save(tmp, array), overwrite=True)


def cache_paths(cache_dir: Path, case_id: str, plane: str) -> tuple[Path, Path]:
    """The two files of a cache entry: images and classes of one case along one plane."""
    return (cache_dir / f"{case_id}.{plane}_images.npy",
            cache_dir / f"{case_id}.{plane}_classes.npy")


def cache_case(files: io.CaseFiles, cache_dir: Path, crop: tuple[int, int] = CROP,
               planes: Sequence[str] = PLANES) -> list[CachedCase]:
    """Preprocess one labelled case into ``cache_dir``, once per plane of ``planes``, unless an
    up-to-date copy is there; returns one ``CachedCase`` per plane."""
    if files.seg is None:
        raise io.InputError(f"{files.images[0].parent}: no segmentation (_seg) for training")
    case_id = io.safe_case_id(files.case_id)
    meta_path = cache_dir / f"{case_id}.json"
    meta = _cache_meta(_fingerprint(files), crop, planes)
    fresh = meta_path.exists() and all(p.exists() for plane in planes
                                       for p in cache_paths(cache_dir, case_id, plane))
    if fresh and json.loads(meta_path.read_text()) == meta:
        return load_cached(cache_dir, case_id)
    meta_path.unlink(missing_ok=True)  # the entry is incomplete until the marker is back
    image, labels = read_network_case(files)
    return cache_volume(case_id, image, labels, cache_dir, meta["source"], crop, planes)


def _cache_meta(source: str, crop: tuple[int, int], planes: Sequence[str]) -> dict:
    """A cache entry's JSON marker: what it was made from and how."""
    return {"version": CACHE_VERSION, "crop": list(crop), "source": source,
            "planes": list(planes)}


def read_network_case(files: io.CaseFiles) -> tuple[np.ndarray, np.ndarray]:
    """A labelled case in the orientation segment gives the network (flips and permutations
    only: the labels stay exact; voxels that are not 1 mm are kept as they are): the image
    ``(C, X, Y, Z)`` in its stored dtype and the BraTS labels ``(X, Y, Z)``."""
    case = io.read_case(files, keep_dtype=True)
    labels, _, _ = io.read_label_map(files.seg)
    if labels.shape != case.shape:
        raise io.InputError(
            f"{files.seg}: shape {labels.shape} differs from the images' {case.shape}")
    grid = network_grid(case.affine, case.shape, resample=False)
    return to_network(case.image, grid), to_network(labels, grid)


def cache_volume(case_id: str, image: np.ndarray, labels: np.ndarray, cache_dir: Path,
                 source: str, crop: tuple[int, int] = CROP, planes: Sequence[str] = PLANES,
                 ) -> list[CachedCase]:
    """Write the cache entry of one case already in the network's orientation: ``image``
    ``(C, X, Y, Z)``, ``labels`` ``(X, Y, Z)`` BraTS labels, once per plane of ``planes``;
    ``source`` names what it was made from (in the entry's JSON marker, written last)."""
    meta = _cache_meta(source, crop, planes)
    for plane in planes:
        slices, geometry = preprocess(to_plane(image, plane), crop)
        img_path, cls_path = cache_paths(cache_dir, case_id, plane)
        _save_npy(img_path, quantize(slices))
        _save_npy(cls_path, io.LABEL_TO_CLASS[extract(to_plane(labels, plane), geometry)])
    io.atomic_write_text(cache_dir / f"{case_id}.json", json.dumps(meta))
    return load_cached(cache_dir, case_id)


def load_cached(cache_dir: Path, case_id: str) -> list[CachedCase]:
    """Open a cached case, memory-mapped: one ``CachedCase`` per plane it was cached in."""
    meta = json.loads((Path(cache_dir) / f"{case_id}.json").read_text())
    if meta.get("version") != CACHE_VERSION:
        raise io.InputError(f"{cache_dir}: cache of version {meta.get('version')}, this is "
                            f"version {CACHE_VERSION}: build it anew")
    out = []
    for plane in meta["planes"]:
        img_path, cls_path = cache_paths(Path(cache_dir), case_id, plane)
        images = np.load(img_path, mmap_mode="r")
        classes = np.load(cls_path, mmap_mode="r")
        tumor = np.flatnonzero(np.asarray(classes).reshape(len(classes), -1).any(axis=1))
        out.append(CachedCase(case_id, images, classes, tumor, plane))
    return out


def build_cache(
    data_dirs: Path | Sequence[Path], cache_dir: Path, crop: tuple[int, int] = CROP,
    progress: Callable[[Iterable], Iterable] = iter, planes: Sequence[str] = PLANES,
) -> list[CachedCase]:
    """Cache every labelled case below the folder(s) ``data_dirs`` (any layout ``io`` reads),
    in every plane of ``planes``; one ``CachedCase`` per case and plane, by case id."""
    folders = list(find_training_cases(data_dirs).values())
    cache_dir.mkdir(parents=True, exist_ok=True)  # after the cases were found: none, no folder
    return [c for f in progress(folders)
            for c in cache_case(io.find_case_files(f), cache_dir, crop, planes)]


def find_training_cases(data_dirs: Path | Sequence[Path]) -> dict[str, Path]:
    """The labelled case folders below one or several data folders, by case id (in id order),
    from the files' names alone (no image is read). A folder of images that is not a complete
    case (``io.find_case_files`` says what is missing), a case without segmentation, or one
    whose id is no file name, is an error, as is a case id found twice (the same case would
    fall on both sides of a split)."""
    dirs = [Path(data_dirs)] if isinstance(data_dirs, (str, Path)) else [Path(d) for d in data_dirs]
    seen: dict[str, Path] = {}
    for f in (f for d in dirs for f in io.find_cases(d, incomplete=True)):
        files = io.find_case_files(f)
        if files.seg is None:
            raise io.InputError(f"{f}: no segmentation (_seg) for training")
        case_id = io.safe_case_id(files.case_id)
        if case_id in seen:
            raise io.InputError(f"case {case_id} is in both {seen[case_id]} and {f}")
        seen[case_id] = f
    return {case_id: seen[case_id] for case_id in sorted(seen)}


def labelled_cases(root: Path, ids: str | None = None) -> dict[str, Path]:
    """The labelled case folders of ``root/brats-labeled`` and ``root/brats-labeled-extra``
    (the layout of ``../shared/data``) by case id: the comma-separated ``ids`` in the order
    given, or all (``ids`` None). An id not found, or none given, is an ``io.InputError``."""
    found = find_training_cases([Path(root) / "brats-labeled", Path(root) / "brats-labeled-extra"])
    if ids is None:
        return found
    wanted = [c.strip() for c in ids.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in found] or ([] if wanted else ["(none given)"])
    if unknown:
        raise io.InputError(f"not labelled cases of {root}: {', '.join(unknown)}")
    return {c: found[c] for c in wanted}


def select(cases: Sequence[CachedCase], case_ids: Sequence[str],
           planes: Sequence[str] = ("axial",)) -> list[CachedCase]:
    """The cached cases of ``case_ids`` in each of ``planes``, in that order; a case or plane
    missing from the cache is an error."""
    by_key = {(c.case_id, c.plane): c for c in cases}
    missing = [f"{i} ({p})" for i in case_ids for p in planes if (i, p) not in by_key]
    if missing:
        raise io.InputError(f"not in the training cache: {', '.join(missing[:5])}")
    return [by_key[i, p] for i in case_ids for p in planes]


def split_cases(
    case_ids: Sequence[str], val_cases: Sequence[str] = (), val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[str], list[str]]:
    """Split case ids into (train, validation), by case, never by slice."""
    ids = sorted(case_ids)
    if val_cases:
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise ValueError(
                f"validation cases not among the {len(ids)} cases found: {', '.join(unknown)} "
                f"(known: {io.names_text(ids, 5)})")
        val = sorted(set(val_cases))
    else:
        n_val = round(len(ids) * val_fraction)
        if val_fraction > 0:
            n_val = min(max(n_val, 1), len(ids) - 1)
        val = sorted(np.random.default_rng(seed).permutation(ids)[:n_val].tolist())
    train = [i for i in ids if i not in val]
    if not train:
        raise ValueError("no training cases left after the validation split")
    return train, val


def kfold(case_ids: Sequence[str], fold: int, folds: int, seed: int = 0) -> list[str]:
    """The validation cases of ``fold`` (0-based) in a ``folds``-fold split by case."""
    if folds < 2:  # one fold would validate on every case and train on none
        raise ValueError(f"fold {fold} of {folds}: a k-fold split needs at least 2 folds (one "
                         "validates, the others train)")
    if not 0 <= fold < folds:
        raise ValueError(f"fold {fold} of {folds}: the fold index counts from 0, so it must be "
                         + (f"below {folds}" if fold >= 0 else "0 or more"))
    if folds > len(case_ids):
        raise ValueError(f"fold {fold} of {folds}: a {folds}-fold split needs at least {folds} "
                         f"cases, found {len(case_ids)}")
    order = np.random.default_rng(seed).permutation(sorted(case_ids))
    return sorted(order[fold::folds].tolist())


def is_cache(path: Path) -> bool:
    """Whether ``path`` is a cache folder written by ``build_cache``."""
    return any(Path(path).glob("*_images.npy"))


def open_cache(cache_dir: Path) -> list[CachedCase]:
    """Every complete entry of a cache folder (those whose JSON marker was written), one
    ``CachedCase`` per case and plane."""
    ids = sorted(p.stem for p in Path(cache_dir).glob("*.json"))
    if not ids:
        raise io.InputError(f"{cache_dir}: no cached cases")
    return [c for i in ids for c in load_cached(Path(cache_dir), i)]


class PatchSampler:
    """Random ``patch`` (H, W) crops of cached slices; a share of them centred on tumor."""

    def __init__(
        self, cases: Sequence[CachedCase], patch: tuple[int, int], tumor_share: float = 0.8,
    ) -> None:
        if not cases:
            raise ValueError("no cases to sample from")
        self.cases = list(cases)
        self.patch = patch
        self.tumor_share = tumor_share

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` patches: images (n, 4, H, W) uint8 codes, classes (n, H, W) uint8."""
        ph, pw = self.patch
        images = np.full((n, 4, ph, pw), QUANT_OFFSET, np.uint8)
        classes = np.zeros((n, ph, pw), np.uint8)
        for i in range(n):
            case = self.cases[rng.integers(len(self.cases))]
            tumor = rng.random() < self.tumor_share and len(case.tumor_slices) > 0
            z = case.tumor_slices[rng.integers(len(case.tumor_slices))] if tumor else (
                rng.integers(len(case.classes)))
            cls = case.classes[z]
            h, w = cls.shape
            if tumor:  # centre on a random tumor voxel, with jitter
                ys, xs = np.nonzero(cls)
                j = rng.integers(len(ys))
                cy = ys[j] + rng.integers(-ph // 4, ph // 4 + 1)
                cx = xs[j] + rng.integers(-pw // 4, pw // 4 + 1)
            else:
                cy, cx = rng.integers(h), rng.integers(w)
            y0 = int(np.clip(cy - ph // 2, min(0, h - ph), max(0, h - ph)))
            x0 = int(np.clip(cx - pw // 2, min(0, w - pw), max(0, w - pw)))
            sy = slice(max(y0, 0), min(y0 + ph, h))
            sx = slice(max(x0, 0), min(x0 + pw, w))
            dy, dx = sy.start - y0, sx.start - x0
            images[i, :, dy : dy + sy.stop - sy.start, dx : dx + sx.stop - sx.start] = (
                case.images[z][:, sy, sx])
            classes[i, dy : dy + sy.stop - sy.start, dx : dx + sx.stop - sx.start] = cls[sy, sx]
        return images, classes


def augment_matrices(n: int, generator, device=None, *, rotate_deg: float = 10.0,
                     scale: float = 0.1):
    """``n`` random affine matrices ``(n, 2, 3)`` for ``affine_grid``: a flip of each of the
    slice's two axes (each with probability 1/2: left-right and front-back on axial slices;
    on coronal and sagittal slices one of them is up-down), then a rotation within
    ±``rotate_deg`` and a zoom within ±``scale``: ``R(angle) @ diag(flip_x, flip_y) / zoom``,
    a scaled orthogonal matrix (never a shear)."""
    import math

    import torch

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=device) * 2 - 1

    angle = uniform(n) * math.radians(rotate_deg)
    zoom = 1 + uniform(n) * scale
    flip_x = torch.where(uniform(n) > 0, 1.0, -1.0)
    flip_y = torch.where(uniform(n) > 0, 1.0, -1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zero = torch.zeros_like(cos)
    return torch.stack([
        torch.stack([cos * flip_x, -sin * flip_y, zero], 1),
        torch.stack([sin * flip_x, cos * flip_y, zero], 1),
    ], 1)


def augment(images, classes, generator, *, rotate_deg: float = 10.0, scale: float = 0.1,
            intensity: float = 0.1, gamma: float = 0.0, low_res: float = 0.0):
    """Augment a batch on its own device, with PyTorch.

    ``images`` (N, C, H, W) float z-scores, ``classes`` (N, H, W) int64. Random flips of the
    slice's two axes, rotation within ±``rotate_deg`` and scaling within ±``scale``
    (``augment_matrices``; bilinear for images, nearest for classes), per-sample,
    per-modality intensity scale and shift within ±``intensity`` (inside the brain only),
    then, where ``gamma`` > 0, a per-sample, per-modality gamma curve (exponent drawn
    log-uniformly in [1 / (1 + gamma), 1 + gamma]) over the slice's brain range, which keeps
    that range but changes the contrast inside it (nnU-Net's gamma augmentation). With
    ``gamma`` 0 no number is drawn for it: the random stream is that of runs before it.
    Last, each sample with probability ``low_res`` is seen at a lower resolution
    (``simulate_low_resolution``; the classes stay sharp), as an image acquired with coarser
    voxels and interpolated to 1 mm is (nnU-Net's SimulateLowResolution); with ``low_res`` 0
    nothing is drawn for it either. Returns new tensors.
    """
    import math

    import torch
    import torch.nn.functional as F

    n, c = images.shape[:2]
    dev = images.device
    theta = augment_matrices(n, generator, dev, rotate_deg=rotate_deg, scale=scale)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    brain = (images != 0).any(dim=1, keepdim=True).to(images.dtype)
    gain = 1 + (torch.rand(n, c, 1, 1, generator=generator, device=dev) * 2 - 1) * intensity
    shift = (torch.rand(n, c, 1, 1, generator=generator, device=dev) * 2 - 1) * intensity
    images = (images * gain + shift) * brain
    if gamma > 0:
        power = torch.exp((torch.rand(n, c, 1, 1, generator=generator, device=dev) * 2 - 1)
                          * math.log1p(gamma))
        inside, big = brain.bool(), torch.finfo(images.dtype).max
        lo = torch.where(inside, images, big).amin(dim=(2, 3), keepdim=True)
        span = (torch.where(inside, images, -big).amax(dim=(2, 3), keepdim=True) - lo
                ).clamp_min(1e-6)  # a slice without brain: any span, zeroed below
        images = (((images - lo) / span).clamp(0, 1) ** power * span + lo) * brain
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    classes = F.grid_sample(classes[:, None].to(images.dtype), grid, mode="nearest",
                            padding_mode="zeros", align_corners=False)[:, 0].round().long()
    if low_res > 0:
        images = simulate_low_resolution(images, generator, low_res)
    return images, classes


def simulate_low_resolution(images, generator, p: float, *, coarsest: float = 0.5):
    """Each sample of ``images`` (N, C, H, W) float, with probability ``p``, averaged down to
    a grid of ``f_h * H`` x ``f_w * W`` pixels (``f_h``, ``f_w`` drawn apart, uniformly in
    [``coarsest``, 1]: voxels up to 1 / ``coarsest`` times larger along each axis) and
    interpolated back linearly, all modalities alike; the background stays 0. Returns a new
    tensor. Why: a 1.5 mm image brought to the network's 1 mm grid is smoother than any
    training slice, and the shipped weights read such slices badly; measured, it gained
    nothing (a run without it read them as well: docs/model-card.md, "Training on slices seen
    at a lower resolution")."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = images.shape
    dev = images.device
    chosen = torch.rand(n, generator=generator, device=dev) < p
    factors = coarsest + torch.rand(n, 2, generator=generator, device=dev) * (1 - coarsest)
    out = images.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        size = (max(1, round(h * factors[i, 0].item())), max(1, round(w * factors[i, 1].item())))
        x = images[i : i + 1]
        low = F.interpolate(x, size=size, mode="area")  # the coarse voxels' mean signal
        out[i] = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0]
        out[i] *= (x[0] != 0).any(dim=0)
    return out
