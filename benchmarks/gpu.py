"""GPU benchmark: training throughput (fp32 vs bf16) and inference seconds per patient.

Run on a machine with a CUDA GPU:
``python benchmarks/gpu.py [--json OUT.json] [--batch 32] [--steps 20]`` (or
``bash benchmarks/gpu.sh`` with the same flags). Prints each figure as soon as it is measured
(about 2 minutes in all on an H100-class card); figures go into docs/benchmarks.md by hand,
with the card's name. The per-patient figures run the shipped weights where the package has
them (the tumor-slices path depends on what the network finds), else random ones; ``weights``
in the output says which.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tiramisu_brats.api import Segmenter
from tiramisu_brats.export import default_weights
from tiramisu_brats.io import find_case_files
from tiramisu_brats.model import REFERENCE, Tiramisu, save_weights
from tiramisu_brats.synthetic import make_case, write_case


def train_throughput(dtype: torch.dtype | None, batch: int, steps: int) -> float:
    """Slices per second of forward + backward + RMSprop step on 192x160 slices."""
    model = Tiramisu(REFERENCE).cuda().to(memory_format=torch.channels_last).train()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 4, 192, 160, device="cuda").contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 4, (batch, 192, 160), device="cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("no CUDA GPU here (torch.cuda.is_available() is False)")
    results = {}

    def record(key: str, value: object) -> None:  # printed at once: a cut-off run keeps these
        results[key] = value
        print(f"{key:<26}  {value:.3f}" if isinstance(value, float) else f"{key:<26}  {value}",
              flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    record("gpu", torch.cuda.get_device_name())
    record("torch", torch.__version__)
    torch.backends.cudnn.benchmark = True
    record("train_slices_per_s_bf16", train_throughput(torch.bfloat16, args.batch, args.steps))
    record("train_slices_per_s_fp32", train_throughput(None, args.batch, args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # random weights mark most slices tumor, so the tumor-slices path would run them all
        weights = default_weights()
        if weights.is_file():
            record("weights", str(weights))
        else:
            weights = save_weights(Tiramisu(REFERENCE), tmp / "w.safetensors")
            record("weights", "random init (no shipped weights found)")
        case_dir = write_case(make_case(seed=0), tmp / "in")
        seg = Segmenter(weights, "torch", device="cuda", batch_size=32)
        totals, infer = [], []
        for i in range(4):
            summary = seg.segment_case(find_case_files(case_dir), tmp / f"o{i}.nii.gz")
            totals.append(summary["timings_s"]["total"])
            infer.append(summary["timings_s"]["infer"])
            print(f"patient {i}: {summary['timings_s']['total']:.3f} s", flush=True)
        record("patient_s_total_median", statistics.median(totals[1:]))
        record("patient_s_infer_median", statistics.median(infer[1:]))


if __name__ == "__main__":
    main()
