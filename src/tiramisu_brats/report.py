"""Evaluation reports: per-case metrics CSV, summary JSON, box plots and slice overlays.

Rows are dicts with ``case`` (the case id) plus the :data:`~tiramisu_brats.metrics.METRIC_COLUMNS`
of :func:`~tiramisu_brats.metrics.evaluate_case`; they may carry extra scalar columns (for
example ``stage``). Every file goes through :mod:`tiramisu_brats.io`'s atomic writers.

Figures are built on :class:`matplotlib.figure.Figure` objects directly, so no global backend
(and no display) is needed. matplotlib is imported by the functions that draw: segmenting,
which imports this module for its CSV and JSON, does not pay the import.
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tiramisu_brats.io import atomic_write, atomic_write_text
from tiramisu_brats.metrics import METRIC_COLUMNS, REGIONS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "LABEL_COLORS",
    "LABEL_NAMES",
    "box_plots",
    "overlay_png",
    "planes_png",
    "summarize",
    "write_index_html",
    "write_metrics_csv",
    "write_report",
    "write_summary_json",
]

logger = logging.getLogger(__name__)

LABEL_NAMES: dict[int, str] = {
    1: "Necrosis / non-enhancing core (1)",
    2: "Edema (2)",
    4: "Enhancing tumor (4)",
}
"""Legend names of the labels drawn in the overlays."""

LABEL_COLORS: dict[int, str] = {1: "#ff2a2a", 2: "#2adf2a", 4: "#ffe600"}
"""Overlay colour of each label (the usual BraTS red / green / yellow)."""

_OVERLAY_ALPHA = 0.45
_STAGE_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
_PNG_DPI = 110


# --------------------------------------------------------------------------- helpers


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format_cell(value: Any) -> str:
    """Text of one CSV cell; floats round-trip exactly (``repr``)."""
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def _json_safe(value: Any) -> Any:
    """Nested copy with numpy scalars as Python numbers and NaN / infinities as ``None``."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _save_figure(fig: Figure, path: Path, overwrite: bool) -> Path:
    atomic_write(
        path,
        lambda tmp: fig.savefig(tmp, format="png", dpi=_PNG_DPI, facecolor="white"),
        overwrite=overwrite,
    )
    return path


# --------------------------------------------------------------------------- tables


def write_metrics_csv(
    rows: Sequence[Mapping[str, Any]], path: str | Path, *, overwrite: bool = True
) -> Path:
    """Write one row per case: ``case``, the METRIC_COLUMNS, then any extra columns.

    Extra columns (keys besides ``case`` and METRIC_COLUMNS, such as ``stage``) follow in the
    order they first appear; a row lacking one leaves the cell empty. Floats are written with
    ``repr``, so they read back exactly.

    Raises:
        ValueError: a row lacks ``case`` or one of the METRIC_COLUMNS.
    """
    path = Path(path)
    fixed = ["case", *METRIC_COLUMNS]
    extra: list[str] = []
    for i, row in enumerate(rows):
        missing = [c for c in fixed if c not in row]
        if missing:
            name = row.get("case", f"row {i}")
            raise ValueError(f"metrics row {name!r} lacks columns: {', '.join(missing)}")
        extra.extend(k for k in row if k not in fixed and k not in extra)
    header = fixed + extra
    buf = _stdio.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_format_cell(row.get(c)) for c in header])
    atomic_write_text(path, buf.getvalue(), overwrite=overwrite)
    logger.info("wrote %s (%d cases)", path, len(rows))
    return path


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, median, population std (``np.std``) and ``n`` of every numeric column.

    A column is numeric when every row has it as a real number (``bool`` excluded); NaN
    values are left out of its statistics and of its ``n``. METRIC_COLUMNS come first, then
    the other numeric columns in order of first appearance. No rows -> ``{}``.
    """
    if not rows:
        return {}
    keys: list[str] = [c for c in METRIC_COLUMNS if c in rows[0]]
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [row.get(key) for row in rows]
        if not all(_is_number(v) for v in values):
            continue
        arr = np.asarray(values, dtype=np.float64)
        arr = arr[~np.isnan(arr)]
        if arr.size == 0:
            out[key] = {"n": 0, "mean": math.nan, "median": math.nan, "std": math.nan}
            continue
        out[key] = {
            "n": int(arr.size),
            "mean": float(np.mean(arr)),
            "median": float(np.median(arr)),
            "std": float(np.std(arr)),
        }
    return out


def write_summary_json(
    rows: Sequence[Mapping[str, Any]],
    path: str | Path,
    extra: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = True,
) -> Path:
    """Write ``{"n_cases": N, "metrics": summarize(rows), **extra}`` as indented JSON.

    NaN and infinities become ``null``; numpy scalars and arrays become JSON numbers / lists.

    Raises:
        ValueError: ``extra`` uses the key ``n_cases`` or ``metrics``.
    """
    path = Path(path)
    doc: dict[str, Any] = {"n_cases": len(rows), "metrics": summarize(rows)}
    for key, value in (extra or {}).items():
        if key in doc:
            raise ValueError(f"summary extra key {key!r} clashes with a reserved key")
        doc[key] = value
    text = json.dumps(_json_safe(doc), indent=2, allow_nan=False) + "\n"
    atomic_write_text(path, text, overwrite=overwrite)
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------- box plots


def box_plots(
    stages: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    overwrite: bool = True,
) -> Path:
    """One PNG: box plots of Dice (left) and sensitivity (right) per region, per stage.

    Args:
        stages: stage name -> metric rows, e.g. ``{"raw": rows_before, "postprocessed":
            rows_after}``; within each region the stages stand side by side in this order.
            One stage is fine.
        path: the PNG to write.

    Raises:
        ValueError: ``stages`` is empty.
    """
    if not stages:
        raise ValueError("box_plots needs at least one stage")
    path = Path(path)
    names = list(stages)
    regions = list(REGIONS)
    n_stages = len(names)
    width = 0.8 / n_stages
    n_cases = {name: len(rows) for name, rows in stages.items()}

    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(11.0, 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    rng = np.random.default_rng(0)  # deterministic jitter of the case points
    for ax, metric, label in zip(
        axes, ("dice", "sensitivity"), ("Dice", "Sensitivity"), strict=True
    ):
        for s, name in enumerate(names):
            color = _STAGE_COLORS[s % len(_STAGE_COLORS)]
            for g, region in enumerate(regions):
                col = f"{metric}_{region}"
                vals = np.asarray(
                    [r[col] for r in stages[name] if _is_number(r.get(col))], dtype=np.float64
                )
                vals = vals[~np.isnan(vals)]
                if vals.size == 0:
                    continue
                pos = g + (s - (n_stages - 1) / 2) * width
                ax.boxplot(
                    [vals],
                    positions=[pos],
                    widths=width * 0.8,
                    patch_artist=True,
                    showfliers=False,
                    manage_ticks=False,
                    boxprops={"facecolor": color, "alpha": 0.55, "edgecolor": color},
                    medianprops={"color": "black", "linewidth": 1.5},
                    whiskerprops={"color": color},
                    capprops={"color": color},
                )
                jitter = rng.uniform(-width * 0.25, width * 0.25, size=vals.size)
                ax.scatter(
                    pos + jitter,
                    vals,
                    s=10,
                    color=color,
                    edgecolors="black",
                    linewidths=0.3,
                    zorder=3,
                )
        ax.set_xticks(range(len(regions)))
        ax.set_xticklabels([f"{r}\n({'+'.join(str(v) for v in REGIONS[r])})" for r in regions])
        ax.set_xlim(-0.6, len(regions) - 0.4)
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("Tumor region (labels)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} per region")
        ax.grid(axis="y", alpha=0.3)
    handles = [
        Patch(
            facecolor=_STAGE_COLORS[s % len(_STAGE_COLORS)],
            alpha=0.55,
            label=f"{name} (n={n_cases[name]})",
        )
        for s, name in enumerate(names)
    ]
    axes[1].legend(handles=handles, title="Stage", loc="lower right")
    fig.suptitle("Segmentation quality per case (WT whole tumor, TC tumor core, ET enhancing)")
    _save_figure(fig, path, overwrite)
    logger.info("wrote %s", path)
    return path


# --------------------------------------------------------------------------- overlays


def _window(img2d: np.ndarray) -> np.ndarray:
    """Scale a slice to [0, 1] by the 1st-99th percentile of its nonzero (brain) voxels."""
    img = np.asarray(img2d, dtype=np.float64)
    finite = np.isfinite(img)
    brain = img[finite & (img != 0)]
    if brain.size == 0:
        return np.zeros_like(img)
    lo, hi = np.percentile(brain, [1.0, 99.0])
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    out[~finite] = 0.0
    return out


def _crop_box(mask2d: np.ndarray, margin: int) -> tuple[slice, slice]:
    """Bounding box of a 2-D mask grown by ``margin`` (the whole slice if the mask is empty)."""
    from scipy import ndimage

    if not mask2d.any():
        return (slice(None), slice(None))
    rows, cols = ndimage.find_objects(np.asarray(mask2d, bool).view(np.uint8))[0]
    return (slice(max(rows.start - margin, 0), rows.stop + margin),
            slice(max(cols.start - margin, 0), cols.stop + margin))


def _label_rgba(labels2d: np.ndarray) -> np.ndarray:
    """RGBA image of a label slice: label colours with alpha, transparent elsewhere."""
    from matplotlib.colors import to_rgba

    rgba = np.zeros((*labels2d.shape, 4), dtype=np.float64)
    for value, color in LABEL_COLORS.items():
        r, g, b, _ = to_rgba(color)
        rgba[labels2d == value] = (r, g, b, _OVERLAY_ALPHA)
    return rgba


# How a slice of a volume in the BraTS orientation (X: right to left, Y: front to back, Z:
# up) is shown, radiologically as ITK-SNAP and most radiology software do: the patient's right
# on the left of the picture, front (axial) or top (coronal, sagittal) up, the face to the
# left (sagittal). ``(transpose, flip rows)`` turn the 2-D slice into the picture's rows and
# columns; then the sides' letters (left, right, top, bottom).
_DISPLAY: dict[str, tuple[bool, bool, tuple[str, str, str, str]]] = {
    "axial": (True, False, ("R", "L", "A", "P")),  # rows = Y (front up), columns = X
    "coronal": (True, True, ("R", "L", "S", "I")),  # rows = Z (up at the top), columns = X
    "sagittal": (True, True, ("A", "P", "S", "I")),  # rows = Z, columns = Y (face left)
}


def _displayed(slice2d: np.ndarray, plane: str) -> np.ndarray:
    """A 2-D slice (the first two axes of the volume's plane, in order) as it is shown."""
    transpose, flip, _ = _DISPLAY[plane]
    shown = np.swapaxes(slice2d, 0, 1) if transpose else slice2d
    return shown[::-1] if flip else shown


def _show(ax: Any, img2d: np.ndarray, aspect: float, plane: str,
          labels2d: np.ndarray | None = None) -> None:
    """Draw a windowed slice (and its labels over it) of ``plane`` with the sides' letters."""
    ax.imshow(_displayed(img2d, plane), cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect,
              interpolation="nearest")
    if labels2d is not None:
        ax.imshow(_displayed(_label_rgba(labels2d), plane), aspect=aspect,
                  interpolation="nearest")
    left, right, top, bottom = _DISPLAY[plane][2]
    style = {"color": "white", "fontsize": "small", "fontweight": "bold"}
    for text, xy, ha, va in ((left, (0.01, 0.5), "left", "center"),
                             (right, (0.99, 0.5), "right", "center"),
                             (top, (0.5, 0.99), "center", "top"),
                             (bottom, (0.5, 0.01), "center", "bottom")):
        ax.text(*xy, text, transform=ax.transAxes, ha=ha, va=va, **style)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(fig: Any, enhancing: int) -> None:
    """The labels' colours, enhancing tumor under the number the label maps use for it."""
    from matplotlib.patches import Patch

    names = {**LABEL_NAMES, 4: LABEL_NAMES[4].replace("(4)", f"({enhancing})")}
    handles = [Patch(facecolor=LABEL_COLORS[v], label=names[v]) for v in LABEL_NAMES]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)


def _overlay_slice(flair: np.ndarray, pred: np.ndarray, ref: np.ndarray | None
                   ) -> tuple[int, str]:
    """The ``z`` ``overlay_png`` shows, and why (for its title)."""
    bases = [("expert", ref), ("predicted", pred)] if ref is not None else [("predicted", pred)]
    for i, (name, labels) in enumerate(bases):
        area = np.count_nonzero(np.asarray(labels) != 0, axis=(0, 1))
        if area.max() > 0:
            z = int(np.argmax(area))
            why = f"largest {name} tumor area, {int(area[z])} voxels"
            # A prediction of tumor where the expert found none is what the reader must see.
            return z, f"no expert tumor; {why}" if i else why
    z = int(np.argmax(np.count_nonzero(np.asarray(flair) != 0, axis=(0, 1))))
    return z, "no tumor; largest brain area"


def overlay_png(
    flair: np.ndarray,
    t1ce: np.ndarray,
    pred: np.ndarray,
    ref: np.ndarray | None,
    path: str | Path,
    case_id: str,
    spacing: Sequence[float] | None = None,
    *,
    overwrite: bool = True,
    enhancing: int = 4,
) -> Path:
    """PNG of the axial slice with the largest tumor area, with the labels overlaid.

    Rows: FLAIR, T1ce. Columns: the image alone, the prediction overlaid, and (when ``ref`` is
    given) the expert segmentation overlaid. The slice is the ``z`` with the most tumor voxels
    of ``ref`` (of ``pred`` when there is no reference or it is empty; the slice with the most
    brain when both are empty). Slices are cropped to the brain (nonzero voxels) plus a margin
    and shown radiologically (the patient's right on the left, the front up; letters on the
    sides) for volumes in the BraTS orientation.

    Args:
        flair, t1ce: ``(X, Y, Z)`` float intensity volumes, X right to left, Y front to back,
            Z up (the BraTS orientation: ``preprocess.to_network`` without resampling).
        pred: ``(X, Y, Z)`` ``uint8`` predicted labels (0/1/2/4).
        ref: ``(X, Y, Z)`` ``uint8`` expert labels, or ``None``.
        path: the PNG to write.
        case_id: shown in the title.
        spacing: voxel size in mm (X, Y, Z); sets the pixel aspect ratio (square if ``None``).
        enhancing: the number the legend gives enhancing tumor (3 in BraTS 2023 numbering).

    Raises:
        ValueError: the arrays are not 3-D or their shapes differ.
    """
    path = Path(path)
    arrays = {"flair": flair, "t1ce": t1ce, "prediction": pred}
    if ref is not None:
        arrays["reference"] = ref
    shape = np.shape(pred)
    for name, arr in arrays.items():
        if np.ndim(arr) != 3 or np.shape(arr) != shape:
            raise ValueError(f"overlay_png: {name} has shape {np.shape(arr)}, expected 3-D {shape}")
    aspect = 1.0
    if spacing is not None:
        sx, sy = float(spacing[0]), float(spacing[1])
        aspect = sy / sx  # pixel height / width as shown (rows run along Y)

    z, why = _overlay_slice(flair, pred, ref)

    # Crop the slice to the bounding box of the brain and the labels, plus a margin.
    slices_z = [np.asarray(a)[:, :, z] for a in arrays.values()]
    crop = _crop_box(np.any([a != 0 for a in slices_z], axis=0), margin=6)
    flair_z, t1ce_z, pred_z, *rest = (a[crop] for a in slices_z)
    columns: list[tuple[str, np.ndarray | None]] = [("Image", None), ("Prediction", pred_z)]
    if ref is not None:
        columns.append(("Expert", rest[0]))
    images = [("FLAIR", _window(flair_z)), ("T1ce", _window(t1ce_z))]

    from matplotlib.figure import Figure

    panel = 3.3
    fig = Figure(figsize=(panel * len(columns), panel * 2 + 1.0), layout="constrained")
    axes = fig.subplots(2, len(columns), squeeze=False)
    for i, (row_name, img) in enumerate(images):
        for j, (col_name, lab) in enumerate(columns):
            ax = axes[i, j]
            _show(ax, img, aspect, "axial", lab)
            if i == 0:
                ax.set_title(col_name)
            if j == 0:
                ax.set_ylabel(row_name, fontsize="large")
    _legend(fig, enhancing)
    fig.suptitle(f"{case_id}\naxial slice z = {z} ({why})")
    _save_figure(fig, path, overwrite)
    logger.info("wrote %s", path)
    return path


def planes_png(
    flair: np.ndarray,
    t1ce: np.ndarray,
    labels: np.ndarray,
    path: str | Path,
    case_id: str,
    spacing: Sequence[float] | None = None,
    *,
    overwrite: bool = True,
    enhancing: int = 4,
) -> Path:
    """PNG of the three planes (axial, coronal, sagittal) through the tumor's centre, the
    labels over FLAIR (top row) and T1ce (bottom row), with a legend of the label colours.

    The centre is the whole tumor's centre of mass (the brain's where no tumor was found).
    ``flair``, ``t1ce``: ``(X, Y, Z)`` intensities; ``labels`` ``(X, Y, Z)`` 0/1/2/4 in the
    BraTS orientation (X right to left, Y front to back, Z up), shown radiologically with
    letters on the sides; ``spacing`` in mm sets the pixel aspect ratio of each plane;
    ``enhancing``: the number the legend gives enhancing tumor (3 in BraTS 2023 numbering).
    """
    from matplotlib.figure import Figure
    from scipy import ndimage

    path = Path(path)
    for name, arr in (("flair", flair), ("t1ce", t1ce)):
        if np.shape(arr) != np.shape(labels) or np.ndim(arr) != 3:
            raise ValueError(f"planes_png: {name} has shape {np.shape(arr)}, expected 3-D "
                             f"{np.shape(labels)}")
    labels = np.asarray(labels)
    tumor = labels > 0
    basis = tumor if tumor.any() else np.asarray(flair) != 0
    if not basis.any():
        raise ValueError(f"planes_png: {case_id}: the image is empty")
    centre = [round(c) for c in ndimage.center_of_mass(basis)]
    sx, sy, sz = (float(z) for z in spacing) if spacing is not None else (1.0, 1.0, 1.0)
    # (name, index along the normal, slicer, pixel height / width as shown)
    planes = [("axial", f"z = {centre[2]}", (slice(None), slice(None), centre[2]), sy / sx),
              ("coronal", f"y = {centre[1]}", (slice(None), centre[1], slice(None)), sz / sx),
              ("sagittal", f"x = {centre[0]}", (centre[0], slice(None), slice(None)), sz / sy)]
    fig = Figure(figsize=(10.5, 8.0), layout="constrained")
    axes = fig.subplots(2, 3, squeeze=False)
    for j, (name, where, cut, aspect) in enumerate(planes):
        lab = labels[cut]
        crop = _crop_box((np.asarray(flair)[cut] != 0) | (lab != 0), margin=4)
        for i, (row, volume) in enumerate((("FLAIR", flair), ("T1ce", t1ce))):
            ax = axes[i, j]
            _show(ax, _window(np.asarray(volume)[cut][crop]), aspect, name, lab[crop])
            if i == 0:
                ax.set_title(f"{name} ({where})")
            if j == 0:
                ax.set_ylabel(row, fontsize="large")
    _legend(fig, enhancing)
    fig.suptitle(f"{case_id}: planes through the "
                 + ("tumor's centre" if tumor.any() else "brain's centre (no tumor found)"))
    _save_figure(fig, path, overwrite)
    return path


_HTML_COLUMNS = (("case", "case"), ("review", "review"), ("qc_score", "QC score"),
                 ("WT_ml", "WT ml"), ("TC_ml", "TC ml"), ("ET_ml", "ET ml"),
                 ("dice_WT", "Dice WT"), ("dice_TC", "Dice TC"), ("dice_ET", "Dice ET"))


def _href(path: object) -> str:
    """A relative link in a page: percent-encoded (a case id may hold ``#``, ``?`` or ``%``,
    which a browser would otherwise take for a fragment, a query or an escape), then escaped
    for HTML."""
    import html
    import urllib.parse

    return html.escape(urllib.parse.quote(str(path)))


def write_index_html(
    folder: str | Path, rows: Sequence[Mapping[str, Any]], title: str, *,
    overwrite: bool = True, name: str = "index.html", files: Sequence[str] = (),
) -> Path:
    """Write ``folder/index.html`` (or ``name``): one table row per case, sortable by any
    column (a click on its header), each row with the case's picture (``image``: a file name
    in ``folder``), an optional ``link`` to the case in the viewer (it works where
    ``viewer.serve_folder`` serves the folder) and ``command`` (how to open it in the
    viewer). Needs no network: the page holds its own script and style, the pictures lie
    beside it. ``files``: other outputs in ``folder`` named at the top (PNGs shown).

    Without Dice: cases to review first (failed ones, without a score, before the others),
    then by QC score. With Dice (an evaluation): the lowest mean Dice of the regions first,
    under a table of the Dice's mean and median over the cases.
    Row keys used: ``case``; optional ``review`` (bool), ``qc_score``, ``qc_why``,
    ``WT_ml``/``TC_ml``/``ET_ml``, ``dice_WT``/``dice_TC``/``dice_ET``, ``image``,
    ``command``.
    Columns that no row has are left out.
    """
    import html

    folder = Path(folder)
    columns = [(k, name) for k, name in _HTML_COLUMNS if any(k in r for r in rows)]
    dice = [k for k, _ in columns if k.startswith("dice_")]
    if dice:  # beside the expert's Dice, say whose volumes these are
        columns = [(k, f"predicted {name}" if k.endswith("_ml") else name) for k, name in columns]

    def order(row: Mapping[str, Any]) -> tuple:
        if dice:  # the truth is known: the worst cases first
            values = [row.get(k) for k in dice]
            known = [float(v) for v in values if _is_number(v) and not math.isnan(v)]
            return (sum(known) / len(known) if known else -1.0), str(row["case"])
        score = row.get("qc_score")
        if score is None:  # to review without a score (a failed case) before every score
            score = -1.0 if row.get("review") else 1.0
        return not row.get("review"), score, str(row["case"])

    ordered = sorted(rows, key=order)

    def cell(row: Mapping[str, Any], key: str) -> str:
        value = row.get(key)
        if key == "review":
            text = "" if value is None else ("review" if value else "ok")
            sort = "" if value is None else int(bool(value))
            cls = ' class="flag"' if value else ""
            return f'<td data-sort="{sort}"{cls}>{text}</td>'
        if key == "case":
            return f'<td data-sort="{html.escape(str(value))}">{html.escape(str(value))}</td>'
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return '<td data-sort=""></td>'
        digits = 1 if key.endswith("_ml") else 3
        return f'<td data-sort="{float(value)}">{float(value):.{digits}f}</td>'

    body = []
    for row in ordered:
        cells = "".join(cell(row, k) for k, _ in columns)
        extra = []
        if row.get("qc_why"):
            extra.append(f'<div class="why">{html.escape(str(row["qc_why"]))}</div>')
        if row.get("image"):
            src = _href(row["image"])
            extra.append(f'<a href="{src}"><img src="{src}" alt="{html.escape(str(row["case"]))}'
                         ' picture"></a>')
        if row.get("link"):
            extra.append(f'<a class="view" href="{_href(row["link"])}">open in the '
                         "viewer</a> (with <code>tiramisu-brats view</code> of this folder)")
        if row.get("command"):
            extra.append(f'<div class="why">view: <code>{html.escape(str(row["command"]))}'
                         "</code></div>")
        body.append(f"<tr>{cells}<td>{''.join(extra)}</td></tr>")
    header = "".join(f'<th data-col="{i}">{html.escape(name)}</th>'
                     for i, (_, name) in enumerate(columns))
    n_review = sum(bool(r.get("review")) for r in rows)
    order_text = ("sorted by the mean of their Dice, lowest first" if dice else
                  f"{n_review} to review (listed first)")
    top = []
    if dice:
        stats = summarize([{k: r.get(k, math.nan) for k in dice} for r in rows])
        cells = {s: "".join(f"<td>{stats[k][s]:.3f}</td>" for k in dice)
                 for s in ("mean", "median")}
        names = "".join(f"<th>{html.escape(dict(_HTML_COLUMNS)[k])}</th>" for k in dice)
        top.append(f'<table id="dice"><tr><th>over {len(rows)} cases</th>{names}</tr>'
                   f'<tr><td>mean</td>{cells["mean"]}</tr>'
                   f'<tr><td>median</td>{cells["median"]}</tr></table>')
    for file in files:
        src, shown = _href(file), html.escape(file)
        top.append(f'<a href="{src}"><img src="{src}" alt="{shown}"></a>'
                   if file.endswith(".png") else f'<a href="{src}">{shown}</a> ')
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 4px 8px; text-align: right;
         vertical-align: top; }}
th {{ cursor: pointer; background: #f3f3f3; position: sticky; top: 0; }}
td:first-child, th:first-child {{ text-align: left; }}
td.flag {{ color: #b00; font-weight: bold; }}
img {{ max-width: min(100%, 1100px); display: block; margin: 4px 0; }}
.why {{ text-align: left; color: #555; max-width: 640px; }}
#cases {{ width: 100%; }}
#cases td:last-child, #cases th:last-child {{ text-align: left; width: 100%; }}
code {{ overflow-wrap: anywhere; }}
#dice {{ margin-bottom: 1em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p id="summary">{len(rows)} case{"s" * (len(rows) != 1)}; {order_text}. Click a column's header
to sort by it. Research use only; not for clinical decisions.</p>
{chr(10).join(top)}
<table id="cases"><thead><tr>{header}<th>pictures</th></tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>
<script>
document.querySelectorAll("#cases th[data-col]").forEach(function (th) {{
  th.addEventListener("click", function () {{
    var col = +th.dataset.col, body = document.querySelector("#cases tbody");
    var up = th.dataset.dir !== "up"; th.dataset.dir = up ? "up" : "down";
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {{
      var x = a.cells[col].dataset.sort, y = b.cells[col].dataset.sort;
      var nx = parseFloat(x), ny = parseFloat(y);
      var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
      return up ? c : -c;
    }});
    rows.forEach(function (r) {{ body.appendChild(r); }});
  }});
}});
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var shown = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.dataset.imagesShown = shown.length;
  if (shown.length < images.length) {{
    document.getElementById("summary").textContent +=
      " " + (images.length - shown.length) + " picture(s) could not be loaded.";
  }}
}});
</script>
</body></html>
"""
    return atomic_write_text(folder / name, page, overwrite=overwrite)


# --------------------------------------------------------------------------- report


def write_report(
    report_dir: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    raw_rows: Sequence[Mapping[str, Any]] | None = None,
    extra_summary: Mapping[str, Any] | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """Write the evaluation report of a set of cases into ``report_dir`` (created if needed).

    Files: ``metrics.csv`` (``rows``), ``metrics_raw.csv`` (``raw_rows``, only when given),
    ``summary.json`` (summary of ``rows``; with ``raw_rows`` also ``"metrics_raw"``, their
    summary; plus ``extra_summary``'s keys) and ``boxplots.png`` (stages ``"raw"`` and
    ``"postprocessed"`` when ``raw_rows`` is given, else one stage ``"prediction"``).
    Overlays need the images and are written by the caller with :func:`overlay_png`.

    Returns:
        The written paths, in the order above.
    """
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    written = [write_metrics_csv(rows, report_dir / "metrics.csv", overwrite=overwrite)]
    extra: dict[str, Any] = {}
    if raw_rows is not None:
        written.append(
            write_metrics_csv(raw_rows, report_dir / "metrics_raw.csv", overwrite=overwrite)
        )
        extra["n_cases_raw"] = len(raw_rows)
        extra["metrics_raw"] = summarize(raw_rows)
    for key, value in (extra_summary or {}).items():
        if key in extra:
            raise ValueError(f"summary extra key {key!r} clashes with a reserved key")
        extra[key] = value
    written.append(
        write_summary_json(rows, report_dir / "summary.json", extra, overwrite=overwrite)
    )
    stages: dict[str, Sequence[Mapping[str, Any]]]
    if raw_rows is not None:
        stages = {"raw": raw_rows, "postprocessed": rows}
    else:
        stages = {"prediction": rows}
    written.append(box_plots(stages, report_dir / "boxplots.png", overwrite=overwrite))
    return written
