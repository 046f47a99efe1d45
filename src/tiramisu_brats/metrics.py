"""Segmentation metrics as in the BraTS 2018-2021 challenges.

Bottom floor: imports nothing of this package. Every function is pure and leaves its inputs
unmodified.

Label maps are ``(X, Y, Z)`` integer arrays (normally ``uint8``) with the BraTS 2017-2021
numbering: 0 background, 1 necrotic / non-enhancing tumor core, 2 edema, 4 enhancing tumor.
The evaluated regions are whole tumor WT = {1, 2, 4}, tumor core TC = {1, 4} and enhancing
tumor ET = {4} (:data:`REGIONS`). ``spacing`` is the voxel size in millimetres along X, Y, Z.

Empty-region conventions (BraTS 2018-2021):

- Dice: both masks empty -> 1; exactly one empty -> 0.
- Sensitivity with an empty reference: 1 if the prediction is empty too, else 0.
- Specificity with no reference negatives (reference fills the volume): 1.
- HD95: both empty -> 0 mm; exactly one empty -> :data:`HD95_EMPTY` (373.13 mm, the diagonal
  of the 240 x 240 x 155 mm BraTS volume).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "HD95_EMPTY",
    "LABELS",
    "METRIC_COLUMNS",
    "REGIONS",
    "Confusion",
    "dice",
    "evaluate_case",
    "hd95",
    "region_dice",
    "region_mask",
    "sensitivity",
    "specificity",
    "surface_voxels",
    "volumes_ml",
]

REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
"""Evaluated tumor regions and the labels each one unites."""

HD95_EMPTY: float = 373.13
"""HD95 in mm when exactly one of prediction and reference is empty (BraTS convention)."""

_REGION_NAMES = tuple(REGIONS)

METRIC_COLUMNS: list[str] = [
    *(f"dice_{r}" for r in _REGION_NAMES),
    *(f"sensitivity_{r}" for r in _REGION_NAMES),
    *(f"specificity_{r}" for r in _REGION_NAMES),
    *(f"hd95_{r}" for r in _REGION_NAMES),
    *(f"volume_pred_{r}_ml" for r in _REGION_NAMES),
    *(f"volume_ref_{r}_ml" for r in _REGION_NAMES),
]
"""Keys of :func:`evaluate_case`, in this order (the column order of the metrics CSV)."""

# 6-connected cross used for the surface erosion (as the official BraTS evaluation).
_CROSS = ndimage.generate_binary_structure(3, 1)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    try:
        sp = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        sp = ()
    if len(sp) != ndim or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers, got {spacing!r}")
    return sp


LABELS = (0, 1, 2, 4)
"""The label values the metrics take (BraTS 2023's enhancing 3 is 4 here:
``io.from_convention``)."""


def _label_counts(labels: np.ndarray, name: str) -> dict[int, int]:
    """How many voxels of ``labels`` hold each value present, refused where one is not in
    :data:`LABELS`."""
    lab = np.asarray(labels)
    # A pass per allowed value (4 ms for a BraTS volume; np.bincount takes 46 ms, np.unique
    # 25 ms); only where some voxels are left over is it worth naming their values.
    counts = {v: int(np.count_nonzero(lab == v)) for v in LABELS}
    if sum(counts.values()) != lab.size:
        present = np.unique(lab).tolist()
        bad = [v for v in present if v not in LABELS]
        raise ValueError(f"{name}: label values {bad[:10]} are not among 0/1/2/4 (BraTS 2023's "
                         "enhancing tumor 3 is 4 here)")
    return {v: n for v, n in counts.items() if n}


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """``labels`` as an array, refused where it holds a value not in :data:`LABELS`."""
    lab = np.asarray(labels)
    _label_counts(lab, name)
    return lab


def _check_same_shape(pred: np.ndarray, ref: np.ndarray) -> None:
    if np.shape(pred) != np.shape(ref):
        raise ValueError(
            f"prediction and reference shapes differ: {np.shape(pred)} vs {np.shape(ref)}"
        )


def region_mask(labels: np.ndarray, region: str | Iterable[int]) -> np.ndarray:
    """Boolean mask of a region.

    Args:
        labels: ``(X, Y, Z)`` integer label map (0/1/2/4).
        region: a key of :data:`REGIONS` (``"WT"``, ``"TC"``, ``"ET"``) or the labels to unite.

    Returns:
        ``bool`` array of the same shape as ``labels``; a new array.
    """
    if isinstance(region, str):
        try:
            values = REGIONS[region]
        except KeyError:
            raise ValueError(
                f"unknown region {region!r}; expected one of {', '.join(REGIONS)}"
            ) from None
    else:
        values = tuple(int(v) for v in region)
    return np.isin(np.asarray(labels), values)


@dataclass(frozen=True)
class Confusion:
    """Voxel counts of a binary prediction against a binary reference."""

    tp: int
    fp: int
    fn: int
    tn: int

    @classmethod
    def from_masks(cls, pred: np.ndarray, ref: np.ndarray) -> Confusion:
        """Count from two same-shape masks (any dtype; nonzero means foreground)."""
        _check_same_shape(pred, ref)
        p = np.asarray(pred, dtype=bool)
        r = np.asarray(ref, dtype=bool)
        tp = int(np.count_nonzero(p & r))
        n_pred = int(np.count_nonzero(p))
        n_ref = int(np.count_nonzero(r))
        fp = n_pred - tp
        fn = n_ref - tp
        tn = int(p.size) - tp - fp - fn
        return cls(tp=tp, fp=fp, fn=fn, tn=tn)

    @property
    def dice(self) -> float:
        """2 TP / (2 TP + FP + FN); 1 when both masks are empty, 0 when only one is."""
        denom = 2 * self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else 2.0 * self.tp / denom

    @property
    def sensitivity(self) -> float:
        """TP / (TP + FN); with an empty reference 1 if the prediction is empty too, else 0."""
        denom = self.tp + self.fn
        if denom == 0:
            return 1.0 if self.fp == 0 else 0.0
        return self.tp / denom

    @property
    def specificity(self) -> float:
        """TN / (TN + FP); 1 when the reference has no negatives (TN + FP = 0)."""
        denom = self.tn + self.fp
        return 1.0 if denom == 0 else self.tn / denom


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two same-shape binary masks (see :attr:`Confusion.dice`)."""
    return Confusion.from_masks(pred, ref).dice


def region_dice(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice of each region of :data:`REGIONS` (WT, TC, ET) between two label maps."""
    pred, ref = _check_labels(pred, "prediction"), _check_labels(ref, "reference")
    return {r: dice(region_mask(pred, r), region_mask(ref, r)) for r in REGIONS}


def sensitivity(pred: np.ndarray, ref: np.ndarray) -> float:
    """Sensitivity of two same-shape binary masks (see :attr:`Confusion.sensitivity`)."""
    return Confusion.from_masks(pred, ref).sensitivity


def specificity(pred: np.ndarray, ref: np.ndarray) -> float:
    """Specificity of two same-shape binary masks (see :attr:`Confusion.specificity`)."""
    return Confusion.from_masks(pred, ref).specificity


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Surface of a binary mask: the mask minus its erosion by the 6-connected cross.

    Voxels outside the array count as background, so a mask touching the array border has
    surface there. Returns a new ``bool`` array of the mask's shape.
    """
    m = np.asarray(mask, dtype=bool)
    cross = _CROSS if m.ndim == 3 else ndimage.generate_binary_structure(m.ndim, 1)
    return m & ~ndimage.binary_erosion(m, structure=cross, border_value=0)


def _bbox_crop(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union, padded by one background voxel."""
    sl = ndimage.find_objects((pred | ref).view(np.uint8))[0]
    return np.pad(pred[sl], 1), np.pad(ref[sl], 1)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile Hausdorff distance in mm between two binary masks (official BraTS).

    Surface voxels (:func:`surface_voxels`) of each mask get their Euclidean distance (in mm,
    with ``spacing``) to the nearest surface voxel of the other mask; both directions are pooled
    and the 95th percentile (linear interpolation, ``np.percentile`` default) is returned.
    Both masks empty -> 0.0; exactly one empty -> :data:`HD95_EMPTY`.

    The distance transforms run only in the joint bounding box of both masks plus one
    background voxel, which gives exactly the full-volume result.

    Args:
        pred, ref: same-shape masks ``(X, Y, Z)`` (any dtype; nonzero is foreground).
        spacing: voxel size in mm, one number per axis.
    """
    _check_same_shape(pred, ref)
    p = np.asarray(pred, dtype=bool)
    r = np.asarray(ref, dtype=bool)
    sp = _check_spacing(spacing, p.ndim)
    p_any, r_any = bool(p.any()), bool(r.any())
    if not p_any and not r_any:
        return 0.0
    if not p_any or not r_any:
        return HD95_EMPTY
    p, r = _bbox_crop(p, r)
    p_surf = surface_voxels(p)
    r_surf = surface_voxels(r)
    # Distance of every voxel to the nearest surface voxel of the other mask.
    dist_to_r = ndimage.distance_transform_edt(~r_surf, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~p_surf, sampling=sp)
    distances = np.concatenate([dist_to_r[p_surf], dist_to_p[r_surf]])
    return float(np.percentile(distances, 95))


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """All metrics of one case, keyed by :data:`METRIC_COLUMNS` (in that order).

    Args:
        pred, ref: ``(X, Y, Z)`` label maps (0/1/2/4) of the same shape.
        spacing: voxel size in mm along X, Y, Z.

    Returns:
        Dice, sensitivity, specificity, HD95 (mm) per region and predicted / reference region
        volumes in ml, all as Python floats.
    """
    _check_same_shape(pred, ref)
    pred, ref = _check_labels(pred, "prediction"), _check_labels(ref, "reference")
    sp = _check_spacing(spacing, np.ndim(pred))
    voxel_ml = float(np.prod(sp)) / 1000.0
    out: dict[str, float] = {}
    for region in REGIONS:
        p = region_mask(pred, region)
        r = region_mask(ref, region)
        c = Confusion.from_masks(p, r)
        out[f"dice_{region}"] = c.dice
        out[f"sensitivity_{region}"] = c.sensitivity
        out[f"specificity_{region}"] = c.specificity
        out[f"hd95_{region}"] = hd95(p, r, sp)
        out[f"volume_pred_{region}_ml"] = (c.tp + c.fp) * voxel_ml
        out[f"volume_ref_{region}_ml"] = (c.tp + c.fn) * voxel_ml
    return {k: float(out[k]) for k in METRIC_COLUMNS}


def volumes_ml(labels: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Per-label and per-region volumes in ml of one label map.

    Args:
        labels: ``(X, Y, Z)`` label map (0/1/2/4).
        spacing: voxel size in mm along X, Y, Z.

    Returns:
        ``necrosis_ml`` (label 1), ``edema_ml`` (2), ``enhancing_ml`` (4), ``WT_ml``, ``TC_ml``,
        ``ET_ml`` as Python floats.
    """
    lab = np.asarray(labels)
    counts = _label_counts(lab, "labels")  # the check and the counts in one pass
    sp = _check_spacing(spacing, lab.ndim)
    voxel_ml = float(np.prod(sp)) / 1000.0
    n1, n2, n4 = (int(counts.get(v, 0)) for v in (1, 2, 4))
    return {
        "necrosis_ml": n1 * voxel_ml,
        "edema_ml": n2 * voxel_ml,
        "enhancing_ml": n4 * voxel_ml,
        "WT_ml": (n1 + n2 + n4) * voxel_ml,
        "TC_ml": (n1 + n4) * voxel_ml,
        "ET_ml": n4 * voxel_ml,
    }
