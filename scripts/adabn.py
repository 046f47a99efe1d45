"""Test-time BatchNorm statistics (AdaBN, Li et al. 2016): each case's own statistics, blended
with the trained ones, scored in fast mode on labelled cases against the trained statistics.

The shipped model fails on cases whose intensities differ from its training cases' (faint
edema, an LGG: docs/model-card.md); normalizing each layer by the case's own statistics is the
classic cheap adaptation. Per case: every brain slice of the axial crop runs once through the
network in train mode (dropout off, cumulative statistics), the running mean and variance
become ``blend`` x the case's + (1 - blend) x the trained ones; then the slices are labelled
(argmax, PyTorch fp32, whole slices) and postprocessed as ``segment`` does. A research
script: inference does not do this (it would need a second pass over the case, and OpenVINO
runs the BatchNorm folded into the convolutions).

Usage: python scripts/adabn.py --cases ID,ID,... [--blend 0.5,1] [--model W]
           [--data-root ../shared/data]
"""

import argparse
import copy
from pathlib import Path

import numpy as np
import torch

from tiramisu_brats import api, io
from tiramisu_brats.data import labelled_cases
from tiramisu_brats.export import default_weights
from tiramisu_brats.io import CLASS_TO_LABEL
from tiramisu_brats.metrics import region_dice
from tiramisu_brats.model import load_model, recompute_batchnorm
from tiramisu_brats.postprocess import postprocess
from tiramisu_brats.preprocess import to_network, uncrop

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cases", required=True)
parser.add_argument("--blend", default="0.5,1")
parser.add_argument("--model", type=Path, default=None)
parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
args = parser.parse_args()
try:  # e.g. no such --data-root, an unknown case
    folders = labelled_cases(args.data_root, args.cases)
except io.InputError as err:
    parser.error(str(err))
cases = list(folders)
base = load_model(args.model or default_weights()).eval()


def labels(model: torch.nn.Module, slices: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(slices[k:k + 16])).argmax(1).numpy()
                               for k in range(0, len(slices), 16)])


def adapted(slices: np.ndarray, blend: float) -> torch.nn.Module:
    model = copy.deepcopy(base)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    trained = [(m.running_mean.clone(), m.running_var.clone()) for m in norms]
    recompute_batchnorm(model, (torch.from_numpy(slices[k:k + 16])
                                for k in range(0, len(slices), 16)))
    for m, (mean, var) in zip(norms, trained, strict=True):
        m.running_mean.mul_(blend).add_(mean * (1 - blend))
        m.running_var.mul_(blend).add_(var * (1 - blend))
    return model


blends = [float(b) for b in args.blend.split(",")]
names = ["trained", *(f"blend {b:g}" for b in blends)]
scores = {name: [] for name in names}
for case_id in cases:
    files = io.find_case_files(folders[case_id])
    prep = api.prepare_case(io.read_case(files))
    ref = to_network(io.read_label_map(files.seg)[0], prep.grid)
    line = case_id
    for name, model in zip(names, [base, *(adapted(prep.slices, b) for b in blends)],
                           strict=True):
        dice = region_dice(postprocess(uncrop(CLASS_TO_LABEL[labels(model, prep.slices)],
                                              prep.geometry)), ref)
        scores[name].append([dice["WT"], dice["TC"], dice["ET"]])
        line += f" | {name}: " + " / ".join(f"{d:.3f}" for d in scores[name][-1])
    print(line, flush=True)
for name, rows in scores.items():
    mean = np.mean(rows, axis=0)
    print(f"mean, {name}: " + " / ".join(f"{d:.3f}" for d in mean) + f" ({mean.mean():.3f})")
