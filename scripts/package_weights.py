"""Package a training run's last weights as the model the package ships: float16 safetensors
with the recipe, the training and held-out cases, the postprocessing and labelling decisions
and the license in the header, and the ONNX export beside it (what the light install runs
without PyTorch).

Usage: python scripts/package_weights.py RUN_DIR OUT.safetensors --recipe "TEXT"
           --postprocess "TEXT" [--decision JSON] [--best] [--partner-of WEIGHTS] [--overwrite]
       python scripts/package_weights.py PACKAGED.safetensors OUT.safetensors --decision JSON
           [--partner-of WEIGHTS] [--overwrite]
``--best``: the run's ``model_best.safetensors`` (the epoch of the best validation mean
Dice; in a run without validation cases, the last epoch's) rather than its last weights. The
second form records a decision
(``export.decision``: ``region_threshold``, ``qc_spread_review``,
``qc_confidence_review``) in weights packaged before:
the tensors and the rest of the header are kept as they are; the ONNX export is made anew
(the weights' sha256 changes). ``--partner-of WEIGHTS``: the weights become the partner that
accurate mode fuses with WEIGHTS (``export.partner``: their header names WEIGHTS' sha256, and
the decision is accurate mode's); OUT must then be ``<WEIGHTS stem>.partner.safetensors``
beside WEIGHTS. An OUT (or its ``.onnx``) that exists is replaced only with ``--overwrite``,
or where OUT is PACKAGED itself (the decision recorded in place). Every input is checked
before anything is written; an error is one line on stderr, exit status 2.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from safetensors.numpy import load_file, save_file

from tiramisu_brats import io
from tiramisu_brats.api import one_line
from tiramisu_brats.export import decision, export_onnx, file_sha256, parse_decision, partner
from tiramisu_brats.model import load_model, read_config, save_weights
from tiramisu_brats.train import TrainConfig

LICENSE = "Apache-2.0; trained on BraTS data: research use only, cite the BraTS papers"


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


parser = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("run", type=Path, help="a training run's folder, or packaged weights")
parser.add_argument("out", type=Path)
parser.add_argument("--recipe", help="how the weights were trained, in words (needed for a "
                    "run folder)")
parser.add_argument("--postprocess", help="the postprocessing decision, in words (needed for a "
                    "run folder)")
parser.add_argument("--decision",
                    help="JSON: region_threshold, qc_spread_review, qc_confidence_review")
parser.add_argument("--partner-of", type=Path,
                    help="weights whose accurate mode fuses these with them")
parser.add_argument("--best", action="store_true",
                    help="the epoch of the best validation mean Dice, not the last")
parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
args = parser.parse_args()

onnx = args.out.with_suffix(".onnx")
if args.out.suffix != ".safetensors":
    fail(f"{args.out}: the weights go to a .safetensors file (their ONNX export beside it)")
in_place = args.run.is_file() and args.out.exists() and args.out.samefile(args.run)
existing = [p for p in (args.out, onnx) if p.exists()]
if existing and not (args.overwrite or in_place):
    fail(f"{existing[0]}: already exists; pass --overwrite to replace it")
if args.decision:
    try:
        parse_decision(args.decision)  # as export.decision will read it from the header
    except ValueError as err:
        fail(str(err))
if args.partner_of and not args.partner_of.is_file():
    fail(f"{args.partner_of}: no such weights file")
if args.partner_of and args.out != args.partner_of.with_name(
        args.partner_of.stem + ".partner.safetensors"):
    fail(f"a partner of {args.partner_of} is {args.partner_of.stem}.partner.safetensors "
         "beside it")
try:
    if args.run.is_file():
        if not args.decision:
            fail("packaged weights: give the --decision to record")
        # the run's recipe and epoch are in the header already: these would change nothing
        given = [f for f, v in (("--recipe", args.recipe), ("--postprocess", args.postprocess),
                                ("--best", args.best)) if v]
        if given:
            fail(f"packaged weights: {', '.join(given)} only apply to a run folder")
        _, meta = read_config(args.run)
        tensors = load_file(args.run)
        meta["decision"] = args.decision
        if args.partner_of:
            meta["partner_of"] = file_sha256(args.partner_of)
        io.atomic_write(args.out, lambda tmp: save_file(tensors, str(tmp), metadata=meta),
                        overwrite=True)
    elif args.run.is_dir():
        if not (args.recipe and args.postprocess):
            fail("a run folder: give --recipe and --postprocess")
        weights = args.run / f"model_{'best' if args.best else 'last'}.safetensors"
        if not weights.is_file():
            fail(f"{args.run}: no {weights.name} (not a run folder, or no epoch completed)")
        path = args.run / "train_config.json"
        try:
            config = json.loads(TrainConfig.from_json(path.read_text()).to_json())
        except (ValueError, TypeError, KeyError) as err:
            fail(f"{path}: not a valid training config ({one_line(err)})")
        del config["cache"]  # where the slices lay on the training machine: not the recipe
        _, trained = read_config(weights)
        model = load_model(weights)
        meta = {"recipe": args.recipe, "train_config": json.dumps(config, sort_keys=True),
                "trained_on": ",".join(config["train_cases"]),
                "held_out": ",".join(config["val_cases"]), "epoch": trained["epoch"],
                "postprocess": args.postprocess, "license": LICENSE,
                **({"decision": args.decision} if args.decision else {})}
        if args.partner_of:
            meta["partner_of"] = file_sha256(args.partner_of)
        io.atomic_write(args.out, lambda tmp: save_weights(model, tmp, half=True, metadata=meta),
                        overwrite=True)
    else:
        fail(f"{args.run}: no such run folder or weights file")
except (ValueError, OSError, KeyError) as err:  # KeyError: a header without the epoch
    fail(one_line(err))
print(f"decision: {decision(args.out) or 'none (argmax)'}")
if args.partner_of:
    if partner(args.partner_of) != args.out:
        fail(f"{args.out}: written, but accurate mode does not find it as the partner of "
             f"{args.partner_of}")
    print(f"the partner of {args.partner_of} in accurate mode")
export_onnx(args.out, onnx)
print(f"wrote {args.out} and {onnx}")
