"""Candidates made from trained weights without training: the uniform average of several
fine-tunes that share one start (a "model soup", Wortsman et al. 2022), and BatchNorm
statistics recomputed with dropout off.

Why the second: the model is BN-ReLU-conv-dropout, and the dropout's output feeds the next
layers' BatchNorm through the concatenations. Training keeps the running variance of inputs
that dropout scaled up; inference runs without dropout, so the statistics it normalizes with
are not those of what it sees (Li et al., CVPR 2019). Recomputing them in train mode with
dropout off, on training slices drawn as training draws them (``data.PatchSampler``, 80 % through
tumor, full 192 x 160 slices of the three planes), removes that shift.

Then the result's Dice on the validation cases' cached axial slices (argmax, before
postprocessing: what a training run's ``log.csv`` reports) is printed; score it in the full
pipeline with ``scripts/ablation.py --model OUT``. docs/model-card.md has the figures.

Usage: python scripts/weight_average.py OUT.safetensors W.safetensors [W ...] --cache CACHE
           --val-cases ID,ID,... [--bn-batches 40] [--tumor-share 0.8] [--seed 0]
``--bn-batches 0`` keeps the averaged running statistics.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tiramisu_brats import infer, io
from tiramisu_brats.data import PatchSampler, dequantize, open_cache, select
from tiramisu_brats.model import load_model, read_config, recompute_batchnorm, save_weights
from tiramisu_brats.preprocess import CROP
from tiramisu_brats.train import validate

parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("out", type=Path)
parser.add_argument("weights", type=Path, nargs="+", help="weights sharing one architecture")
parser.add_argument("--cache", type=Path, required=True, help="a three-plane training cache")
parser.add_argument("--val-cases", required=True, help="held out of the BatchNorm slices")
parser.add_argument("--bn-batches", type=int, default=40, help="batches of 16 slices")
parser.add_argument("--tumor-share", type=float, default=0.8,
                    help="share of the BatchNorm slices drawn through tumor (training's: 0.8)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

# checked before any work: a mistyped id would put a validation case into the BatchNorm slices
try:
    cases = open_cache(args.cache)
except io.InputError as err:
    parser.error(str(err))
val_ids = [c.strip() for c in args.val_cases.split(",") if c.strip()]
cached = {c.case_id for c in cases}
unknown = [c for c in val_ids if c not in cached] or ([] if val_ids else ["(none given)"])
if unknown:
    parser.error(f"not cases of {args.cache}: {', '.join(unknown)}")
try:
    val_cases = select(cases, val_ids)  # validation reads their axial slices
except io.InputError as err:
    parser.error(str(err))
if not args.out.parent.is_dir():
    parser.error(f"{args.out}: output folder {args.out.parent} does not exist")

models = [load_model(w) for w in args.weights]
model = models[0]
states = [m.state_dict() for m in models]
averaged = {name: sum(s[name].double() for s in states).div(len(states)).to(t.dtype)
            if t.is_floating_point() else t for name, t in states[0].items()}
model.load_state_dict(averaged)

if args.bn_batches:
    sampler = PatchSampler([c for c in cases if c.case_id not in val_ids], CROP, args.tumor_share)
    rng = np.random.default_rng(args.seed)
    recompute_batchnorm(model, (torch.from_numpy(dequantize(sampler.sample(rng, 16)[0]))
                                for _ in range(args.bn_batches)))

_, meta = read_config(args.weights[0])
made_from = json.dumps({"average_of": [str(w) for w in args.weights],
                         "bn_batches_of_16": args.bn_batches, "tumor_share": args.tumor_share,
                         "seed": args.seed})
io.atomic_write(args.out, lambda tmp: save_weights(model, tmp, metadata={
    **({"train_config": meta["train_config"]} if "train_config" in meta else {}),
    "made_from": made_from}), overwrite=True)
dice = validate(model, val_cases, torch.device("cpu"))
# validate's autocast: bf16 on the CPU only where it computes in bf16
print(f"{args.out}: validation (cached axial slices, argmax, "
      f"{'bf16' if infer.has_bf16() else 'fp32'}) "
      + " / ".join(f"{r} {v:.3f}" for r, v in dice.items())
      + f", mean {np.mean(list(dice.values())):.3f}")
