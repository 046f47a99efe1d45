"""Test-time zoom: the network also run on the case zoomed in-plane, scored on labelled cases.

The hard validation cases are under-segmented (a small tumor, faint edema: docs/model-card.md)
and training zoomed its slices by up to 10 %, so a zoomed copy of the case is a view the
network knows. Per case and view (plane, model: the shipped model 0 and its partner 1), the
image is zoomed by each ``--scales`` factor along the view's two in-plane axes (linear,
``scipy.ndimage.zoom``), run through ``api.Segmenter.view_probabilities`` (every brain slice),
and the probabilities zoomed back to the case's grid and renormalized. Fast mode (axial, the
shipped model, its labelling rule) at each scale and over all scales, accurate mode (six
views, the partner's rule) at scale 1, over all scales, and with the other scales on axial
slices only; labels postprocessed as ``segment`` does. A research script: ``segment`` does not
zoom.

Usage: python scripts/zoom_tta.py --cases ID,ID,... [--scales 0.87,1,1.15]
           [--data-root ../shared/data] [--json OUT.json]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from tiramisu_brats import api, io
from tiramisu_brats.data import labelled_cases
from tiramisu_brats.export import decision
from tiramisu_brats.infer import region_labels
from tiramisu_brats.metrics import region_dice
from tiramisu_brats.postprocess import postprocess

IN_PLANE = {"axial": (1, 2), "coronal": (1, 3), "sagittal": (2, 3)}  # axes of (4, X, Y, Z)

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cases", required=True)
parser.add_argument("--scales", default="0.87,1,1.15")
parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
parser.add_argument("--json", type=Path, default=None)
args = parser.parse_args()
try:
    scales = [float(s) for s in args.scales.split(",")]
except ValueError:
    parser.error(f"--scales {args.scales}: expected numbers, comma-separated")
if 1 not in scales:  # accurate mode's rows fuse the views at scale 1
    parser.error(f"--scales {args.scales}: must include 1 (accurate mode's unzoomed views)")
try:  # e.g. no such --data-root, an unknown case
    folders = labelled_cases(args.data_root, args.cases)
except io.InputError as err:
    parser.error(str(err))
cases = list(folders)
accurate = api.Segmenter(mode="accurate")
fast_rule = decision(accurate.weights).get("region_threshold")  # as Segmenter() labels
print(f"precision {accurate.backend.precision}; labels: fast {fast_rule}, accurate "
      f"{accurate.threshold}", flush=True)


def zoomed(image: np.ndarray, plane: str, model: int, scale: float) -> np.ndarray:
    """The view's probabilities (K, X, Y, Z) of ``image`` zoomed by ``scale`` in-plane."""
    if scale == 1:
        return accurate.view_probabilities(image, plane, model=model)
    factors = [scale if axis in IN_PLANE[plane] else 1.0 for axis in range(4)]
    probs = accurate.view_probabilities(ndimage.zoom(image, factors, order=1), plane,
                                        model=model)
    back = ndimage.zoom(probs, [n / m for n, m in zip((4, *image.shape[1:]), probs.shape)],
                        order=1)
    return back / back.sum(0, keepdims=True)


planes = ("axial", "coronal", "sagittal")
combos = {f"fast, zoom {s:g}": ([("axial", 0, s)], fast_rule) for s in scales}
combos["fast, every zoom"] = ([("axial", 0, s) for s in scales], fast_rule)
combos["accurate"] = ([(p, m, 1.0) for m in (0, 1) for p in planes], accurate.threshold)
combos["accurate, every zoom"] = ([(p, m, s) for m in (0, 1) for p in planes for s in scales],
                                  accurate.threshold)
combos["accurate, every zoom on axial only"] = (
    combos["accurate"][0] + [("axial", m, s) for m in (0, 1) for s in scales if s != 1],
    accurate.threshold)
rows = []
for case_id in cases:
    files = io.find_case_files(folders[case_id])
    image = io.read_case(files).image
    ref = io.read_label_map(files.seg)[0]
    probs = {(p, m, s): zoomed(image, p, m, s) for p in planes for m in (0, 1) for s in scales}
    row = {"case": case_id}
    for name, (views, rule) in combos.items():
        fused = sum(probs[v] for v in views) / len(views)
        row[name] = region_dice(postprocess(region_labels(fused, rule)), ref)
    rows.append(row)
    print(f"{case_id}: " + "; ".join(f"{n} " + " / ".join(f"{row[n][r]:.3f}" for r in row[n])
                                     for n in combos), flush=True)
if args.json:
    args.json.write_text(json.dumps(rows, indent=1))
print("\n| views | Dice WT | Dice TC | Dice ET | mean |\n|---|---:|---:|---:|---:|")
for name in combos:
    m = [float(np.mean([row[name][r] for row in rows])) for r in ("WT", "TC", "ET")]
    print(f"| {name} | " + " | ".join(f"{x:.3f}" for x in m) + f" | {np.mean(m):.3f} |")
