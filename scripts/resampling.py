"""How to segment an image whose voxels are not 1 mm: which axes to resample for the network,
and how to bring the prediction back.

Each case is resampled to ``--spacing`` (images linear, the expert's labels nearest) and scored
against the expert on the same grid. ``--mode fast`` (fast mode's single axial view, every
slice, argmax): the labels brought back by nearest neighbour or the class probabilities
linearly, every axis resampled to 1 mm; the probabilities linearly on the grid ``segment`` uses
(in-plane axes of 1 to ``preprocess.KEEP_IN_PLANE_MM`` mm kept); and the network on the input's
voxels as they are (``segment --no-resample``). ``--mode accurate``: ``Segmenter.segment`` in
accurate mode (its tumor slices and labelling rule), every axis to 1 mm, on ``segment``'s grid,
and as they are.

Usage: python scripts/resampling.py --cases ID,... [--spacing 0.5,0.5,1 --spacing 1,1,3]
       [--mode fast|accurate] [--model W] [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import ndimage

from tiramisu_brats import api, io, metrics, preprocess
from tiramisu_brats.data import labelled_cases
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


def labelled(probs: np.ndarray) -> np.ndarray:
    """Fast mode's labels (argmax, postprocessed) from class probabilities (4, X, Y, Z)."""
    return postprocess(io.CLASS_TO_LABEL[probs.argmax(0)])


@contextmanager
def every_axis_to_1mm() -> Iterator[None]:
    """``network_grid`` resamples every axis to 1 mm meanwhile (the rule before in-plane axes
    of up to ``preprocess.KEEP_IN_PLANE_MM`` were kept)."""
    keep, preprocess.KEEP_IN_PLANE_MM = preprocess.KEEP_IN_PLANE_MM, 0.0
    try:
        yield
    finally:
        preprocess.KEEP_IN_PLANE_MM = keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--spacing", action="append", default=None)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--mode", choices=list(api.MODES), default="fast")
    args = parser.parse_args()
    spacings = [tuple(float(v) for v in s.split(",")) for s in (args.spacing or
                                                               ["0.5,0.5,1", "1,1,3"])]
    try:  # e.g. no such --data-root, an unknown case
        folders = labelled_cases(args.data_root, args.cases)
    except io.InputError as err:
        parser.error(str(err))
    cases = list(folders)
    seg = api.Segmenter(args.model, mode=args.mode)
    as_is = api.Segmenter(args.model, mode=args.mode, resample=False)
    columns = (["labels nearest, every axis to 1 mm", "probabilities linear, every axis to 1 mm",
                "probabilities linear, segment's grid"] if args.mode == "fast" else
               ["every axis to 1 mm", "segment's grid"]) + ["not resampled"]
    print(f"mode {args.mode}\n\n| case | grid (mm) | WT/TC/ET at 1 mm | " + " | ".join(columns)
          + " |")
    print("|---|---|---|" + "---|" * len(columns))
    sums: dict = {}
    for case_id in cases:
        files = io.find_case_files(folders[case_id])
        case = io.read_case(files)
        ref = io.read_label_map(files.seg)[0]
        if args.mode == "fast":
            base = labelled(seg.view_probabilities(case.image))
        else:
            base = seg.segment(case.image).labels
        at_1mm = list(metrics.region_dice(base, ref).values())
        for spacing in spacings:
            image, labels, affine = resampled(case.image, ref, case.affine, spacing)
            if args.mode == "fast":
                with every_axis_to_1mm():
                    grid = network_grid(affine, image.shape[1:])
                probs = seg.view_probabilities(to_network(image, grid))
                preds = [to_input(labelled(probs), grid),
                         labelled(to_input(probs, grid, linear=True))]
                ours = network_grid(affine, image.shape[1:])
                if ours != grid:  # else the same network input as above
                    probs = seg.view_probabilities(to_network(image, ours))
                preds.append(labelled(to_input(probs, ours, linear=True)))
                # the network on the input's voxels (flips to the trained orientation only)
                same = network_grid(affine, image.shape[1:], resample=False)
                preds.append(to_input(labelled(
                    seg.view_probabilities(to_network(image, same))), same))
            else:
                with every_axis_to_1mm():
                    preds = [seg.segment(image, affine=affine).labels]
                preds += [s.segment(image, affine=affine).labels for s in (seg, as_is)]
            row = [at_1mm] + [list(metrics.region_dice(p, labels).values()) for p in preds]
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
