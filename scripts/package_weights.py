"""Package a training run's last weights as the model the package ships: float16 safetensors
with the recipe, the training and held-out cases and the license in the header, and the ONNX
export beside it (what the light install runs without PyTorch).

Usage: python scripts/package_weights.py RUN_DIR OUT.safetensors --recipe "TEXT" \
           --postprocess "TEXT"
"""

import argparse
import json
from pathlib import Path

from tiramisu_brats import io
from tiramisu_brats.export import export_onnx
from tiramisu_brats.model import load_model, save_weights

LICENSE = "Apache-2.0; trained on BraTS data: research use only, cite the BraTS papers"

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("run", type=Path)
parser.add_argument("out", type=Path)
parser.add_argument("--recipe", required=True)
parser.add_argument("--postprocess", required=True, help="the postprocessing decision, in words")
args = parser.parse_args()

config = json.loads((args.run / "train_config.json").read_text())
rows = (args.run / "log.csv").read_text().strip().splitlines()
model = load_model(args.run / "model_last.safetensors")
meta = {"recipe": args.recipe, "train_config": json.dumps(config, sort_keys=True),
        "trained_on": ",".join(config["train_cases"]), "held_out": ",".join(config["val_cases"]),
        "epoch": str(len(rows) - 1), "postprocess": args.postprocess, "license": LICENSE}
io.atomic_write(args.out, lambda tmp: save_weights(model, tmp, half=True, metadata=meta),
                overwrite=True)
export_onnx(args.out, args.out.with_suffix(".onnx"))
print(f"wrote {args.out} and {args.out.with_suffix('.onnx')}")
