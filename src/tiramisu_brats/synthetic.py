"""Synthetic BraTS-like cases with a known tumor, for the demo and the tests.

``make_case`` draws, deterministically from a seed, a skull-stripped 4-modality brain MRI
(T1, T1ce, T2, FLAIR) on a BraTS grid (240 x 240 x 155 at 1 mm by default, any smaller grid
for fast tests, anatomy scaled with it): an ellipsoidal brain with a slightly irregular
outline, folded cortex (gray matter lining radial sulci filled with CSF), white matter,
deep gray nuclei, butterfly-shaped lateral ventricles and a third ventricle, the
interhemispheric fissure, a low-frequency bias field and noise; and in one hemisphere a
lobulated glioma: a necrotic centre (label 1) inside an enhancing rim a few mm thick (4),
inside a larger irregular edema (2) that spreads along the white matter and spares the cortex.

Tissue intensities follow ``CONTRAST_MEAN`` / ``CONTRAST_STD``, measured on real BraTS cases
in per-modality z-score units (see there), then mapped to MRI-like positive integers; the
background is exactly 0. ``write_case`` writes a case as NIfTI files in the BraTS 2021,
BraTS 2023 or nnU-Net naming. ``calibration_slices`` gives network input slices of synthetic
cases, what an int8 model is quantized on when no real slices are given.

Imports ``io`` and ``preprocess`` of this package; nibabel only inside ``write_case``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

# MODALITIES: the modality order of ``SyntheticCase.image`` (the package's order everywhere).
from tiramisu_brats.io import MODALITIES, atomic_write
from tiramisu_brats.preprocess import preprocess

BRATS_SHAPE = (240, 240, 155)
"""The BraTS grid, voxels of 1 mm; other shapes stretch the same anatomy over their grid."""

TISSUES = ("wm", "gm", "csf", "necrosis", "edema", "enhancing")
"""Rows of the contrast tables: normal white matter, gray matter, CSF, and tumor labels 1, 2, 4."""

# Per-tissue intensity, in z-score units of each modality (z-scored over its nonzero voxels,
# i.e. the whole brain, tumor included): rows TISSUES, columns MODALITIES (T1, T1ce, T2, FLAIR).
# CONTRAST_MEAN holds the mean z-value of the tissue, CONTRAST_STD its spread (std of z).
# Measured on the 8 real cases of ../shared/data/brats-labeled that have a sizeable necrosis,
# edema and enhancing tumor: Brats18_2013_2_1, BraTS2021_00006, BraTS19_CBICA_ASK_1,
# Brats18_TCIA02_606_1, BraTS2021_00000, BraTS2021_00005, Brats18_2013_23_1,
# Brats18_CBICA_AQN_1; every number is the average over the 8 cases of the per-case value.
# Tumor rows (run in ../shared/data/brats-labeled; CASES = the 8 names above):
#   python -c 'import nibabel as nib, numpy as np
#   for c in CASES:
#       seg = np.asarray(nib.load(f"{c}/{c}_seg.nii.gz").dataobj)
#       for m in ("t1", "t1ce", "t2", "flair"):
#           a = np.asarray(nib.load(f"{c}/{c}_{m}.nii.gz").dataobj, dtype=float)
#           v = a[a > 0]; z = (a - v.mean()) / v.std()
#           print(c, m, [(z[seg == k].mean(), z[seg == k].std()) for k in (1, 2, 4)])'
# Normal-tissue rows: same z; voxels with seg == 0, more than 3 voxels inside the brain outline
# (binary_erosion of the nonzero mask, 3 iterations) and more than 3 voxels from any tumor
# (binary_dilation of seg > 0, 3 iterations), split into CSF / gray / white matter by 3-means
# clustering of their (T1, T2, FLAIR) z-values, seeded at quantiles (CSF = the cluster with the
# highest T2 centre, white matter = the higher T1 centre of the other two). These clusters are
# intensity-defined, so they come out a little purer than anatomy (smaller std).
# Case-to-case spread of the means (std over the 8 cases): about 0.15 for WM, GM and edema;
# 0.4-1.0 for CSF, necrosis and enhancing tumor: the table is a typical case, not a constant.
CONTRAST_MEAN = np.array(
    [
        # T1    T1ce    T2   FLAIR
        [0.74, 0.36, -0.41, 0.02],  # white matter
        [-0.20, -0.17, 0.07, 0.26],  # gray matter
        [-1.32, -0.90, 2.28, -1.31],  # CSF
        [-0.25, -0.25, 1.71, 2.07],  # necrosis / non-enhancing core (1)
        [0.32, 0.02, 0.61, 1.77],  # edema (2)
        [0.21, 2.06, 0.73, 1.72],  # enhancing tumor (4)
    ]
)
CONTRAST_STD = np.array(
    [
        [0.48, 0.61, 0.32, 0.50],
        [0.50, 0.69, 0.49, 0.58],
        [0.71, 1.11, 1.32, 0.78],
        [0.38, 0.64, 0.69, 0.67],
        [0.54, 0.56, 0.51, 0.73],
        [0.53, 1.17, 0.52, 0.73],
    ]
)
CONTRAST_MEAN.flags.writeable = False
CONTRAST_STD.flags.writeable = False

# Raw intensity scale per modality (mean, std over the brain), typical of BraTS 2018-2019
# releases: z -> round((mean + std * z) * bias), clipped to >= 1 inside the brain.
_RAW_SCALE = np.array([[480.0, 130.0], [420.0, 135.0], [480.0, 210.0], [320.0, 110.0]])

# Anatomy, in mm on the BraTS grid (X left-right, Y anterior-posterior, Z inferior-superior).
_BRAIN_SEMI_AXES = (70.0, 86.0, 65.0)
_BRAIN_CENTRE = (0.5, 0.53, 0.455)  # fraction of the grid, as in real BraTS cases

_WM, _GM, _CSF, _DEEP = 1, 2, 3, 4  # tissue codes of the normal brain (0 = outside)


@dataclass(frozen=True, eq=False)  # eq on arrays would be ambiguous: identity instead
class SyntheticCase:
    """One synthetic case.

    Attributes:
        image: ``(4, X, Y, Z)`` float32, modalities T1, T1ce, T2, FLAIR; exactly 0 outside
            the brain, positive integer values (hundreds, like MRI) inside.
        labels: ``(X, Y, Z)`` uint8, 0 background, 1 necrosis, 2 edema, 4 enhancing tumor.
        affine: ``(4, 4)`` float64 voxel-to-world (mm), BraTS-like axes diag(-1, -1, 1).
        case_id: the case's name, used for file names by ``write_case``.
    """

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    case_id: str


def brats_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """BraTS-like affine for a grid of ``shape``: 1 mm voxels, axes diag(-1, -1, 1), centred.

    ``(4, 4)`` float64; the grid's centre maps to world (0, 0, 0). (Real BraTS files use the
    same axes with the origin at (0, 239, 0); only the translation differs.)
    """
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [(shape[0] - 1) / 2, (shape[1] - 1) / 2, -(shape[2] - 1) / 2]
    return affine


# ---------------------------------------------------------------------------------------------
# random fields


def _field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    corr_mm: float,
) -> np.ndarray:
    """A smooth Gaussian random field on a grid, unit std, float32, of ``shape``.

    White noise on a coarse lattice (step ``corr_mm / 2``), blurred there by a Gaussian of
    width ``corr_mm``, then linearly interpolated onto the grid axis by axis: cheap for any
    correlation length, and free of BLAS (whose threads fight over busy machines).
    """
    step = corr_mm / 2.0
    pad = 5  # lattice cells beyond the grid on each side: room for the blur
    lattice = tuple(
        int(np.ceil(n * sp / step)) + 2 * pad + 1 for n, sp in zip(shape, spacing, strict=True)
    )
    out = ndi.gaussian_filter(rng.standard_normal(lattice, dtype=np.float32), 2.0, truncate=2.5)
    for axis, (n, sp) in enumerate(zip(shape, spacing, strict=True)):
        t = (np.arange(n) + 0.5) * sp / step + pad
        i0 = np.floor(t).astype(np.intp)
        w = (t - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, i0, axis=axis) * (1.0 - w) + np.take(out, i0 + 1, axis=axis) * w
    out -= out.mean()
    out /= out.std() + 1e-12
    return out


def _fine_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise blurred by ``sigma`` voxels (0: none), unit std, float32."""
    noise = rng.standard_normal(shape, dtype=np.float32)
    if sigma > 0:
        noise = ndi.gaussian_filter(noise, sigma, truncate=2.0)
        noise /= noise.std() + 1e-12
    return noise


# ---------------------------------------------------------------------------------------------
# anatomy


@dataclass
class _Grid:
    """The working box (around the brain) and its mm coordinates relative to the brain centre.

    ``x`` ``(n, 1, 1)`` runs with voxel X (left-right), ``y`` ``(1, n, 1)`` is anterior-positive
    (against voxel Y, as in BraTS where world y = -j + const), ``z`` ``(1, 1, n)`` superior.
    """

    box: tuple[slice, slice, slice]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    x: np.ndarray
    y: np.ndarray
    z: np.ndarray

    def window(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[slice, ...]:
        """Slices of the box holding the mm cuboid ``lo``..``hi`` (x, y anterior, z)."""
        out = []
        for axis, coord in enumerate((self.x.ravel(), self.y.ravel(), self.z.ravel())):
            inside = np.flatnonzero((coord >= lo[axis]) & (coord <= hi[axis]))
            out.append(slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0))
        return tuple(out)

    def sub(self, window: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The broadcastable mm coordinates of ``window``."""
        return self.x[window[0]], self.y[:, window[1]], self.z[:, :, window[2]]


def _make_grid(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    centre: np.ndarray,
    semi: np.ndarray,
) -> _Grid:
    """The box around the brain ellipsoid (``centre`` in voxels, ``semi`` in mm)."""
    box, coords = [], []
    for axis in range(3):
        half = semi[axis] * 1.12 / spacing[axis] + 2
        lo = max(int(np.floor(centre[axis] - half)), 0)
        hi = min(int(np.ceil(centre[axis] + half)) + 1, shape[axis])
        box.append(slice(lo, hi))
        coords.append(((np.arange(lo, hi) - centre[axis]) * spacing[axis]).astype(np.float32))
    return _Grid(
        box=(box[0], box[1], box[2]),
        shape=(len(coords[0]), len(coords[1]), len(coords[2])),
        spacing=spacing,
        x=coords[0].reshape(-1, 1, 1),
        y=-coords[1].reshape(1, -1, 1),
        z=coords[2].reshape(1, 1, -1),
    )


def _rho_depth(x, y, z, semi) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ellipsoidal radius (1 on the mean brain outline) and the local radius (mm).

    ``(1 - rho) * local_radius`` approximates the depth below the outline. The ellipsoid is
    egg-shaped: narrower frontally than parietally.
    """
    ax, ay, az = semi
    ax_eff = ax * (1.0 - 0.07 * y / ay)
    rho = np.sqrt((x / ax_eff) ** 2 + (y / ay) ** 2 + (z / az) ** 2)
    grad = np.sqrt((x / ax_eff**2) ** 2 + (y / ay**2) ** 2 + (z / az**2) ** 2)
    local = np.where(grad > 0, rho / np.maximum(grad, 1e-12), float(min(semi)))
    return rho.astype(np.float32), local.astype(np.float32)


def _ellipsoid(
    g: _Grid, centre, radii, xm: np.ndarray | None = None
) -> tuple[tuple[slice, ...], np.ndarray]:
    """(window, mask) of the axis-aligned ellipsoid ``centre``/``radii`` (mm) in the box.

    ``xm``: x coordinates to use instead of ``g.x`` (e.g. relative to a wavy midline), shape
    ``(nx, ny, 1)``.
    """
    lo = tuple(c - r - 1.0 for c, r in zip(centre, radii, strict=True))
    hi = tuple(c + r + 1.0 for c, r in zip(centre, radii, strict=True))
    if xm is not None:  # the midline shift is small: widen the x window
        lo, hi = (lo[0] - 6.0, *lo[1:]), (hi[0] + 6.0, *hi[1:])
    win = g.window(lo, hi)
    x, y, z = g.sub(win)
    if xm is not None:
        x = xm[win[0], win[1]]
    d = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
    d = d + ((z - centre[2]) / radii[2]) ** 2
    return win, d <= 1.0


# Lateral ventricle, frontal horn -> occipital horn (mm from the brain centre, right side;
# mirrored for the left): lateral, anterior, superior, radius lateral / AP / vertical.
_VENTRICLE = np.array(
    [
        [3.5, 30.0, 2.0, 3.0, 5.0, 6.0],
        [5.5, 22.0, 6.0, 5.0, 6.0, 8.0],
        [7.5, 8.0, 10.0, 5.0, 6.0, 7.0],
        [10.0, -8.0, 11.0, 5.0, 6.0, 6.5],
        [14.5, -22.0, 7.0, 6.5, 6.0, 8.0],
        [18.0, -33.0, 2.0, 4.5, 5.0, 5.5],
        [19.5, -41.0, 0.0, 2.5, 4.0, 3.0],
    ]
)
# Deep gray nuclei (right side; mirrored): centre (lateral, anterior, superior), radii.
_NUCLEI = (
    ((11.0, -10.0, 2.0), (7.0, 11.0, 7.0)),  # thalamus
    ((22.0, 5.0, 0.0), (5.0, 13.0, 8.0)),  # lentiform nucleus
    ((10.5, 19.0, 8.0), (4.0, 7.0, 7.0)),  # head of the caudate
)


def _normal_brain(rng: np.random.Generator, g: _Grid, semi: np.ndarray) -> dict:
    """Tissue codes of the normal brain in the box and the geometry the tumor needs."""
    sp = g.spacing
    outline = 1.0 + 0.022 * _field(rng, g.shape, sp, 16.0)
    rho, local = _rho_depth(g.x, g.y, g.z, semi)
    depth = (outline - rho) * local  # mm below the (irregular) outline
    brain = depth > 0

    # Interhemispheric midline: gently wavy along y, slightly tilted.
    midline = (1.2 * _field(rng, (1, g.shape[1], 1), sp, 25.0) + 0.02 * g.y).astype(np.float32)
    xm = g.x - midline  # (nx, ny, 1)

    tissue = np.zeros(g.shape, dtype=np.uint8)
    tissue[brain] = _WM

    # Cortex: a rim of gray matter under the surface, about 3 mm thick (2.7-3.9 mm).
    thickness = 3.3 + 0.6 * _field(rng, g.shape, sp, 10.0)
    cortex = brain & (depth < thickness)

    # Sulci: thin radial sheets of CSF lined with gray matter. A random field is sampled at
    # the voxel's projection onto the outline, so its zero set runs perpendicular to the
    # surface; the sulci reach 8-26 mm deep.
    sulc_depth = np.clip(16.0 + 5.0 * _field(rng, g.shape, sp, 14.0), 8.0, 26.0)
    shell = brain & (depth < sulc_depth + 3.0)
    idx = np.nonzero(shell)
    r = rho[idx]
    scale = (1.0 - 0.25 * (1.0 - r)) / np.maximum(r, 1e-3)
    px = g.x.ravel()[idx[0]] * scale
    py = g.y.ravel()[idx[1]] * scale
    pz = g.z.ravel()[idx[2]] * scale
    step = max(1.5, 0.5 * min(sp))
    ext = np.asarray(semi) * 1.2
    lattice = tuple(int(np.ceil(2 * e / step)) + 1 for e in ext)
    pos = np.stack([(p + e) / step for p, e in zip((px, py, pz), ext, strict=True)])
    fold_field = _field(rng, lattice, (step,) * 3, 3.6)
    slope = np.sqrt(sum(gr**2 for gr in np.gradient(fold_field, step)))
    fold = ndi.map_coordinates(fold_field, pos, order=1, output=np.float32)
    fold_slope = ndi.map_coordinates(slope, pos, order=1, output=np.float32)
    sulc_depth = sulc_depth[idx]
    d = depth[idx]
    # distance (mm) to the sulcus's mid-plane, to first order
    to_sulcus = np.abs(fold) / np.maximum(fold_slope, 1e-3)
    gm_line = (to_sulcus < 3.0) & (d < sulc_depth + 3.0)
    csf_line = (to_sulcus < 0.4) & (d < sulc_depth)
    if max(sp) > 2.5:  # on coarse grids a sulcus would be scattered single voxels of CSF
        csf_line[:] = False

    tissue[cortex] = _GM
    tissue[tuple(i[gm_line] for i in idx)] = _GM

    # Deep gray nuclei.
    for side in (-1.0, 1.0):
        for (cx, cy, cz), radii in _NUCLEI:
            win, m = _ellipsoid(g, (side * cx, cy, cz), radii, xm)
            tissue[win][m & brain[win]] = _DEEP

    # Interhemispheric fissure (above the corpus callosum, and at the frontal and occipital
    # poles), lined with the medial cortex.
    fissure_region = brain & ((g.z > 18.0) | (g.y > 36.0) | (g.y < -44.0))
    tissue[fissure_region & (np.abs(xm) < 3.8)] = _GM
    tissue[fissure_region & (np.abs(xm) < 1.1)] = _CSF

    tissue[tuple(i[csf_line] for i in idx)] = _CSF
    tissue[brain & (depth < 0.6)] = _CSF  # the CSF film over the brain

    # Ventricles.
    size = float(rng.uniform(0.8, 1.35))
    t = np.linspace(0.0, len(_VENTRICLE) - 1.0, 48)
    pts = np.stack(
        [np.interp(t, np.arange(len(_VENTRICLE)), _VENTRICLE[:, k]) for k in range(6)], axis=1
    )
    pts[:, :3] *= 0.85 + 0.15 * size
    pts[:, 3:] *= size
    ventricles = np.zeros(g.shape, dtype=bool)
    for side in (-1.0, 1.0):
        for lx, ly, lz, rx, ry, rz in pts:
            win, m = _ellipsoid(g, (side * lx, ly, lz), (rx, ry, rz), xm)
            ventricles[win] |= m
    ventricles &= np.abs(xm) > 0.9  # septum pellucidum
    win, third = _ellipsoid(g, (0.0, -2.0, -1.0), (1.3 * size, 11.0, 7.0), xm)
    ventricles[win] |= third
    tissue[ventricles & brain] = _CSF

    return {"brain": brain, "depth": depth, "tissue": tissue, "xm": xm}


# ---------------------------------------------------------------------------------------------
# tumor


def _place_tumor(
    rng: np.random.Generator,
    semi: np.ndarray,
    side: float,
    extent: float,
    extent_medial: float,
    margin: float,
    radius: float,
    smallest: float,
) -> tuple[np.ndarray, float]:
    """A tumor centre (mm from the brain centre) in the ``side`` hemisphere and its radius.

    A core of radius ``R`` reaches ``extent * R`` mm from its centre (``extent_medial * R``
    towards the midline) and must stay ``margin`` mm inside the brain and 8 mm off the midline.
    Returns the first random candidate with room for ``radius``; failing that, a random one
    of the roomiest, and the radius that fits there (at least ``smallest``).
    """
    n = 512
    u = np.stack(
        [
            side * rng.uniform(0.12, 0.7, n),
            rng.uniform(-0.62, 0.55, n),
            rng.uniform(-0.3, 0.55, n),
        ],
        axis=1,
    )
    centres = u * semi
    rho, local = _rho_depth(centres[:, 0], centres[:, 1], centres[:, 2], semi)
    depth = (0.97 - rho) * local
    room = np.minimum((depth - margin) / extent, (np.abs(centres[:, 0]) - 8.0) / extent_medial)
    fits = np.flatnonzero(room >= radius)
    if fits.size:
        return centres[int(fits[0])], radius
    best = int(rng.choice(np.argsort(room)[-8:]))
    return centres[best], max(float(room[best]), smallest)


def _tumor(rng: np.random.Generator, g: _Grid, semi: np.ndarray, anat: dict) -> dict:
    """Labels of a lobulated glioma in the box, and the maps its intensities need."""
    sp = g.spacing
    vmax = max(sp)
    side = float(rng.choice([-1.0, 1.0]))
    radius = float(rng.uniform(12.0, 24.0))  # core size (mm)
    rim_fraction = float(rng.uniform(0.2, 0.35))  # enhancing rim thickness / radius
    spread = float(rng.uniform(8.0, 18.0))  # edema reach beyond the core (mm)
    # Lobulated core: the union of a main ball and 2-4 overlapping lobes (in units of radius).
    lobes = [(np.zeros(3), 0.8)]
    for _ in range(int(rng.integers(2, 5))):
        v = rng.standard_normal(3)
        v /= np.linalg.norm(v)
        lobes.append((v * rng.uniform(0.35, 0.6), float(rng.uniform(0.4, 0.65))))
    roughness = 0.1  # relative; the noise is clipped to +-1.5 std
    extent = max(float(np.linalg.norm(c)) + r for c, r in lobes) / (1 - 1.5 * roughness)
    extent_medial = max(r - side * float(c[0]) for c, r in lobes) / (1 - 1.5 * roughness)
    # Coarse grids keep every compartment at least a voxel or two thick.
    shell = max(2.0, 1.05 * vmax)  # edema always surrounds the core this far
    smallest = max(10.0, 3.0 * vmax)
    centre, radius = _place_tumor(
        rng, semi, side, extent, extent_medial, shell + 0.5 * vmax, max(radius, smallest), smallest
    )
    rim = max(float(np.clip(rim_fraction * radius, 2.5, 7.0)), 1.05 * vmax)

    half = extent * radius + 2.0 * spread + 2.0 * vmax  # holds the largest edema reach
    win = g.window(tuple(centre - half), tuple(centre + half))
    x, y, z = g.sub(win)
    x, y, z = x - centre[0], y - centre[1], z - centre[2]
    shape = tuple(s.stop - s.start for s in win)

    f = np.full(shape, np.inf, dtype=np.float32)
    for c, r in lobes:
        c = c * radius
        f = np.minimum(
            f, np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (r * radius)
        )
    f *= 1.0 + roughness * np.clip(_field(rng, shape, sp, 6.0), -1.5, 1.5)
    core = f < 1.0
    core &= anat["brain"][win]

    inside = ndi.distance_transform_edt(core, sampling=sp)
    rim_map = np.maximum(rim * (1.0 + 0.45 * _field(rng, shape, sp, 7.0)), 1.05 * vmax)
    necrosis = inside > rim_map
    if not necrosis.any():  # a core only a few voxels across (coarse grids)
        necrosis = ndi.binary_erosion(core, structure=ndi.generate_binary_structure(3, 1))
        if not necrosis.any():
            necrosis.flat[int(np.argmax(inside))] = True
    enhancing = core & ~necrosis

    outside = ndi.distance_transform_edt(~core, sampling=sp)
    # Irregular, and longer on one side (edema spreads further along some tracts).
    lean = rng.standard_normal(3)
    lean /= np.linalg.norm(lean)
    along = (x * lean[0] + y * lean[1] + z * lean[2]) / np.maximum(
        np.sqrt(x**2 + y**2 + z**2), 1e-3
    )
    irregular = np.clip(_field(rng, shape, sp, 5.0), -2.0, 2.0)
    reach = spread * (1.0 + 0.25 * along) * (1.0 + 0.3 * irregular)  # < 2 * spread
    tissue = anat["tissue"][win]
    # Edema runs along the white matter and mostly spares cortex and CSF.
    factor = np.array([0.0, 1.0, 0.35, 0.0, 0.8], dtype=np.float32)[tissue]
    # ... and does not cross the midline (the falx): it tapers off over the last 12 mm.
    factor *= np.clip((side * anat["xm"][win[0], win[1]] - 1.5) / 12.0, 0.0, 1.0)
    edema = outside < reach * factor
    edema &= anat["brain"][win] & (anat["depth"][win] > 1.5)
    edema |= (outside <= shell) & ~core & anat["brain"][win]
    edema &= ~core
    # Keep what is connected to the core.
    comp, _ = ndi.label(edema | core, structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.zeros(comp.max() + 1, dtype=bool)
    keep[np.unique(comp[core])] = True
    keep[0] = False
    edema &= keep[comp]

    labels = np.zeros(shape, dtype=np.uint8)
    labels[edema] = 2
    labels[enhancing] = 4
    labels[necrosis] = 1
    closeness = np.clip(1.0 - outside / np.maximum(reach, 1.0), 0.0, 1.0).astype(np.float32)
    return {"window": win, "labels": labels, "closeness": closeness}


# ---------------------------------------------------------------------------------------------
# intensities

# Tissue codes of the intensity model -> rows of the contrast tables. Code 0 (outside the brain)
# borrows CSF so that partial-volume blurring at the outline looks like the CSF film there; deep
# gray nuclei sit between gray and white matter.
_CODE_MEAN = np.stack(
    [
        CONTRAST_MEAN[2],
        CONTRAST_MEAN[0],
        CONTRAST_MEAN[1],
        CONTRAST_MEAN[2],
        0.55 * CONTRAST_MEAN[1] + 0.45 * CONTRAST_MEAN[0],
        CONTRAST_MEAN[3],
        CONTRAST_MEAN[4],
        CONTRAST_MEAN[5],
    ]
).astype(np.float32)
_CODE_STD = np.stack(
    [
        CONTRAST_STD[2],
        CONTRAST_STD[0],
        CONTRAST_STD[1],
        CONTRAST_STD[2],
        0.5 * (CONTRAST_STD[0] + CONTRAST_STD[1]),
        CONTRAST_STD[3],
        CONTRAST_STD[4],
        CONTRAST_STD[5],
    ]
).astype(np.float32)
_TUMOR_CODE = {1: 5, 2: 6, 4: 7}


def _intensities(
    rng: np.random.Generator, g: _Grid, semi: np.ndarray, anat: dict, tumor: dict
) -> np.ndarray:
    """``(4, *box)`` float32 MRI-like intensities of the box (0 outside the brain).

    Per modality: the tissue's mean z-value, blurred a little (partial volume), plus texture
    scaled by the tissue's spread, the edema's gradient, T1ce's enhancing vessels and noise;
    then mapped to raw intensities and multiplied by a smooth bias field.
    """
    code = anat["tissue"].copy()
    win = tumor["window"]
    sub = code[win]
    for label, c in _TUMOR_CODE.items():
        sub[tumor["labels"] == label] = c
    where = anat["brain"]  # everything below works on the brain's voxels only
    code_b = code[where]

    # Edema is brightest next to the core on T2/FLAIR and fades outwards.
    gradient = np.zeros(g.shape, dtype=np.float32)
    gradient[win] = np.where(tumor["labels"] == 2, tumor["closeness"] - 0.5, 0.0)
    gradient_b = gradient[where]
    edema_slope = np.array([-0.2, 0.0, 0.3, 0.4], dtype=np.float32)

    # Textures shared (partly) by the modalities: fine grain and a blotchy mid-scale.
    fine = [_fine_noise(rng, g.shape, 0.8)[where] for _ in range(2)]
    blotch = _fine_noise(rng, g.shape, 2.0)[where]
    angles = rng.uniform(0.0, np.pi / 2, size=4)
    # Cortical veins and dura enhance on T1ce: spots in the CSF film and the sulci.
    vessels_b = (code_b == _CSF) & (anat["depth"][where] < 6.0) & (fine[0] > 1.6)

    gains = rng.uniform(0.8, 1.25, size=4)
    ux, uy, uz = (
        np.broadcast_to(c / s, g.shape)[where] for c, s in zip((g.x, g.y, g.z), semi, strict=True)
    )

    # Partial volume with the zeroed outside: intensities fall off over the outermost ~2 mm
    # (at least a voxel), as in real skull-stripped BraTS volumes, where the outer 1.5 voxels
    # sit about 1-2.5 z below the brain's mean on every modality.
    ramp = max(2.0, 1.2 * max(g.spacing))
    falloff = np.clip(0.4 + 0.6 * anat["depth"][where] / ramp, 0.4, 1.0)

    tumor_b = code_b >= min(_TUMOR_CODE.values())
    # Partial volume between tissues: a blur of 0.6 mm (BraTS-grid mm), so that on coarse test
    # grids the one-voxel compartments keep their contrast.
    pv_sigma = 0.6 / max(g.spacing)
    image = np.zeros((4, *g.shape), dtype=np.float32)
    for m in range(4):
        z = _CODE_MEAN[code, m]
        if pv_sigma >= 0.2:
            z = ndi.gaussian_filter(z, pv_sigma, truncate=2.0)
        z = z[where]
        z -= (1.0 - falloff) * (z + _RAW_SCALE[m, 0] / _RAW_SCALE[m, 1])
        ca, sa = np.cos(angles[m]), np.sin(angles[m])
        texture = 0.5 * (ca * fine[0] + sa * fine[1]) + 0.5 * blotch
        z += np.where(tumor_b, 0.9, 0.45) * _CODE_STD[code_b, m] * texture
        z += edema_slope[m] * gradient_b
        if m == 1:
            z += 2.2 * vessels_b
        z += 0.04 * rng.standard_normal(z.shape, dtype=np.float32)
        c = rng.normal(0.0, 0.05, size=8)
        log_bias = c[0] * ux + c[1] * uy + c[2] * uz + c[3] * ux**2 + c[4] * uy**2
        log_bias += c[5] * uz**2 + c[6] * ux * uy + c[7] * uy * uz
        bias = np.exp(log_bias)
        mean, std = _RAW_SCALE[m] * gains[m]
        raw = (mean + std * z) * bias
        # The table is in z units of each whole brain, and this brain's tissue fractions and
        # spreads differ from the measured cases': re-place the tumor so that after z-scoring
        # over this brain each tumor label's mean sits at the table's z-value, its texture,
        # gradient and partial volume around it (a fixed point: the tumor is part of the
        # brain's mean and spread; three rounds settle it to < 0.01 z).
        z_tumor, bias_tumor = z[tumor_b], bias[tumor_b] / bias[tumor_b].mean()
        for c in _TUMOR_CODE.values():
            sel = code_b[tumor_b] == c
            if sel.any():
                z_tumor[sel] += _CODE_MEAN[c, m] - z_tumor[sel].mean()
        for _ in range(3):
            raw[tumor_b] = (raw.mean() + raw.std() * z_tumor) * bias_tumor
        image[m][where] = np.clip(np.rint(raw), 1.0, 32767.0)
    return image


# ---------------------------------------------------------------------------------------------
# public API


def make_case(
    seed: int = 0,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    case_id: str = "synthetic-000",
) -> SyntheticCase:
    """Draw a synthetic BraTS-like case, deterministically from ``seed``.

    Args:
        seed: random seed; the same seed and shape give identical arrays.
        shape: grid ``(X, Y, Z)``, each at least 24; (240, 240, 155) is the BraTS grid
            (1 mm voxels); a smaller grid holds the same anatomy, scaled down (tumor
            compartments are kept at least a voxel or two thick), still with 1 mm voxels (a
            small brain: the network sees it as it is, unresampled), so its volumes in ml and
            distances in mm are those of a small head, not of the BraTS grid's.
        case_id: name stored in the case (file names of ``write_case``).

    Returns:
        A ``SyntheticCase``: image ``(4, X, Y, Z)`` float32 (T1, T1ce, T2, FLAIR; 0 outside the
        brain, positive integers inside), labels ``(X, Y, Z)`` uint8 with all of 1, 2 and 4
        present, affine ``(4, 4)`` float64 (``brats_affine(shape)``).

    Raises:
        ValueError: a bad shape or case id.
    """
    if len(shape) != 3 or any(int(s) != s or s < 24 for s in shape):
        raise ValueError(f"shape must be 3 integers >= 24, got {shape}")
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    _check_case_id(case_id)
    rng = np.random.default_rng(seed)
    spacing = tuple(b / s for b, s in zip(BRATS_SHAPE, shape, strict=True))
    semi = np.asarray(_BRAIN_SEMI_AXES) * rng.uniform(0.94, 1.04, size=3)
    centre = np.asarray(_BRAIN_CENTRE) * np.asarray(shape) - 0.5
    centre = centre + rng.normal(0.0, 1.5, size=3) / np.asarray(spacing)
    g = _make_grid(shape, spacing, centre, semi)

    anat = _normal_brain(rng, g, semi)
    tumor = _tumor(rng, g, semi, anat)
    box_image = _intensities(rng, g, semi, anat, tumor)

    image = np.zeros((4, *shape), dtype=np.float32)
    image[(slice(None), *g.box)] = box_image
    labels = np.zeros(shape, dtype=np.uint8)
    box_labels = labels[g.box]
    box_labels[tumor["window"]] = tumor["labels"]
    return SyntheticCase(image=image, labels=labels, affine=brats_affine(shape), case_id=case_id)


SYNTHETIC_CALIBRATION = "synthetic:seeds=0,1:every=4"
"""What the record of an int8 model calls ``calibration_slices()`` (its defaults)."""


def calibration_slices(seeds: tuple[int, ...] = (0, 1), every: int = 4) -> np.ndarray:
    """Calibration slices ``(N, 4, 192, 160)`` float32 for int8 quantization: every
    ``every``-th brain slice of the synthetic cases ``make_case(seed)`` of ``seeds``,
    preprocessed for the network."""
    return np.concatenate([preprocess(make_case(seed).image)[0][::every] for seed in seeds])


def _check_case_id(case_id: str) -> None:
    if (
        not isinstance(case_id, str)
        or not case_id
        or case_id in (".", "..")
        or any(c in case_id for c in "/\\\0")
    ):
        raise ValueError(f"case_id must be a plain file name, got {case_id!r}")


LAYOUTS = ("brats2021", "brats2023", "nnunet")
"""File layouts of ``write_case``."""

_BRATS2023_NAMES = ("t1n", "t1c", "t2w", "t2f")


def _file_names(case_id: str, layout: str) -> tuple[list[str], str]:
    """(image file names in modality order, seg file name) of ``layout``."""
    if layout == "brats2021":
        return [f"{case_id}_{m}.nii.gz" for m in MODALITIES], f"{case_id}_seg.nii.gz"
    if layout == "brats2023":
        return [f"{case_id}-{m}.nii.gz" for m in _BRATS2023_NAMES], f"{case_id}-seg.nii.gz"
    if layout == "nnunet":
        return [f"{case_id}_{i:04d}.nii.gz" for i in range(4)], f"{case_id}_seg.nii.gz"
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def write_case(
    case: SyntheticCase,
    folder: str | os.PathLike[str],
    layout: str = "brats2021",
    *,
    with_seg: bool = True,
) -> Path:
    """Write ``case`` as gzipped NIfTI files into ``folder/<case_id>/``.

    Layouts: ``"brats2021"``: ``<id>_t1, _t1ce, _t2, _flair, _seg``; ``"brats2023"``:
    ``<id>-t1n, -t1c, -t2w, -t2f, -seg`` with labels 0/1/2/3 (enhancing tumor 4 -> 3);
    ``"nnunet"``: ``<id>_0000 .. _0003`` (T1, T1ce, T2, FLAIR) and ``<id>_seg``. All
    ``.nii.gz``; images int16, segmentation uint8, all with the case's affine. Each file is
    written under a temporary name in the same folder and then renamed into place.

    Returns:
        The case folder ``folder/<case_id>``.

    Raises:
        ValueError: unknown layout or bad case id.
    """
    import nibabel as nib

    images, seg_name = _file_names(case.case_id, layout)
    _check_case_id(case.case_id)
    out = Path(folder) / case.case_id
    out.mkdir(parents=True, exist_ok=True)

    def save(data: np.ndarray, name: str) -> None:
        img = nib.Nifti1Image(data, case.affine)
        img.header.set_data_dtype(data.dtype)
        img.header.set_xyzt_units("mm", "sec")
        img.set_qform(case.affine, code=1)
        img.set_sform(case.affine, code=1)
        atomic_write(out / name, lambda tmp: nib.save(img, tmp), overwrite=True)

    for m, name in enumerate(images):
        save(np.clip(np.rint(case.image[m]), -32768, 32767).astype(np.int16), name)
    if with_seg:
        seg = case.labels.astype(np.uint8)
        if layout == "brats2023":
            seg = np.where(seg == 4, 3, seg).astype(np.uint8)
        save(seg, seg_name)
    return out
