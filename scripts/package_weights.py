"""Package a training run's last weights as the model the package ships: float16 safetensors
with the recipe, the training and held-out cases, the postprocessing and labelling decisions
and the license in the header, and the ONNX export beside it (what the light install runs
without PyTorch).

Usage: python scripts/package_weights.py RUN_DIR OUT.safetensors --recipe "TEXT" \
           --postprocess "TEXT" [--decision JSON] [--best]
       python scripts/package_weights.py PACKAGED.safetensors OUT.safetensors --decision JSON
           [--partner-of WEIGHTS]
``--best``: the run's ``model_best.safetensors`` (the epoch of the best validation mean
Dice) rather than its last weights. The second form records a decision
(``export.decision``: ``region_threshold``, ``qc_spread_review``,
``qc_confidence_review``) in weights packaged before:
the tensors and the rest of the header are kept as they are; the ONNX export is made anew
(the weights' sha256 changes). ``--partner-of WEIGHTS``: the weights become the partner that
accurate mode fuses with WEIGHTS (``export.partner``: their header names WEIGHTS' sha256, and
the decision is accurate mode's); OUT must then be ``<WEIGHTS stem>.partner.safetensors``
beside WEIGHTS.
"""

import argparse
import csv
import json
from pathlib import Path

from safetensors.numpy import load_file, save_file

from tiramisu_brats import io
from tiramisu_brats.export import decision, export_onnx, file_sha256, partner
from tiramisu_brats.model import load_model, read_config, save_weights

LICENSE = "Apache-2.0; trained on BraTS data: research use only, cite the BraTS papers"

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("run", type=Path, help="a training run's folder, or packaged weights")
parser.add_argument("out", type=Path)
parser.add_argument("--recipe")
parser.add_argument("--postprocess", help="the postprocessing decision, in words")
parser.add_argument("--decision",
                    help="JSON: region_threshold, qc_spread_review, qc_confidence_review")
parser.add_argument("--partner-of", type=Path,
                    help="weights whose accurate mode fuses these with them")
parser.add_argument("--best", action="store_true",
                    help="the epoch of the best validation mean Dice, not the last")
args = parser.parse_args()

if args.partner_of and args.out != args.partner_of.with_name(
        args.partner_of.stem + ".partner.safetensors"):
    parser.error(f"a partner of {args.partner_of} is {args.partner_of.stem}.partner.safetensors "
                 "beside it")
if args.run.is_file():
    if not args.decision:
        parser.error("packaged weights: give the --decision to record")
    _, meta = read_config(args.run)
    tensors = load_file(args.run)
    meta["decision"] = args.decision
    if args.partner_of:
        meta["partner_of"] = file_sha256(args.partner_of)
    io.atomic_write(args.out, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                    overwrite=True)
else:
    if not (args.recipe and args.postprocess):
        parser.error("a run folder: give --recipe and --postprocess")
    config = json.loads((args.run / "train_config.json").read_text())
    with open(args.run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epoch = (max(rows, key=lambda r: float(r["val_dice_mean"])) if args.best else rows[-1])["epoch"]
    model = load_model(args.run / f"model_{'best' if args.best else 'last'}.safetensors")
    meta = {"recipe": args.recipe, "train_config": json.dumps(config, sort_keys=True),
            "trained_on": ",".join(config["train_cases"]),
            "held_out": ",".join(config["val_cases"]), "epoch": epoch,
            "postprocess": args.postprocess, "license": LICENSE,
            **({"decision": args.decision} if args.decision else {})}
    io.atomic_write(args.out, lambda tmp: save_weights(model, tmp, half=True, metadata=meta),
                    overwrite=True)
print(f"decision: {decision(args.out) or 'none (argmax)'}")
if args.partner_of:
    assert partner(args.partner_of) == args.out
    print(f"the partner of {args.partner_of} in accurate mode")
export_onnx(args.out, args.out.with_suffix(".onnx"))
print(f"wrote {args.out} and {args.out.with_suffix('.onnx')}")
