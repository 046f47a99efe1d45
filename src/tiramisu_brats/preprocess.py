"""From a volume to the network's axial slices, and exactly back.

A case ``(C, X, Y, Z)`` becomes a batch of axial slices ``(Z', C, H, W)``: only the slices
``z0:z1`` that hold brain, each cropped to a window around the brain's bounding box (``H`` along
the longer in-plane brain extent, 192 by default; ``W`` along the shorter, 160), each modality
z-scored over its own brain (nonzero) voxels, background 0. ``Geometry`` records everything
needed to put a prediction back on the input grid with ``uncrop``. ``brain_windows`` gives
each slice the smaller window around its own brain that the network needs to see.

Pure functions: inputs are never modified.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CROP = (192, 160)
MULTIPLE = 32
PLANES = ("axial", "coronal", "sagittal")
# The volume axes (X, Y, Z) in the order that puts each plane's normal last: the network's
# slices are always taken along the last axis (BraTS: X left-right, Y front-back, Z up-down).
_PLANE_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
MARGIN = 8  # pixels of background around each slice's brain window
# What one more distinct window size is taken to cost, in pixels of brain slices (two
# 192 x 160 slices): a runtime prepares its kernels for each new input shape, so windows of a
# size few slices share are grown to a larger size in use (chosen among 0, 30,000, 60,000 and
# 120,000 on four cases: docs/benchmarks.md, "Fewer window sizes").
SHAPE_COST = 60_000


@dataclass(frozen=True)
class Geometry:
    """Where the slices came from on the input grid ``shape`` (X, Y, Z).

    The crop window starts at ``(x0, y0)`` (negative or past the edge means zero padding) and
    spans ``size_x`` by ``size_y`` voxels; ``h_is_x`` says whether the slice's H axis runs along
    X (else along Y); slices ``z0:z1`` were kept.
    """

    shape: tuple[int, int, int]
    x0: int
    y0: int
    size_x: int
    size_y: int
    z0: int
    z1: int
    h_is_x: bool

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(H, W) of one slice."""
        return (self.size_x, self.size_y) if self.h_is_x else (self.size_y, self.size_x)

    @property
    def n_slices(self) -> int:
        """How many slices were kept (``z1 - z0``)."""
        return self.z1 - self.z0


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _grow(extent: int, size: int, multiple: int) -> int:
    """The crop size: ``size``, or the next multiple of ``multiple`` that holds ``extent``."""
    return size if extent <= size else _round_up(extent, multiple)


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels nonzero in any modality: ``(C, X, Y, Z)`` → ``(X, Y, Z)`` bool."""
    return _any_nonzero(image, axis=0)


def _any_nonzero(array: np.ndarray, axis: int) -> np.ndarray:
    """``np.any(array != 0, axis)`` without the full-size bool temporary."""
    parts = np.moveaxis(array, axis, 0)
    mask = parts[0] != 0
    for part in parts[1:]:
        mask |= part != 0
    return mask


# --------------------------------------------------------------------------------------------
# The input's grid and the network's: orientation and voxel size

# The orientation the model was trained in, the BraTS one: array axes X, Y, Z run towards
# left, posterior and superior (nibabel's axis codes name where each axis points).
TRAINED_AXES = ("L", "P", "S")
SPACING_TOLERANCE = 0.05  # mm: an axis within this of 1 mm is not resampled
# In-plane voxels (X and Y of the axial slices) coarser than 1 mm up to this size are kept as
# they are: brought to 1 mm they are smoother than any slice the network trained on, and on the
# validation cases at 1.5 x 1.5 x 1 mm it did far better on them as they are (mean Dice fast
# 0.700 against 0.628, accurate 0.750 against 0.687; at 2 mm in-plane and along a 3 mm slice
# axis both ways alike, at 0.5 mm resampling far better: docs/model-card.md, "Resampled inputs").
KEEP_IN_PLANE_MM = 1.5
# Voxel sizes no MRI of a head has: a header in other units, or a wrong affine (resampling to
# 1 mm would make a grid of a few voxels, or one too large for memory). Axes kept as they are
# take no memory beyond the input's: only resampled axes are held to MAX_AXIS_MM.
MIN_VOXEL_MM = 0.05
MAX_AXIS_MM = 512
# Beyond this angle between the image axes and the closest scanner axes, the slices the
# network sees are tilted more than its training's in-plane rotations (±10°) covered.
OBLIQUE_WARNING_DEG = 10.0


@dataclass(frozen=True)
class Grid:
    """How an input grid of ``shape`` (X, Y, Z) maps onto the network's grid: flips and an axis
    permutation to ``TRAINED_AXES`` (``transform``, nibabel's ``ornt`` of the input axes), then,
    where the voxels are not 1 mm, linear resampling to ``network_shape`` (1 mm, but for
    in-plane axes of up to ``KEEP_IN_PLANE_MM``, kept: ``network_spacing``).

    ``axes``: the input's axis codes (closest axis orientation); ``oblique_deg``: how far the
    input axes are from those; ``spacing``: the voxel size in mm along the input axes.
    """

    shape: tuple[int, int, int]
    transform: tuple[tuple[int, int], ...]
    axes: tuple[str, str, str]
    oblique_deg: float
    spacing: tuple[float, float, float]
    network_shape: tuple[int, int, int]

    @property
    def resampled(self) -> bool:
        """Whether the network's grid is a resampled one (else only flips and permutations)."""
        return self._oriented_shape() != self.network_shape

    def _oriented_shape(self) -> tuple[int, int, int]:
        out = [0, 0, 0]
        for n, (axis, _) in zip(self.shape, self.transform, strict=True):
            out[axis] = n
        return tuple(out)  # type: ignore[return-value]

    def oriented_spacing(self) -> tuple[float, float, float]:
        """The voxel size in mm along the network's axes (X, Y, Z), before resampling."""
        out = [0.0, 0.0, 0.0]
        for z, (axis, _) in zip(self.spacing, self.transform, strict=True):
            out[axis] = z
        return tuple(out)  # type: ignore[return-value]

    def unlike_training(self) -> bool:
        """Whether the network sees voxels of a size it was not meant to: an axis kept as it
        is (not resampled) that is not 1 mm, nor an in-plane one of up to
        ``KEEP_IN_PLANE_MM`` (``network_grid(resample=False)``)."""
        return any(n == m and not _kept(axis, z)
                   for axis, (n, m, z) in enumerate(zip(self._oriented_shape(),
                                                         self.network_shape,
                                                         self.oriented_spacing(), strict=True)))

    def network_spacing(self) -> tuple[float, float, float]:
        """The voxel size in mm the network sees along X, Y, Z (the corner voxels of both grids
        on each other)."""
        return tuple(z * (n - 1) / (m - 1) if m > 1 and n > 1 else z for z, n, m in zip(
            self.oriented_spacing(), self._oriented_shape(), self.network_shape,
            strict=True))  # type: ignore[return-value]


def _kept(axis: int, spacing: float) -> bool:
    """Whether ``network_grid`` keeps the voxels along the network's ``axis`` (0, 1, 2: X, Y,
    Z) as they are: within ``SPACING_TOLERANCE`` of 1 mm, or in-plane of 1 to
    ``KEEP_IN_PLANE_MM`` mm."""
    return (abs(spacing - 1) <= SPACING_TOLERANCE
            or (axis < 2 and 1 <= spacing <= KEEP_IN_PLANE_MM + SPACING_TOLERANCE))


def network_grid(affine: np.ndarray, shape: tuple[int, int, int], resample: bool = True
                 ) -> Grid:
    """The ``Grid`` of an input of spatial ``shape`` with voxel-to-world ``affine`` (4, 4).

    Along each axis, voxels not within ``SPACING_TOLERANCE`` of 1 mm are resampled to 1 mm,
    but for in-plane axes (X, Y) of 1 to ``KEEP_IN_PLANE_MM`` mm, which are kept.
    ``resample=False`` keeps the input's voxels whatever their size (orientation only).
    """
    import nibabel.orientations as nio  # here: the slicing functions need NumPy alone

    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"an affine is a (4, 4) voxel-to-world matrix, got shape "
                         f"{affine.shape}")
    linear = affine[:3, :3]
    spacing = np.sqrt((linear**2).sum(axis=0))
    if not np.all(np.isfinite(affine)) or np.any(spacing == 0):
        raise ValueError(f"the affine {affine.tolist()} does not map voxels to space")
    ornt = nio.io_orientation(affine)
    axes = tuple(nio.ornt2axcodes(ornt))
    transform = nio.ornt_transform(ornt, nio.axcodes2ornt(TRAINED_AXES))
    # Angle between each image axis and the scanner axis it was matched to.
    cosines = np.abs(linear / spacing)[ornt[:, 0].astype(int), range(3)]
    oblique = float(np.degrees(np.arccos(np.clip(cosines, -1, 1))).max())
    grid = Grid(tuple(int(n) for n in shape), tuple((int(a), int(f)) for a, f in transform),
                axes, round(oblique, 2), tuple(float(z) for z in spacing), (0, 0, 0))
    oriented = grid._oriented_shape()
    if resample:  # axis by axis
        sizes = "x".join(f"{z:.4g}" for z in spacing)
        if spacing.min() < MIN_VOXEL_MM:
            raise ValueError(f"voxels of {sizes} mm (from the affine) are implausibly small "
                             f"for an MRI (under {MIN_VOXEL_MM} mm)")
        target = tuple(n if _kept(axis, z) else max(1, round(n * z))
                       for axis, (n, z) in enumerate(zip(oriented, grid.oriented_spacing(),
                                                         strict=True)))
        if any(m > MAX_AXIS_MM and m != n for m, n in zip(target, oriented, strict=True)):
            raise ValueError(f"voxels of {sizes} mm (from the affine) on a {grid.shape} grid "
                             f"span {'x'.join(f'{n * z:.0f}' for n, z in zip(grid.shape, spacing))}"
                             f" mm, implausibly large for a head (at most {MAX_AXIS_MM} mm per "
                             "axis at 1 mm)")
    else:
        target = oriented
    return Grid(grid.shape, grid.transform, axes, grid.oblique_deg, grid.spacing, target)


def _apply(volume: np.ndarray, transform) -> np.ndarray:
    import nibabel.orientations as nio  # as in network_grid

    spatial = np.moveaxis(volume, (-3, -2, -1), (0, 1, 2))
    return np.moveaxis(nio.apply_orientation(spatial, np.asarray(transform, float)),
                       (0, 1, 2), (-3, -2, -1))


def to_network(volume: np.ndarray, grid: Grid) -> np.ndarray:
    """``volume`` ``(..., X, Y, Z)`` on the input grid → on the network's grid: a view
    (flips and a permutation), or where ``grid.resampled`` a new float32 array, linearly
    interpolated (scipy.ndimage.zoom; the grids' corner voxels coincide)."""
    if volume.shape[-3:] != grid.shape:
        raise ValueError(f"volume shape {volume.shape[-3:]} does not match the grid's "
                         f"{grid.shape}")
    oriented = _apply(volume, grid.transform)
    return _zoom(oriented, grid.network_shape) if grid.resampled else oriented


def _zoom(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """``volume`` ``(..., X, Y, Z)`` linearly resampled to ``(..., *shape)`` float32, channel
    by channel, the corner voxels of both grids on each other."""
    from scipy import ndimage

    # zoom gives round(n * m / n) = m voxels, with its corner voxels on the input's corners;
    # "nearest": the last voxel's coordinate can land a rounding error past the input's last,
    # which "constant" fills with 0 (a plane of probabilities 0 for every class)
    factors = [m / n for n, m in zip(volume.shape[-3:], shape, strict=True)]
    flat = volume.reshape(-1, *volume.shape[-3:])
    out = np.empty((len(flat), *shape), np.float32)
    for i, channel in enumerate(flat):
        out[i] = ndimage.zoom(channel.astype(np.float32), factors, order=1, grid_mode=False,
                              mode="nearest")
    return out.reshape(*volume.shape[:-3], *shape)


def to_input(values: np.ndarray, grid: Grid, linear: bool = False) -> np.ndarray:
    """The inverse of ``to_network`` for a map ``(..., X', Y', Z')`` on the network's grid:
    back on the input grid ``(..., X, Y, Z)``, each input voxel taking the value of the
    nearest network voxel (exact for flips and permutations), or with ``linear`` (for
    probabilities) linearly interpolated, as float32."""
    if values.shape[-3:] != grid.network_shape:
        raise ValueError(f"map shape {values.shape[-3:]} does not match the network grid's "
                         f"{grid.network_shape}")
    if grid.resampled and linear:
        values = _zoom(values, grid._oriented_shape())
    elif grid.resampled:
        oriented = grid._oriented_shape()
        index = [np.clip(np.rint(np.arange(n) * ((m - 1) / (n - 1) if n > 1 else 0)), 0, m - 1)
                 .astype(np.intp) for n, m in zip(oriented, grid.network_shape, strict=True)]
        values = values[(..., *np.ix_(*index))]
    back = [(0, 0)] * 3
    for axis, (new, flip) in enumerate(grid.transform):
        back[new] = (axis, flip)
    return np.ascontiguousarray(_apply(values, back))


def _plane_axes(plane: str) -> tuple[int, int, int]:
    """The volume axes that become ``plane``'s rows, columns and slice index."""
    if plane not in _PLANE_AXES:
        raise ValueError(f"unknown plane {plane!r}: choose one of {', '.join(PLANES)}")
    return _PLANE_AXES[plane]


def to_plane(volume: np.ndarray, plane: str) -> np.ndarray:
    """A view of ``volume`` ``(..., X, Y, Z)`` with the normal of ``plane`` (one of ``PLANES``)
    as its last axis, so that ``preprocess`` of it gives that plane's slices (no copy)."""
    n = volume.ndim - 3
    return volume.transpose(*range(n), *(n + a for a in _plane_axes(plane)))


def plane_box(box: tuple[slice, slice, slice], plane: str) -> tuple[slice, slice, slice]:
    """``box`` (slices of X, Y, Z) as ``to_plane`` sees it: the same voxels of the view."""
    a, b, c = _plane_axes(plane)
    return box[a], box[b], box[c]


def box_slices(geometry: Geometry, box: tuple[slice, slice, slice]) -> slice:
    """Which of ``geometry``'s slices (indices into ``Z'``) lie in the Z range of ``box``."""
    lo = min(max(box[2].start, geometry.z0), geometry.z1)
    return slice(lo - geometry.z0, max(min(box[2].stop, geometry.z1), lo) - geometry.z0)


def from_plane(volume: np.ndarray, plane: str) -> np.ndarray:
    """The inverse of ``to_plane``: back to ``(..., X, Y, Z)`` (a view)."""
    n = volume.ndim - 3
    inverse = np.argsort(_plane_axes(plane))
    return volume.transpose(*range(n), *(n + int(a) for a in inverse))


def compute_geometry(
    image: np.ndarray, crop: tuple[int, int] = CROP, multiple: int = MULTIPLE
) -> Geometry:
    """The crop window and brain slices for ``image`` ``(C, X, Y, Z)``.

    ``crop`` is (long, short): the long side goes along the longer in-plane brain extent. A
    brain larger than the crop grows the window to the next multiple of ``multiple`` rather
    than being cut.
    """
    if image.ndim != 4:
        raise ValueError(f"expected a volume (C, X, Y, Z), got shape {image.shape}")
    mask = brain_mask(image)
    shape = tuple(int(s) for s in mask.shape)
    if not mask.any():
        raise ValueError("the volume holds no brain: every voxel is 0 in every modality")
    from scipy import ndimage  # here: `segment` pays the import in its reading thread

    box = ndimage.find_objects(mask.view(np.uint8))[0]
    lo, hi = [s.start for s in box], [s.stop for s in box]
    ext_x, ext_y = hi[0] - lo[0], hi[1] - lo[1]
    h_is_x = ext_x > ext_y
    long, short = crop
    size_x = _grow(ext_x, long if h_is_x else short, multiple)
    size_y = _grow(ext_y, short if h_is_x else long, multiple)
    # Centre the window on the brain's bounding box.
    x0 = (lo[0] + hi[0]) // 2 - size_x // 2
    y0 = (lo[1] + hi[1]) // 2 - size_y // 2
    return Geometry(shape, x0, y0, size_x, size_y, lo[2], hi[2], h_is_x)


def extract(volume: np.ndarray, geometry: Geometry, dtype: npt.DTypeLike = None
            ) -> np.ndarray:
    """Cut the slices out of ``volume`` ``(..., X, Y, Z)`` → ``(Z', ..., H, W)``, of ``dtype``
    (default: the volume's).

    Parts of the window outside the volume are zero.
    """
    g = geometry
    if volume.shape[-3:] != g.shape:
        raise ValueError(f"volume shape {volume.shape[-3:]} does not match geometry {g.shape}")
    lead = volume.shape[:-3]
    out = np.zeros((g.n_slices, *lead, *g.slice_shape),
                   dtype=volume.dtype if dtype is None else dtype)
    sx = slice(max(g.x0, 0), min(g.x0 + g.size_x, g.shape[0]))
    sy = slice(max(g.y0, 0), min(g.y0 + g.size_y, g.shape[1]))
    # (..., X, Y, Z) → (Z, ..., H, W), copied straight into place
    n = len(lead)
    order = (n + 2, *range(n), n, n + 1) if g.h_is_x else (n + 2, *range(n), n + 1, n)
    wx = slice(sx.start - g.x0, sx.stop - g.x0)
    wy = slice(sy.start - g.y0, sy.stop - g.y0)
    window = (..., wx, wy) if g.h_is_x else (..., wy, wx)
    out[window] = volume[..., sx, sy, g.z0 : g.z1].transpose(order)
    return out


def uncrop(slices: np.ndarray, geometry: Geometry,
           box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
    """The exact inverse of ``extract``: ``(Z', ..., H, W)`` → ``(..., X, Y, Z)``, 0 elsewhere.

    ``box`` (slices of X, Y, Z, inside the grid): only that part of the volume,
    ``(..., *box shape)``, from the slices that lie in its Z range (``box_slices``)."""
    g = geometry
    box = tuple(slice(0, n) for n in g.shape) if box is None else box
    z = box_slices(g, box)
    if slices.shape[0] != z.stop - z.start or slices.shape[-2:] != g.slice_shape:
        raise ValueError(
            f"slices of shape {slices.shape} do not match geometry "
            f"({z.stop - z.start}, ..., {g.slice_shape[0]}, {g.slice_shape[1]})"
        )
    lead = slices.shape[1:-2]
    n = len(lead)
    # (Z, ..., H, W) → (..., X, Y, Z)
    lead_axes = tuple(range(1, n + 1))
    order = (*lead_axes, n + 1, n + 2, 0) if g.h_is_x else (*lead_axes, n + 2, n + 1, 0)
    window = slices.transpose(order)
    out = np.zeros((*lead, *(s.stop - s.start for s in box)), dtype=slices.dtype)
    bx, by, bz = box
    sx = slice(max(g.x0, 0, bx.start), max(min(g.x0 + g.size_x, g.shape[0], bx.stop), 0))
    sy = slice(max(g.y0, 0, by.start), max(min(g.y0 + g.size_y, g.shape[1], by.stop), 0))
    if sx.start >= sx.stop or sy.start >= sy.stop:
        return out
    out[..., sx.start - bx.start : sx.stop - bx.start, sy.start - by.start : sy.stop - by.start,
        z.start + g.z0 - bz.start : z.stop + g.z0 - bz.start] = window[
        ..., sx.start - g.x0 : sx.stop - g.x0, sy.start - g.y0 : sy.stop - g.y0, :
    ]
    return out


def brain_windows(
    slices: np.ndarray, margin: int = MARGIN, multiple: int = MULTIPLE,
    shape_cost: int = SHAPE_COST,
) -> list[tuple[slice, slice] | None]:
    """Per slice of ``(Z', C, H, W)``, the window ``(rows, columns)`` around its brain: the
    bounding box of its nonzero pixels grown by ``margin`` on every side, then to a multiple of
    ``multiple`` (what the network takes), centred on the brain and kept inside the slice.
    ``None`` for a slice without brain.

    Then fewer distinct sizes (``_fewer_sizes``): the windows of one size grow to a larger
    size in use where that adds fewer pixels over all their slices than ``shape_cost``
    (0: every window as small as it can be).

    The brain's top and bottom slices hold little brain: with a margin of 8 the network sees
    about three quarters of the pixels of whole slices on BraTS cases (docs/benchmarks.md).
    """
    height, width = slices.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(f"slices of {height} x {width}: not multiples of {multiple}")
    mask = _any_nonzero(slices, axis=1)
    rows, cols = mask.any(axis=2), mask.any(axis=1)
    # per slice with brain: its (lo, hi) rows and columns, and its window's (rows, columns)
    found: list[tuple[list[tuple[int, int]], tuple[int, int]] | None] = []
    for r, c in zip(rows, cols, strict=True):
        if not r.any():
            found.append(None)
            continue
        box = [(int(i[0]), int(i[-1]) + 1) for i in (np.flatnonzero(r), np.flatnonzero(c))]
        size = tuple(min(n, _round_up(hi - lo + 2 * margin, multiple))
                     for (lo, hi), n in zip(box, (height, width), strict=True))
        found.append((box, (size[0], size[1])))
    grown = _fewer_sizes([f[1] for f in found if f is not None], shape_cost)
    windows: list[tuple[slice, slice] | None] = []
    for item in found:
        if item is None:
            windows.append(None)
            continue
        box, size = item
        window = []
        for (lo, hi), m, n in zip(box, grown[size], (height, width), strict=True):
            start = min(max((lo + hi) // 2 - m // 2, 0), n - m)
            window.append(slice(start, start + m))
        windows.append((window[0], window[1]))
    return windows


def box_window(geometry: Geometry, box: tuple[slice, slice, slice], margin: int = MARGIN,
               multiple: int = MULTIPLE) -> tuple[slice, slice] | None:
    """The window ``(rows, columns)`` of ``geometry``'s slices around the rectangle that
    ``box`` (slices of X, Y, Z) cuts out of each, grown as ``brain_windows`` grows a slice's
    brain; None where the box misses the crop window."""
    g = geometry
    rows = slice(*np.clip([box[0].start - g.x0, box[0].stop - g.x0], 0, g.size_x))
    cols = slice(*np.clip([box[1].start - g.y0, box[1].stop - g.y0], 0, g.size_y))
    rect = np.zeros((1, 1, *g.slice_shape), bool)
    rect[(0, 0, rows, cols) if g.h_is_x else (0, 0, cols, rows)] = True
    return brain_windows(rect, margin, multiple)[0]


def _fewer_sizes(
    sizes: list[tuple[int, int]], cost: int
) -> dict[tuple[int, int], tuple[int, int]]:
    """Each window size in ``sizes`` (one per slice) → the size its windows get: greedily, the
    size whose slices would gain the fewest pixels by growing to a larger size in use (at
    least as tall and as wide) joins it, while that is fewer than ``cost`` pixels."""
    count = Counter(sizes)
    into = {size: size for size in count}
    while True:
        moves = [(k * (t[0] * t[1] - s[0] * s[1]), s, t) for s, k in count.items()
                 for t in count if t != s and t[0] >= s[0] and t[1] >= s[1]]
        if not moves or min(moves)[0] >= cost:
            break
        _, small, large = min(moves)
        count[large] += count.pop(small)
        into = {s: large if t == small else t for s, t in into.items()}
    return into


def zscore(slices: np.ndarray) -> np.ndarray:
    """Z-score each modality of ``(Z', C, H, W)`` over its nonzero voxels; zeros stay 0.

    Returns a new float32 array. A modality with constant brain intensity gets std 1.
    """
    return _zscore_into(np.zeros(slices.shape, dtype=np.float32), slices)


def _zscore_into(out: np.ndarray, slices: np.ndarray) -> np.ndarray:
    """``zscore`` of ``slices`` written into ``out`` (float32, 0 where ``slices`` is; it may be
    ``slices`` itself)."""
    for c in range(slices.shape[1]):
        channel = slices[:, c]
        mask = channel != 0
        values = channel[mask].astype(np.float64)
        if values.size == 0:
            continue
        mean, std = values.mean(), values.std()
        out[:, c][mask] = ((values - mean) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


def preprocess(
    image: np.ndarray, crop: tuple[int, int] = CROP
) -> tuple[np.ndarray, Geometry]:
    """A case ``(C, X, Y, Z)`` (any real dtype) → network slices ``(Z', C, H, W)`` float32 and
    their geometry."""
    geometry = compute_geometry(image, crop)
    slices = extract(image, geometry, np.float32)
    # Z-scored in place where float32 holds the voxels exactly (int16, float32: the same
    # numbers); from the voxels as given otherwise (float64, int32).
    exact = np.can_cast(image.dtype, np.float32, "safe")
    return _zscore_into(slices, slices if exact else extract(image, geometry)), geometry
