"""Clean up a predicted label map, as in the reference Tiramisu BraTS paper.

Two steps on the whole-tumor mask (``labels > 0``):

1. morphological closing with a 3D ball (radius ``closing_radius`` voxels; radius 1 is the
   6-neighbour cross), which fills small holes and gaps; the voxels it adds take the label of
   the nearest originally labelled tumor voxel;
2. connected components (26-connectivity) of the closed mask: the main tumor (the largest
   component) and every component holding at least ``keep_fraction`` of its voxels are kept,
   the rest (small false-positive specks) is dropped.

All the work happens inside the tumor's bounding box (the nearest-label search only around
the added voxels), so a full 240 x 240 x 155 volume takes well under a second (typically
below 0.1 s). Pure function: the input is never
modified. Imports nothing of this package.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

LABELS = (0, 1, 2, 4)
"""Label values allowed in and produced by :func:`postprocess` (BraTS 2017-2021 numbering)."""


def ball(radius: int) -> np.ndarray:
    """A 3D Euclidean ball structuring element, ``(2r+1,)*3`` bool; radius 1 is the cross."""
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def _check_labels(labels: np.ndarray) -> None:
    """Raise ``ValueError`` unless ``labels`` is a 3D integer map with values in ``LABELS``."""
    if labels.ndim != 3:
        raise ValueError(f"expected a label map (X, Y, Z), got shape {labels.shape}")
    if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"expected an integer label map, got dtype {labels.dtype}")
    if labels.size == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > max(LABELS):
        raise ValueError(f"label values must be in {LABELS}, found values in [{lo}, {hi}]")
    # One comparison per value missing from LABELS in [lo, hi] (just 3): no wide copy.
    bad = [v for v in range(lo, hi + 1) if v not in LABELS and np.any(labels == v)]
    if bad:
        raise ValueError(f"label values must be in {LABELS}, found {bad}")


def bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` (which must hold a voxel) grown by ``margin``."""
    box = ndi.find_objects(mask.view(np.uint8))[0]  # bool seen as 0/1 labels, no copy
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n))
                 for s, n in zip(box, mask.shape, strict=True))


def _binary_closing(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """Closing of ``mask`` by the symmetric odd-sized ``structure``, as on an infinite grid:
    on a copy padded by twice the structure's radius, so that tumor touching the border is
    not eroded away. Returns a new bool array of ``mask``'s shape."""
    r = structure.shape[0] // 2
    closed = ndi.binary_closing(np.pad(mask, 2 * r), structure)
    return closed[tuple(slice(2 * r, n + 2 * r) for n in mask.shape)]


def _nearest_labels(
    labels: np.ndarray, seeds: np.ndarray, targets: np.ndarray, margin: int
) -> np.ndarray:
    """Label of the nearest ``seeds`` voxel for each ``targets`` voxel (in C order).

    ``labels`` ``(X, Y, Z)`` uint8, ``seeds`` and ``targets`` same-shape bool, ``seeds``
    non-empty. The distance transform runs only on the box around the targets grown by
    ``margin``; that is exact whenever every target's nearest seed in the box is at most
    ``margin`` away (a seed outside the box is farther), else the whole array is used.
    """
    box = bounding_box(targets, margin)
    for region in (box, (slice(None),) * labels.ndim):
        sub_seeds = seeds[region]
        if not sub_seeds.any():
            continue
        dist, nearest = ndi.distance_transform_edt(~sub_seeds, return_indices=True)
        where = np.nonzero(targets[region])
        if dist[where].max() <= margin or region[0] == slice(None):
            return labels[region][tuple(ix[where] for ix in nearest)]
    raise AssertionError("unreachable: seeds is empty")  # pragma: no cover


def postprocess(
    labels: np.ndarray, *, closing_radius: int = 1, keep_fraction: float = 0.1
) -> np.ndarray:
    """Close the whole-tumor mask and drop small disconnected components.

    Args:
        labels: predicted label map ``(X, Y, Z)``, any integer dtype (normally ``uint8``),
            values in {0, 1, 2, 4}. Not modified.
        closing_radius: radius in voxels of the ball used for the morphological closing of
            the whole-tumor mask; 0 disables the closing.
        keep_fraction: a connected component (26-connectivity, of the closed mask) is kept
            when it has at least ``keep_fraction`` times the voxels of the largest one;
            0 keeps every component, 1 keeps only the largest (and any tied with it).

    Returns:
        A new ``uint8`` label map of the same shape ``(X, Y, Z)`` with values in {0, 1, 2, 4}.
        Tumor only where the closed mask has it; voxels kept from the input keep their label,
        voxels added by the closing get the label of the nearest kept input tumor voxel.

    Raises:
        ValueError: wrong shape or dtype, unknown label values, or bad parameters.
    """
    _check_labels(labels)
    if int(closing_radius) != closing_radius or closing_radius < 0:
        raise ValueError(f"closing_radius must be an integer >= 0, got {closing_radius}")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction}")
    radius = int(closing_radius)

    out = np.zeros(labels.shape, dtype=np.uint8)
    tumor = labels > 0
    if not tumor.any():
        return out

    # The closing never leaves the bounding box of what it closes, so all the work happens
    # inside the tumor's bounding box.
    box_t = bounding_box(tumor, 0)
    orig = labels[box_t].astype(np.uint8)  # a copy: the input is never touched
    mask = orig > 0
    closed = _binary_closing(mask, ball(radius)) | mask if radius > 0 else mask

    components, n = ndi.label(closed, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(components[closed], minlength=n + 1)  # only tumor voxels: fast
    keep_ids = sizes >= keep_fraction * sizes.max()
    keep_ids[0] = False
    kept = keep_ids[components]

    seeds = mask & kept  # input tumor voxels that survive
    result = orig * seeds
    added = kept & ~mask
    if added.any():
        result[added] = _nearest_labels(orig, seeds, added, margin=2 * radius + 2)
    out[box_t] = result
    return out
