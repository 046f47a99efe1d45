"""Compare two ways of bringing the prediction back from the network's 1 mm grid to an input
grid of another voxel size: the labels by nearest neighbour or the class probabilities,
linearly (what ``segment`` does), then argmax and postprocessing on the input grid; and the
network run on the input grid as it is (``segment --no-resample``).

Each case is resampled to ``--spacing`` (images linear, the expert's labels nearest), segmented
in fast mode's single axial view (every slice), and scored against the expert on the same grid.

Usage: python scripts/resampling.py --cases ID,... [--spacing 0.5,0.5,1 --spacing 1,1,3]
       [--model W] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import ndimage

from tiramisu_brats import api, io, metrics
from tiramisu_brats.data import find_training_cases
from tiramisu_brats.postprocess import postprocess
from tiramisu_brats.preprocess import network_grid, to_input, to_network


def resampled(image, seg, affine, spacing):
    shape = image.shape[1:]
    target = [round((n - 1) / z) + 1 for n, z in zip(shape, spacing, strict=True)]
    factors = [m / n for n, m in zip(shape, target, strict=True)]
    img = np.stack([ndimage.zoom(m.astype(np.float32), factors, order=1, grid_mode=False)
                    for m in image])
    lab = ndimage.zoom(seg, factors, order=0, grid_mode=False)
    new = affine.copy()
    new[:3, :3] = affine[:3, :3] @ np.diag([(n - 1) / (m - 1)
                                            for n, m in zip(shape, target, strict=True)])
    return img, lab, new


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--spacing", action="append", default=None)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    spacings = [tuple(float(v) for v in s.split(",")) for s in (args.spacing or
                                                               ["0.5,0.5,1", "1,1,3"])]
    folders = find_training_cases(
        [args.data_root / "brats-labeled", args.data_root / "brats-labeled-extra"])
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in folders] or ([] if cases else ["(none given)"])
    if unknown:
        parser.error(f"not labelled cases of {args.data_root}: {', '.join(unknown)}")
    seg = api.Segmenter(args.model)
    print("| case | grid (mm) | WT/TC/ET at 1 mm | labels nearest | probabilities linear | "
          "not resampled |")
    print("|---|---|---|---|---|---|")
    sums: dict = {}
    for case_id in cases:
        files = io.find_case_files(folders[case_id])
        case = io.read_case(files)
        ref = io.read_label_map(files.seg)[0]
        base = postprocess(io.CLASS_TO_LABEL[seg.view_probabilities(case.image).argmax(0)])
        at_1mm = list(metrics.region_dice(base, ref).values())
        for spacing in spacings:
            image, labels, affine = resampled(case.image, ref, case.affine, spacing)
            grid = network_grid(affine, image.shape[1:])
            probs = seg.view_probabilities(to_network(image, grid))
            nearest = to_input(postprocess(io.CLASS_TO_LABEL[probs.argmax(0)]), grid)
            soft = postprocess(io.CLASS_TO_LABEL[to_input(probs, grid, linear=True).argmax(0)])
            # the network on the input's voxels (flips to the trained orientation only)
            same = network_grid(affine, image.shape[1:], resample=False)
            as_is = to_input(postprocess(io.CLASS_TO_LABEL[
                seg.view_probabilities(to_network(image, same)).argmax(0)]), same)
            row = [at_1mm]
            for pred in (nearest, soft, as_is):
                row.append(list(metrics.region_dice(pred, labels).values()))
            key = "x".join(f"{z:g}" for z in spacing)
            sums.setdefault(key, []).append(row)
            print(f"| {case_id} | {key} | " + " | ".join(
                " / ".join(f"{d:.3f}" for d in r) for r in row) + " |", flush=True)
    for key, rows in sums.items():
        mean = np.mean(rows, axis=0)
        print(f"| **mean** | {key} | " + " | ".join(
            " / ".join(f"{d:.3f}" for d in r) for r in mean) + " |")


if __name__ == "__main__":
    main()
